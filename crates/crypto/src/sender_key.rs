//! Sender keys for groups and the lobby (security.md §1.6).
//!
//! Each member of a group owns one sending chain per group: a random chain id,
//! a 32-byte chain key advanced by the Double Ratchet's symmetric step, and a
//! fresh Ed25519 signing key made for that chain alone (never the identity
//! key). The member hands the chain to every other member in a
//! [`SenderKeyDistribution`] sent over the 1:1 ratchet sessions; afterwards
//! one ciphertext, fanned out by the server, reaches the whole group.
//!
//! Every member holds every sender's chain key, so the AEAD alone proves only
//! "someone in the group"; the signature is what authenticates the sender.
//! A receiver therefore **verifies the signature before deriving any key or
//! decrypting** (libsignal `group_cipher.rs`).
//!
//! There is no post-compromise security within a chain: the client rotates
//! (calls [`SenderKeyState::generate`] again and sends the new distribution
//! message to the remaining members) whenever a member leaves or is removed.
//!
//! ## Encodings
//!
//! `lp(x)` is a `u32` big-endian length followed by the bytes; integers are
//! big-endian; every decoder refuses trailing bytes.
//!
//! * Distribution message: `version(1)=1 ‖ lp(group id) ‖ chain id(u32) ‖
//!   iteration(u32) ‖ chain key(32) ‖ signing public key(32)`.
//! * Group message: `version(1)=1 ‖ type(1)=0x02 ‖ lp(group id) ‖ chain id(u32)
//!   ‖ iteration(u32) ‖ ciphertext ‖ signature(64)`. The first five fields are
//!   the header. The signature is Ed25519 over `"messenger/1 group-msg" ‖
//!   header ‖ ciphertext`, the bytes as sent. The ciphertext is
//!   ChaCha20-Poly1305 with the key and nonce from
//!   `HKDF(salt = zeros, IKM = message seed, info = "messenger/1 sender-key
//!   message")`, and associated data `"messenger/1 group-ad" ‖ lp(group id) ‖
//!   lp(sender username) ‖ header`.
//!
//! ## Order of checks on receipt
//!
//! 1. Parse: version, type byte and layout (the layout depends on the version,
//!    so it is checked here; v1 chains carry no other version).
//! 2. The group id must be this store's group ([`SenderKeyError::GroupMismatch`]).
//! 3. Find the chain by id; an unknown one is [`SenderKeyError::NoSenderKey`],
//!    so the caller can hold the message until the distribution arrives.
//! 4. Verify the signature with `verify_strict`.
//! 5. Derive the key: an old iteration uses its stored skipped key or is a
//!    [`SenderKeyError::Duplicate`]; a jump of more than [`MAX_SKIP`] is
//!    [`SenderKeyError::TooFarAhead`], refused before any key is derived.
//! 6. Decrypt. Only after this succeeds does the stored state change.

use core::fmt;
use std::collections::VecDeque;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{
    MAX_USERNAME_LEN, SIGNATURE_LEN, SigningContext, Username, sign_with, verify_strict,
};
use crate::kdf::{aead_key, chain_step};
use crate::padding::{MAX_PLAINTEXT_LEN, pad_in_place, padded_len, unpadded_len};
use crate::secret::Secret32;

/// Longest group id, in bytes. Ids are opaque client-chosen names (a UUID is
/// 16 bytes, a hash 32); 64 leaves room while keeping every header small.
pub const MAX_GROUP_ID_LEN: usize = 64;
/// Chains kept per (sender, group), as in libsignal: enough to bridge a few
/// rotations whose messages are still in flight, while an evicted chain's
/// late messages are simply lost.
pub const MAX_SENDER_KEY_STATES: usize = 5;
/// Largest forward jump one message may cause (keys skipped in one go).
/// Tolerates routine loss and delay; bounds the work (2 HMACs per step) a
/// validly signed message can demand. Same value as the 1:1 ratchet
/// (security.md §1.4).
pub const MAX_SKIP: u32 = 2000;
/// Skipped message keys stored per chain; the oldest is evicted first. Bounds
/// memory and the keys exposed to a later compromise (Double Ratchet §6.4).
pub const MAX_SKIPPED_KEYS: usize = 2000;
/// Version byte of a group message.
pub const GROUP_MESSAGE_VERSION: u8 = 1;
/// Type byte of a group (sender-key) message. The 1:1 ratchet uses `0x01`, so
/// a ciphertext of one kind never parses or authenticates as the other.
pub const GROUP_MESSAGE_TYPE: u8 = 0x02;
/// Version byte of a [`SenderKeyDistribution`] encoding.
pub const DISTRIBUTION_VERSION: u8 = 1;
/// Version byte of a [`SenderKeyState`] pickle.
pub const SENDER_PICKLE_VERSION: u8 = 1;
/// Version byte of a [`SenderKeyReceiver`] pickle.
pub const RECEIVER_PICKLE_VERSION: u8 = 1;

/// HKDF info turning a message seed into a ChaCha20-Poly1305 key and nonce
/// (security.md §1.6).
const MESSAGE_KEY_INFO: &[u8] = b"messenger/1 sender-key message";
/// First field of a group message's AEAD associated data (security.md §1.6,
/// §1.9 "keep the sender's claimed identity bound inside the ciphertext").
const GROUP_AD_LABEL: &[u8] = b"messenger/1 group-ad";

/// Poly1305 tag length.
const TAG_LEN: usize = 16;
/// Ed25519 public key length.
const SIGNING_PUBLIC_LEN: usize = 32;

/// Why a sender-key operation failed. Carries no key or plaintext bytes.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SenderKeyError {
    /// Bytes that do not decode (bad version, truncated, trailing bytes, ...).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A group id that is empty or longer than [`MAX_GROUP_ID_LEN`].
    #[error("invalid group id: use 1 to 64 bytes")]
    InvalidGroupId,
    /// The type byte is not [`GROUP_MESSAGE_TYPE`] (e.g. a 1:1 ratchet message).
    #[error("not a group message (type byte {0:#04x})")]
    NotGroupMessage(u8),
    /// The message or distribution is for another group than this store's.
    #[error("message belongs to another group")]
    GroupMismatch,
    /// No chain with this id from this sender: hold the message until the
    /// sender's distribution message arrives, then retry.
    #[error("no sender key for chain {chain_id} yet; hold the message until it arrives")]
    NoSenderKey {
        /// The chain id the message names.
        chain_id: u32,
    },
    /// The signature does not verify under the chain's signing key.
    #[error("bad signature on group message")]
    BadSignature,
    /// This iteration was already decrypted (or its key was evicted).
    #[error("duplicate group message (chain {chain_id}, iteration {iteration})")]
    Duplicate {
        /// The chain id.
        chain_id: u32,
        /// The iteration already consumed.
        iteration: u32,
    },
    /// The message would skip more than [`MAX_SKIP`] keys.
    #[error("group message is {jump} iterations ahead; at most {MAX_SKIP} are allowed")]
    TooFarAhead {
        /// How many keys it would skip (saturated at `u32::MAX`).
        jump: u32,
    },
    /// The AEAD check failed: altered ciphertext, or the message attributed
    /// to the wrong sender.
    #[error("group message failed authentication")]
    Tampered,
    /// The sending chain has used every iteration; rotate the sender key.
    #[error("sender key chain exhausted; rotate the sender key")]
    ChainExhausted,
    /// The plaintext is too long for the AEAD.
    #[error("plaintext too long to encrypt")]
    PlaintextTooLong,
    /// The signing key in a distribution message is invalid or small-order.
    #[error("invalid or weak signing key in sender key distribution")]
    InvalidSigningKey,
    /// A distribution reuses a known chain id with a different signing key.
    #[error("sender key distribution reuses chain {chain_id} with another signing key")]
    ChainConflict {
        /// The chain id already held.
        chain_id: u32,
    },
}

/// An opaque group id of 1 to [`MAX_GROUP_ID_LEN`] bytes. Not secret.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(Vec<u8>);

impl GroupId {
    /// Checks the length and copies the bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, SenderKeyError> {
        if bytes.is_empty() || bytes.len() > MAX_GROUP_ID_LEN {
            return Err(SenderKeyError::InvalidGroupId);
        }
        Ok(Self(bytes.to_vec()))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, SenderKeyError> {
        let bytes = r.var_bytes(MAX_GROUP_ID_LEN)?;
        if bytes.is_empty() {
            return Err(DecodeError::Invalid { what: "group id" }.into());
        }
        Ok(Self(bytes.to_vec()))
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GroupId(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}

/// Our own sending chain for one group.
///
/// Holds the chain key and the chain's private signing key, both wiped on
/// drop. **Persist the pickle after every [`encrypt`](Self::encrypt) and
/// before the message leaves the client**: restoring an older state would
/// reuse a (key, nonce) pair.
pub struct SenderKeyState {
    group_id: GroupId,
    chain_id: u32,
    iteration: u32,
    chain_key: Secret32,
    signing: SigningKey,
}

impl SenderKeyState {
    /// A fresh chain: random chain id, random chain key, a new Ed25519
    /// signing key, iteration 0. Rotating a sender key is calling this again
    /// and distributing the result; the client does so whenever a member
    /// leaves or is removed.
    pub fn generate<R: CryptoRng + ?Sized>(group_id: GroupId, rng: &mut R) -> Self {
        let chain_id = rng.next_u32();
        let mut ck = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(ck.as_mut());
        let signing = SigningKey::generate(rng);
        Self {
            group_id,
            chain_id,
            iteration: 0,
            chain_key: Secret32::from_bytes(*ck),
            signing,
        }
    }

    /// The group this chain encrypts for.
    pub fn group_id(&self) -> &GroupId {
        &self.group_id
    }

    /// The chain id, sent in every message.
    pub fn chain_id(&self) -> u32 {
        self.chain_id
    }

    /// The iteration the next message will use.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    /// The distribution message for the chain's current position. A member
    /// who receives it can read messages from this iteration on, not earlier.
    pub fn distribution_message(&self) -> SenderKeyDistribution {
        SenderKeyDistribution {
            group_id: self.group_id.clone(),
            chain_id: self.chain_id,
            iteration: self.iteration,
            chain_key: self.chain_key.clone(),
            signing_public: self.signing.verifying_key(),
        }
    }

    /// Encrypts and signs one group message from `sender` (our own username)
    /// and advances the chain.
    pub fn encrypt(
        &mut self,
        sender: &Username,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SenderKeyError> {
        let next_iteration = self
            .iteration
            .checked_add(1)
            .ok_or(SenderKeyError::ChainExhausted)?;
        let (seed, next_chain_key) = chain_step(&self.chain_key);
        let message = seal(
            &self.group_id,
            self.chain_id,
            self.iteration,
            sender,
            &seed,
            plaintext,
            &self.signing,
        )?;
        self.chain_key = next_chain_key;
        self.iteration = next_iteration;
        Ok(message)
    }

    /// `version(1) ‖ lp(group id) ‖ chain id(u32) ‖ iteration(u32) ‖
    /// chain key(32) ‖ Ed25519 seed(32)`. Secret: seal it before storing.
    pub fn to_pickle(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(1 + 4 + self.group_id.0.len() + 8 + 64);
        w.u8(SENDER_PICKLE_VERSION)
            .var_bytes(&self.group_id.0)
            .u32(self.chain_id)
            .u32(self.iteration)
            .bytes(self.chain_key.expose())
            .bytes(self.signing.as_bytes());
        Zeroizing::new(w.finish())
    }

    /// Restores a pickle made by [`to_pickle`](Self::to_pickle). The public
    /// signing key is derived from the seed, never read from storage.
    pub fn from_pickle(bytes: &[u8]) -> Result<Self, SenderKeyError> {
        let mut r = Reader::new(bytes, "sender key pickle");
        r.version(SENDER_PICKLE_VERSION)?;
        let group_id = GroupId::read(&mut r)?;
        let chain_id = r.u32()?;
        let iteration = r.u32()?;
        let chain_key = Secret32::from_bytes(r.array()?);
        let seed = Zeroizing::new(r.array::<32>()?);
        r.finish()?;
        Ok(Self {
            group_id,
            chain_id,
            iteration,
            chain_key,
            signing: SigningKey::from_bytes(&seed),
        })
    }
}

impl fmt::Debug for SenderKeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderKeyState")
            .field("group_id", &self.group_id)
            .field("chain_id", &self.chain_id)
            .field("iteration", &self.iteration)
            .finish_non_exhaustive()
    }
}

/// A sender's chain as handed to one member over a 1:1 session: group id,
/// chain id, iteration, chain key and the chain's public signing key.
///
/// It carries the chain key: it is wiped on drop, prints without it, and its
/// encoding must only travel inside a 1:1 ratchet message.
#[derive(Clone)]
pub struct SenderKeyDistribution {
    group_id: GroupId,
    chain_id: u32,
    iteration: u32,
    chain_key: Secret32,
    signing_public: VerifyingKey,
}

impl SenderKeyDistribution {
    /// The group this chain is for.
    pub fn group_id(&self) -> &GroupId {
        &self.group_id
    }

    /// The chain id.
    pub fn chain_id(&self) -> u32 {
        self.chain_id
    }

    /// The first iteration the receiver will be able to read.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    /// `version(1) ‖ lp(group id) ‖ chain id(u32) ‖ iteration(u32) ‖
    /// chain key(32) ‖ signing public key(32)`.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::with_capacity(1 + 4 + self.group_id.0.len() + 8 + 64);
        w.u8(DISTRIBUTION_VERSION)
            .var_bytes(&self.group_id.0)
            .u32(self.chain_id)
            .u32(self.iteration)
            .bytes(self.chain_key.expose())
            .bytes(self.signing_public.as_bytes());
        Zeroizing::new(w.finish())
    }

    /// Decodes exactly one distribution message, refusing an invalid or
    /// small-order signing key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SenderKeyError> {
        let mut r = Reader::new(bytes, "sender key distribution");
        r.version(DISTRIBUTION_VERSION)?;
        let group_id = GroupId::read(&mut r)?;
        let chain_id = r.u32()?;
        let iteration = r.u32()?;
        let chain_key = Secret32::from_bytes(r.array()?);
        let signing_public = parse_signing_public(&r.array()?)?;
        r.finish()?;
        Ok(Self {
            group_id,
            chain_id,
            iteration,
            chain_key,
            signing_public,
        })
    }
}

impl fmt::Debug for SenderKeyDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderKeyDistribution")
            .field("group_id", &self.group_id)
            .field("chain_id", &self.chain_id)
            .field("iteration", &self.iteration)
            .finish_non_exhaustive()
    }
}

/// What [`SenderKeyReceiver::add_distribution`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DistributionOutcome {
    /// A new chain was stored (the oldest may have been evicted).
    Added,
    /// The chain was already held at this iteration or later, or close
    /// enough behind to reach it by skipping; nothing changed. A chain is
    /// never moved back to an earlier iteration.
    AlreadyKnown,
    /// The chain was held more than [`MAX_SKIP`] iterations behind and jumped
    /// forward to the distribution's position; messages in between are lost.
    FastForwarded,
}

/// What we know of one sender's chains in one group: up to
/// [`MAX_SENDER_KEY_STATES`] chains, newest first.
pub struct SenderKeyReceiver {
    sender: Username,
    group_id: GroupId,
    chains: VecDeque<ReceiverChain>,
}

impl SenderKeyReceiver {
    /// An empty store for messages from `sender` in `group_id`.
    pub fn new(sender: Username, group_id: GroupId) -> Self {
        Self {
            sender,
            group_id,
            chains: VecDeque::new(),
        }
    }

    /// The sender whose chains these are.
    pub fn sender(&self) -> &Username {
        &self.sender
    }

    /// The group.
    pub fn group_id(&self) -> &GroupId {
        &self.group_id
    }

    /// Ids of the chains held, newest first.
    pub fn chain_ids(&self) -> Vec<u32> {
        self.chains.iter().map(|c| c.chain_id).collect()
    }

    /// Stores a distribution message received from this sender over our 1:1
    /// session. A new chain goes first and the oldest beyond
    /// [`MAX_SENDER_KEY_STATES`] is evicted; a known chain is never rolled
    /// back.
    pub fn add_distribution(
        &mut self,
        dist: &SenderKeyDistribution,
    ) -> Result<DistributionOutcome, SenderKeyError> {
        if dist.group_id != self.group_id {
            return Err(SenderKeyError::GroupMismatch);
        }
        if let Some(chain) = self.chains.iter_mut().find(|c| c.chain_id == dist.chain_id) {
            if chain.signing_public.as_bytes() != dist.signing_public.as_bytes() {
                return Err(SenderKeyError::ChainConflict {
                    chain_id: dist.chain_id,
                });
            }
            if dist.iteration <= chain.iteration || dist.iteration - chain.iteration <= MAX_SKIP {
                return Ok(DistributionOutcome::AlreadyKnown);
            }
            // Far behind: take the later position. Stored skipped keys stay
            // valid, as they are all below the old iteration.
            chain.chain_key = dist.chain_key.clone();
            chain.iteration = dist.iteration;
            return Ok(DistributionOutcome::FastForwarded);
        }
        self.chains.push_front(ReceiverChain {
            chain_id: dist.chain_id,
            signing_public: dist.signing_public,
            iteration: dist.iteration,
            chain_key: dist.chain_key.clone(),
            skipped: VecDeque::new(),
        });
        self.chains.truncate(MAX_SENDER_KEY_STATES);
        Ok(DistributionOutcome::Added)
    }

    /// Checks and decrypts one group message from this sender (see the
    /// module docs for the order of checks). The store changes only if the
    /// message decrypts.
    pub fn decrypt(&mut self, message: &[u8]) -> Result<Vec<u8>, SenderKeyError> {
        let msg = ParsedMessage::parse(message)?;
        if msg.group_id != self.group_id.as_bytes() {
            return Err(SenderKeyError::GroupMismatch);
        }
        let chain = self
            .chains
            .iter_mut()
            .find(|c| c.chain_id == msg.chain_id)
            .ok_or(SenderKeyError::NoSenderKey {
                chain_id: msg.chain_id,
            })?;
        verify_strict(
            &chain.signing_public,
            SigningContext::GroupMessage,
            msg.signed,
            &msg.signature,
        )
        .map_err(|_| SenderKeyError::BadSignature)?;
        let step = chain.key_for(msg.iteration)?;
        let aad = associated_data(&self.group_id, &self.sender, msg.header);
        let plaintext = open(step.seed(), &aad, msg.ciphertext)?;
        chain.commit(step);
        Ok(plaintext)
    }

    /// `version(1) ‖ lp(sender) ‖ lp(group id) ‖ chain count(u32) ‖ chains`,
    /// newest first, each `chain id(u32) ‖ signing public key(32) ‖
    /// iteration(u32) ‖ chain key(32) ‖ skipped count(u32) ‖ (iteration(u32) ‖
    /// message seed(32))*` with skipped iterations strictly increasing.
    /// Secret: seal it before storing.
    pub fn to_pickle(&self) -> Zeroizing<Vec<u8>> {
        let mut w = Writer::default();
        w.u8(RECEIVER_PICKLE_VERSION)
            .var_bytes(self.sender.as_str().as_bytes())
            .var_bytes(&self.group_id.0)
            .u32(len_u32(self.chains.len()));
        for c in &self.chains {
            w.u32(c.chain_id)
                .bytes(c.signing_public.as_bytes())
                .u32(c.iteration)
                .bytes(c.chain_key.expose())
                .u32(len_u32(c.skipped.len()));
            for (n, seed) in &c.skipped {
                w.u32(*n).bytes(seed.expose());
            }
        }
        Zeroizing::new(w.finish())
    }

    /// Restores a pickle made by [`to_pickle`](Self::to_pickle), checking
    /// every bound and invariant, so replay protection survives a restore.
    pub fn from_pickle(bytes: &[u8]) -> Result<Self, SenderKeyError> {
        let mut r = Reader::new(bytes, "sender key receiver pickle");
        r.version(RECEIVER_PICKLE_VERSION)?;
        let name = r.var_bytes(MAX_USERNAME_LEN)?;
        let sender = core::str::from_utf8(name)
            .ok()
            .and_then(|s| Username::parse(s).ok().filter(|u| u.as_str() == s))
            .ok_or(DecodeError::Invalid { what: "sender" })?;
        let group_id = GroupId::read(&mut r)?;
        let count = r.count(MAX_SENDER_KEY_STATES)?;
        let mut chains: VecDeque<ReceiverChain> = VecDeque::with_capacity(count);
        for _ in 0..count {
            let chain_id = r.u32()?;
            if chains.iter().any(|c| c.chain_id == chain_id) {
                return Err(DecodeError::Invalid { what: "chain id" }.into());
            }
            let signing_public = parse_signing_public(&r.array()?)?;
            let iteration = r.u32()?;
            let chain_key = Secret32::from_bytes(r.array()?);
            let n_skipped = r.count(MAX_SKIPPED_KEYS)?;
            let mut skipped: VecDeque<(u32, Secret32)> = VecDeque::with_capacity(n_skipped);
            for _ in 0..n_skipped {
                let n = r.u32()?;
                let ordered = skipped.back().is_none_or(|(prev, _)| *prev < n);
                if !ordered || n >= iteration {
                    return Err(DecodeError::Invalid {
                        what: "skipped iteration",
                    }
                    .into());
                }
                skipped.push_back((n, Secret32::from_bytes(r.array()?)));
            }
            chains.push_back(ReceiverChain {
                chain_id,
                signing_public,
                iteration,
                chain_key,
                skipped,
            });
        }
        r.finish()?;
        Ok(Self {
            sender,
            group_id,
            chains,
        })
    }
}

impl fmt::Debug for SenderKeyReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderKeyReceiver")
            .field("sender", &self.sender)
            .field("group_id", &self.group_id)
            .field("chains", &self.chains)
            .finish()
    }
}

/// One chain of one sender, as a receiver holds it.
struct ReceiverChain {
    chain_id: u32,
    signing_public: VerifyingKey,
    /// The next iteration not yet derived; `chain_key` is the key for it.
    iteration: u32,
    chain_key: Secret32,
    /// Seeds of skipped iterations, oldest first, all below `iteration`.
    skipped: VecDeque<(u32, Secret32)>,
}

/// The key for one message and the state change that decrypting it commits.
enum KeyStep {
    /// A stored skipped key, at this index of `skipped`.
    Skipped { index: usize, seed: Secret32 },
    /// Advance the chain: keys skipped on the way, the message seed, and the
    /// chain's new position.
    Advance {
        skipped: Vec<(u32, Secret32)>,
        seed: Secret32,
        next_chain_key: Secret32,
        next_iteration: u32,
    },
}

impl KeyStep {
    fn seed(&self) -> &Secret32 {
        match self {
            Self::Skipped { seed, .. } | Self::Advance { seed, .. } => seed,
        }
    }
}

impl ReceiverChain {
    /// Derives the key for `n` without touching the chain. The jump bound is
    /// checked before any derivation.
    fn key_for(&self, n: u32) -> Result<KeyStep, SenderKeyError> {
        if n < self.iteration {
            let index = self.skipped.iter().position(|(i, _)| *i == n).ok_or(
                SenderKeyError::Duplicate {
                    chain_id: self.chain_id,
                    iteration: n,
                },
            )?;
            let seed = self.skipped[index].1.clone();
            return Ok(KeyStep::Skipped { index, seed });
        }
        let jump = n - self.iteration;
        let next_iteration = n.checked_add(1);
        let next_iteration = match next_iteration {
            Some(next) if jump <= MAX_SKIP => next,
            _ => return Err(SenderKeyError::TooFarAhead { jump }),
        };
        let mut skipped = Vec::with_capacity(jump as usize);
        let mut ck = self.chain_key.clone();
        for i in self.iteration..n {
            let (seed, next) = chain_step(&ck);
            skipped.push((i, seed));
            ck = next;
        }
        let (seed, next_chain_key) = chain_step(&ck);
        Ok(KeyStep::Advance {
            skipped,
            seed,
            next_chain_key,
            next_iteration,
        })
    }

    /// Applies a step whose message decrypted.
    fn commit(&mut self, step: KeyStep) {
        match step {
            KeyStep::Skipped { index, .. } => {
                self.skipped.remove(index);
            }
            KeyStep::Advance {
                skipped,
                next_chain_key,
                next_iteration,
                ..
            } => {
                self.skipped.extend(skipped);
                while self.skipped.len() > MAX_SKIPPED_KEYS {
                    self.skipped.pop_front();
                }
                self.chain_key = next_chain_key;
                self.iteration = next_iteration;
            }
        }
    }
}

impl fmt::Debug for ReceiverChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverChain")
            .field("chain_id", &self.chain_id)
            .field("iteration", &self.iteration)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

/// A group message split into its fields; every slice borrows the input.
struct ParsedMessage<'a> {
    group_id: &'a [u8],
    chain_id: u32,
    iteration: u32,
    header: &'a [u8],
    ciphertext: &'a [u8],
    /// Everything the signature covers: header and ciphertext.
    signed: &'a [u8],
    signature: [u8; SIGNATURE_LEN],
}

impl<'a> ParsedMessage<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, SenderKeyError> {
        let mut r = Reader::new(bytes, "group message");
        r.version(GROUP_MESSAGE_VERSION)?;
        let kind = r.u8()?;
        if kind != GROUP_MESSAGE_TYPE {
            return Err(SenderKeyError::NotGroupMessage(kind));
        }
        let group_id = r.var_bytes(MAX_GROUP_ID_LEN)?;
        let chain_id = r.u32()?;
        let iteration = r.u32()?;
        let header_len = bytes.len() - r.remaining();
        let body_len = r
            .remaining()
            .checked_sub(SIGNATURE_LEN)
            .filter(|len| *len >= TAG_LEN)
            .ok_or(DecodeError::Truncated {
                what: "group message",
                needed: (TAG_LEN + SIGNATURE_LEN).saturating_sub(r.remaining()),
            })?;
        let ciphertext = r.take(body_len)?;
        let signature = r.array()?;
        r.finish()?;
        let signed_len = header_len + body_len;
        Ok(Self {
            group_id,
            chain_id,
            iteration,
            header: &bytes[..header_len],
            ciphertext,
            signed: &bytes[..signed_len],
            signature,
        })
    }
}

/// Parses a signing key from a distribution, refusing small-order points.
fn parse_signing_public(bytes: &[u8; SIGNING_PUBLIC_LEN]) -> Result<VerifyingKey, SenderKeyError> {
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| SenderKeyError::InvalidSigningKey)?;
    if key.is_weak() {
        return Err(SenderKeyError::InvalidSigningKey);
    }
    Ok(key)
}

/// `version ‖ type ‖ lp(group id) ‖ chain id ‖ iteration`.
fn header(group_id: &GroupId, chain_id: u32, iteration: u32) -> Vec<u8> {
    let mut w = Writer::with_capacity(2 + 4 + group_id.0.len() + 8);
    w.u8(GROUP_MESSAGE_VERSION)
        .u8(GROUP_MESSAGE_TYPE)
        .var_bytes(&group_id.0)
        .u32(chain_id)
        .u32(iteration);
    w.finish()
}

/// `"messenger/1 group-ad" ‖ lp(group id) ‖ lp(sender) ‖ header`.
fn associated_data(group_id: &GroupId, sender: &Username, header: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(GROUP_AD_LABEL.len() + 8 + 96 + header.len());
    w.bytes(GROUP_AD_LABEL)
        .var_bytes(&group_id.0)
        .var_bytes(sender.as_str().as_bytes())
        .bytes(header);
    w.finish()
}

/// Builds a complete, signed group message for one message seed.
fn seal(
    group_id: &GroupId,
    chain_id: u32,
    iteration: u32,
    sender: &Username,
    seed: &Secret32,
    plaintext: &[u8],
    signing: &SigningKey,
) -> Result<Vec<u8>, SenderKeyError> {
    let mut message = header(group_id, chain_id, iteration);
    let aad = associated_data(group_id, sender, &message);
    let k = aead_key(seed, MESSAGE_KEY_INFO);
    let cipher = ChaCha20Poly1305::new(&Key::from(*k.key));
    if plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(SenderKeyError::PlaintextTooLong);
    }
    // Padded to buckets like 1:1 messages, so sizes leak only coarsely.
    let mut body = Vec::with_capacity(padded_len(plaintext.len()) + 16);
    body.extend_from_slice(plaintext);
    pad_in_place(&mut body, 0);
    cipher
        .encrypt_in_place(&Nonce::from(k.nonce), &aad, &mut body)
        .map_err(|_| SenderKeyError::PlaintextTooLong)?;
    message.extend_from_slice(&body);
    let signature = sign_with(signing, SigningContext::GroupMessage, &message);
    message.extend_from_slice(&signature);
    Ok(message)
}

/// Decrypts a ciphertext with the key and nonce from `seed`.
fn open(seed: &Secret32, aad: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, SenderKeyError> {
    let k = aead_key(seed, MESSAGE_KEY_INFO);
    let cipher = ChaCha20Poly1305::new(&Key::from(*k.key));
    let mut buf = ciphertext.to_vec();
    cipher
        .decrypt_in_place(&Nonce::from(k.nonce), aad, &mut buf)
        .map_err(|_| SenderKeyError::Tampered)?;
    let len = unpadded_len(&buf).ok_or(SenderKeyError::Tampered)?;
    buf.truncate(len);
    Ok(buf)
}

/// A collection length as `u32`; every collection here is bounded far below.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use base64::Engine;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;

    use super::*;

    fn rng(seed: u64) -> StdRng {
        StdRng::seed_from_u64(seed)
    }

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn gid(s: &str) -> GroupId {
        GroupId::new(s.as_bytes()).unwrap()
    }

    /// Alice's sender state and a receiver for her in `group` that has her distribution.
    fn pair(seed: u64, group: &str) -> (SenderKeyState, SenderKeyReceiver) {
        let alice = SenderKeyState::generate(gid(group), &mut rng(seed));
        let mut rx = SenderKeyReceiver::new(name("alice"), gid(group));
        let dist =
            SenderKeyDistribution::from_bytes(&alice.distribution_message().to_bytes()).unwrap();
        assert_eq!(rx.add_distribution(&dist), Ok(DistributionOutcome::Added));
        (alice, rx)
    }

    #[test]
    fn round_trip() {
        let (mut alice, mut rx) = pair(1, "family");
        for i in 0..10u32 {
            let pt = format!("message {i}");
            let msg = alice.encrypt(&name("alice"), pt.as_bytes()).unwrap();
            assert_eq!(rx.decrypt(&msg).unwrap(), pt.as_bytes());
        }
        assert_eq!(alice.iteration(), 10);
        // An empty plaintext works too.
        let msg = alice.encrypt(&name("alice"), b"").unwrap();
        assert_eq!(rx.decrypt(&msg).unwrap(), b"");
    }

    #[test]
    fn message_layout() {
        let (mut alice, _) = pair(2, "g");
        let msg = alice.encrypt(&name("alice"), b"hello").unwrap();
        assert_eq!(msg[0], GROUP_MESSAGE_VERSION);
        assert_eq!(msg[1], GROUP_MESSAGE_TYPE);
        assert_eq!(&msg[2..6], &1u32.to_be_bytes());
        assert_eq!(msg[6], b'g');
        assert_eq!(&msg[7..11], &alice.chain_id().to_be_bytes());
        assert_eq!(&msg[11..15], &0u32.to_be_bytes());
        // The 5-byte plaintext is padded to one 256-byte bucket.
        assert_eq!(msg.len(), 15 + 256 + TAG_LEN + SIGNATURE_LEN);
        let too_long = vec![0u8; MAX_PLAINTEXT_LEN + 1];
        assert!(matches!(
            alice.encrypt(&name("alice"), &too_long),
            Err(SenderKeyError::PlaintextTooLong)
        ));
    }

    #[test]
    fn distribution_encoding_is_strict() {
        let alice = SenderKeyState::generate(gid("g"), &mut rng(3));
        let bytes = alice.distribution_message().to_bytes();
        assert_eq!(bytes.len(), 1 + 4 + 1 + 4 + 4 + 32 + 32);
        let d = SenderKeyDistribution::from_bytes(&bytes).unwrap();
        assert_eq!(*d.to_bytes(), *bytes);
        assert_eq!(d.chain_id(), alice.chain_id());
        assert_eq!(d.iteration(), 0);
        assert_eq!(d.group_id(), &gid("g"));
        assert!(SenderKeyDistribution::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(matches!(
            SenderKeyDistribution::from_bytes(&long),
            Err(SenderKeyError::Decode(DecodeError::Trailing { .. }))
        ));
        let mut v = bytes.to_vec();
        v[0] = 2;
        assert!(matches!(
            SenderKeyDistribution::from_bytes(&v),
            Err(SenderKeyError::Decode(DecodeError::Version { .. }))
        ));
        // A small-order signing key (the identity point) is refused.
        let mut weak = bytes.to_vec();
        let n = weak.len();
        weak[n - 32..].copy_from_slice(&[0; 32]);
        weak[n - 32] = 1;
        assert_eq!(
            SenderKeyDistribution::from_bytes(&weak).unwrap_err(),
            SenderKeyError::InvalidSigningKey
        );
        // Empty and over-long group ids.
        assert_eq!(GroupId::new(b""), Err(SenderKeyError::InvalidGroupId));
        assert!(GroupId::new(&[7; MAX_GROUP_ID_LEN]).is_ok());
        assert_eq!(
            GroupId::new(&[7; MAX_GROUP_ID_LEN + 1]),
            Err(SenderKeyError::InvalidGroupId)
        );
        let mut empty_gid = vec![DISTRIBUTION_VERSION, 0, 0, 0, 0];
        empty_gid.extend_from_slice(&bytes[6..]);
        assert!(SenderKeyDistribution::from_bytes(&empty_gid).is_err());
    }

    /// T-19: a removed member keeps everything it had before the rotation and
    /// still reads none of the 100 messages after it.
    #[test]
    fn t19_removed_member_cannot_read_after_rotation() {
        let group = gid("team");
        let mut alice = SenderKeyState::generate(group.clone(), &mut rng(19));
        let mut mallory = SenderKeyReceiver::new(name("alice"), group.clone());
        mallory
            .add_distribution(&alice.distribution_message())
            .unwrap();
        for i in 0..20 {
            let m = alice.encrypt(&name("alice"), &[i; 8]).unwrap();
            assert_eq!(mallory.decrypt(&m).unwrap(), [i; 8]);
        }
        let old_pickle = alice.to_pickle();
        let old_dist = alice.distribution_message();

        // Mallory is removed: Alice rotates and tells only the remaining members.
        let mut rotated = SenderKeyState::generate(group.clone(), &mut rng(1919));
        assert_ne!(rotated.chain_id(), alice.chain_id());
        let mut bob = SenderKeyReceiver::new(name("alice"), group.clone());
        bob.add_distribution(&rotated.distribution_message())
            .unwrap();
        let after: Vec<Vec<u8>> = (0..100u8)
            .map(|i| rotated.encrypt(&name("alice"), &[i; 16]).unwrap())
            .collect();

        let mut read = 0;
        for m in &after {
            // Everything Mallory held: her receiver store, Alice's old
            // chain (as if she had stolen Alice's old sender state), and a
            // receiver primed with the old chain relabelled to the new id.
            if mallory.decrypt(m).is_ok() {
                read += 1;
            }
            let mut relabelled = m.clone();
            relabelled[7..11].copy_from_slice(&old_dist.chain_id().to_be_bytes());
            if mallory.decrypt(&relabelled).is_ok() {
                read += 1;
            }
            let mut forced = SenderKeyReceiver::new(name("alice"), group.clone());
            let stolen = SenderKeyState::from_pickle(&old_pickle).unwrap();
            let mut d = stolen.distribution_message();
            d.chain_id = rotated.chain_id();
            d.signing_public = rotated.distribution_message().signing_public;
            d.iteration = 0;
            forced.add_distribution(&d).unwrap();
            if forced.decrypt(m).is_ok() {
                read += 1;
            }
        }
        assert_eq!(read, 0, "removed member read {read} post-rotation messages");
        // The members who stayed read all 100.
        let ok = after.iter().filter(|m| bob.decrypt(m).is_ok()).count();
        assert_eq!(ok, 100);
    }

    /// T-20: Bob holds Alice's chain key and forges a message "from Alice".
    /// The AEAD would accept it; the signature check refuses it first.
    #[test]
    fn t20_forgery_rejected_at_signature_before_decryption() {
        let group = gid("team");
        let mut alice = SenderKeyState::generate(group.clone(), &mut rng(20));
        let alices_dist = alice.distribution_message();
        let mut carol = SenderKeyReceiver::new(name("alice"), group.clone());
        carol.add_distribution(&alices_dist).unwrap();
        let before = carol.to_pickle();

        // Bob derives Alice's next message key from her chain key and signs
        // with his own chain signing key.
        let bob = SenderKeyState::generate(group.clone(), &mut rng(21));
        let (seed, _) = chain_step(&alices_dist.chain_key);
        let forged = seal(
            &group,
            alices_dist.chain_id,
            0,
            &name("alice"),
            &seed,
            b"send bob the money",
            &bob.signing,
        )
        .unwrap();

        // Observable: the ciphertext itself is valid under the AEAD ...
        let parsed = ParsedMessage::parse(&forged).unwrap();
        let aad = associated_data(&group, &name("alice"), parsed.header);
        assert_eq!(
            open(&seed, &aad, parsed.ciphertext).unwrap(),
            b"send bob the money"
        );
        // ... yet the receiver answers BadSignature, not Tampered, and keeps
        // its state: the key was never derived into the store.
        assert_eq!(carol.decrypt(&forged), Err(SenderKeyError::BadSignature));
        assert_eq!(*carol.to_pickle(), *before);
        // Alice's genuine message at that iteration still decrypts.
        let genuine = alice.encrypt(&name("alice"), b"hi").unwrap();
        assert_eq!(carol.decrypt(&genuine).unwrap(), b"hi");
    }

    /// T-21: 500 messages in random order, 20 % before the distribution
    /// message; held messages are retried when it arrives.
    #[test]
    fn t21_out_of_order_with_late_distribution() {
        let group = gid("lobby");
        let mut alice = SenderKeyState::generate(group.clone(), &mut rng(210));
        let dist =
            SenderKeyDistribution::from_bytes(&alice.distribution_message().to_bytes()).unwrap();
        let mut msgs: Vec<(u32, Vec<u8>)> = (0..500u32)
            .map(|i| {
                let m = alice
                    .encrypt(&name("alice"), format!("m{i}").as_bytes())
                    .unwrap();
                (i, m)
            })
            .collect();
        msgs.shuffle(&mut rng(211));

        let mut rx = SenderKeyReceiver::new(name("alice"), group);
        let mut held: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut seen: HashMap<u32, usize> = HashMap::new();
        let mut deliver =
            |rx: &mut SenderKeyReceiver, held: &mut Vec<(u32, Vec<u8>)>, i: u32, m: Vec<u8>| {
                match rx.decrypt(&m) {
                    Ok(pt) => {
                        assert_eq!(pt, format!("m{i}").as_bytes());
                        *seen.entry(i).or_default() += 1;
                    }
                    Err(SenderKeyError::NoSenderKey { .. }) => held.push((i, m)),
                    Err(e) => panic!("message {i}: {e}"),
                }
            };
        for (k, (i, m)) in msgs.into_iter().enumerate() {
            if k == 100 {
                assert_eq!(held.len(), 100);
                rx.add_distribution(&dist).unwrap();
                for (i, m) in std::mem::take(&mut held) {
                    deliver(&mut rx, &mut held, i, m);
                }
                assert!(held.is_empty());
            }
            deliver(&mut rx, &mut held, i, m);
        }
        assert!(held.is_empty(), "{} messages dropped", held.len());
        assert_eq!(seen.len(), 500);
        assert!(seen.values().all(|&n| n == 1));
    }

    #[test]
    fn skip_bound_edge_and_one_past() {
        let (mut alice, mut rx) = pair(4, "g");
        let msgs: Vec<Vec<u8>> = (0..=MAX_SKIP + 1)
            .map(|i| alice.encrypt(&name("alice"), &i.to_be_bytes()).unwrap())
            .collect();
        // One past the bound: refused, state unchanged.
        let before = rx.to_pickle();
        assert_eq!(
            rx.decrypt(&msgs[MAX_SKIP as usize + 1]),
            Err(SenderKeyError::TooFarAhead { jump: MAX_SKIP + 1 })
        );
        assert_eq!(*rx.to_pickle(), *before);
        // Exactly at the bound: fine, and every skipped one still decrypts.
        assert_eq!(
            rx.decrypt(&msgs[MAX_SKIP as usize]).unwrap(),
            MAX_SKIP.to_be_bytes()
        );
        assert_eq!(rx.chains[0].skipped.len(), MAX_SKIP as usize);
        for (i, m) in msgs.iter().enumerate().take(MAX_SKIP as usize) {
            assert_eq!(rx.decrypt(m).unwrap(), (i as u32).to_be_bytes());
        }
        assert!(rx.chains[0].skipped.is_empty());
        assert_eq!(
            rx.decrypt(&msgs[MAX_SKIP as usize + 1]).unwrap(),
            (MAX_SKIP + 1).to_be_bytes()
        );
    }

    #[test]
    fn skipped_keys_are_capped_oldest_evicted() {
        let (mut alice, mut rx) = pair(5, "g");
        let msgs: Vec<Vec<u8>> = (0..2 * MAX_SKIP + 2)
            .map(|i| alice.encrypt(&name("alice"), &i.to_be_bytes()).unwrap())
            .collect();
        rx.decrypt(&msgs[MAX_SKIP as usize]).unwrap();
        rx.decrypt(&msgs[2 * MAX_SKIP as usize + 1]).unwrap();
        assert_eq!(rx.chains[0].skipped.len(), MAX_SKIPPED_KEYS);
        // The oldest skipped keys were evicted: those messages are now lost.
        assert!(matches!(
            rx.decrypt(&msgs[0]),
            Err(SenderKeyError::Duplicate { iteration: 0, .. })
        ));
        assert!(rx.decrypt(&msgs[2 * MAX_SKIP as usize]).is_ok());
    }

    #[test]
    fn every_bit_flip_rejected_state_unchanged() {
        let (mut alice, mut rx) = pair(6, "flip-group");
        // Advance so the receiver holds skipped keys too.
        let m0 = alice.encrypt(&name("alice"), b"zero").unwrap();
        let _m1 = alice.encrypt(&name("alice"), b"one").unwrap();
        let msg = alice.encrypt(&name("alice"), &[0x5a; 64]).unwrap();
        rx.decrypt(&m0).unwrap();
        let before = rx.to_pickle();
        let mut kinds: HashMap<&'static str, usize> = HashMap::new();
        for bit in 0..msg.len() * 8 {
            let mut m = msg.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            let kind = match rx.decrypt(&m) {
                Ok(_) => panic!("bit {bit} accepted"),
                Err(SenderKeyError::Decode(_)) => "decode",
                Err(SenderKeyError::NotGroupMessage(_)) => "type",
                Err(SenderKeyError::GroupMismatch) => "group",
                Err(SenderKeyError::NoSenderKey { .. }) => "chain",
                Err(SenderKeyError::BadSignature) => "signature",
                Err(e) => panic!("bit {bit}: unexpected {e}"),
            };
            *kinds.entry(kind).or_default() += 1;
            assert_eq!(*rx.to_pickle(), *before, "bit {bit} changed the state");
        }
        assert_eq!(kinds.values().sum::<usize>(), msg.len() * 8);
        assert_eq!(kinds["chain"], 32);
        // Truncations and extensions are refused as well.
        for len in 0..msg.len() {
            assert!(rx.decrypt(&msg[..len]).is_err());
        }
        let mut long = msg.clone();
        long.push(0);
        assert!(rx.decrypt(&long).is_err());
        assert_eq!(*rx.to_pickle(), *before);
        assert_eq!(rx.decrypt(&msg).unwrap(), [0x5a; 64]);
    }

    #[test]
    fn duplicates_rejected_also_after_pickle_restore() {
        let (mut alice, mut rx) = pair(7, "g");
        let msgs: Vec<Vec<u8>> = (0..20u8)
            .map(|i| alice.encrypt(&name("alice"), &[i]).unwrap())
            .collect();
        // Decrypt the even ones (out of order leaves skipped keys for the odd).
        for m in msgs.iter().step_by(2).rev() {
            rx.decrypt(m).unwrap();
        }
        for m in msgs.iter().step_by(2) {
            assert!(matches!(
                rx.decrypt(m),
                Err(SenderKeyError::Duplicate { .. })
            ));
        }
        let pickle = rx.to_pickle();
        let mut restored = SenderKeyReceiver::from_pickle(&pickle).unwrap();
        assert_eq!(*restored.to_pickle(), *pickle);
        for m in msgs.iter().step_by(2) {
            assert!(matches!(
                restored.decrypt(m),
                Err(SenderKeyError::Duplicate { .. })
            ));
        }
        // The odd ones decrypt once after the restore, then are duplicates.
        for (i, m) in msgs.iter().enumerate().skip(1).step_by(2) {
            assert_eq!(restored.decrypt(m).unwrap(), [i as u8]);
            assert!(matches!(
                restored.decrypt(m),
                Err(SenderKeyError::Duplicate { .. })
            ));
        }
    }

    #[test]
    fn sender_pickle_round_trip_continues_chain() {
        let (mut alice, mut rx) = pair(8, "g");
        rx.decrypt(&alice.encrypt(&name("alice"), b"a").unwrap())
            .unwrap();
        let pickle = alice.to_pickle();
        let mut restored = SenderKeyState::from_pickle(&pickle).unwrap();
        assert_eq!(*restored.to_pickle(), *pickle);
        assert_eq!(restored.iteration(), 1);
        let m = restored.encrypt(&name("alice"), b"b").unwrap();
        assert_eq!(rx.decrypt(&m).unwrap(), b"b");
        // Deterministic: the original state would produce the same bytes.
        assert_eq!(alice.encrypt(&name("alice"), b"b").unwrap(), m);
        assert!(SenderKeyState::from_pickle(&pickle[..pickle.len() - 1]).is_err());
        let mut long = pickle.to_vec();
        long.push(1);
        assert!(SenderKeyState::from_pickle(&long).is_err());
    }

    #[test]
    fn receiver_pickle_rejects_broken_invariants() {
        let (mut alice, mut rx) = pair(9, "g");
        let m: Vec<Vec<u8>> = (0..3u8)
            .map(|i| alice.encrypt(&name("alice"), &[i]).unwrap())
            .collect();
        rx.decrypt(&m[2]).unwrap();
        let good = rx.to_pickle();
        SenderKeyReceiver::from_pickle(&good).unwrap();
        // Layout: 1 ‖ lp("alice")=9 ‖ lp("g")=5 ‖ count 4 ‖ chain id 4 ‖ pub 32 ‖
        // iteration 4 ‖ ck 32 ‖ skipped count 4 ‖ (4 ‖ 32) × 2.
        let first_skipped = 1 + 9 + 5 + 4 + 4 + 32 + 4 + 32 + 4;
        // Skipped iterations out of order.
        let mut b = good.to_vec();
        b[first_skipped + 3] = 1;
        assert!(SenderKeyReceiver::from_pickle(&b).is_err());
        // A skipped iteration at or above the chain's iteration.
        let mut b = good.to_vec();
        b[first_skipped + 36 + 3] = 3;
        assert!(SenderKeyReceiver::from_pickle(&b).is_err());
        // Too many chains claimed.
        let mut b = good.to_vec();
        b[15 + 3] = (MAX_SENDER_KEY_STATES + 1) as u8;
        assert!(SenderKeyReceiver::from_pickle(&b).is_err());
        // A sender name that is not a normalised username.
        let mut b = good.to_vec();
        b[5] = b'A';
        assert!(SenderKeyReceiver::from_pickle(&b).is_err());
        // Strict length.
        assert!(SenderKeyReceiver::from_pickle(&good[..good.len() - 1]).is_err());
        let mut b = good.to_vec();
        b.push(0);
        assert!(SenderKeyReceiver::from_pickle(&b).is_err());
    }

    #[test]
    fn reattribution_to_another_sender_or_group_fails() {
        let (mut alice, _) = pair(10, "g1");
        let dist = alice.distribution_message();
        let msg = alice.encrypt(&name("alice"), b"from alice").unwrap();

        // Bob re-announces Alice's chain as his own; her message, delivered
        // as if from Bob, verifies but fails the AEAD (the sender is in the AD).
        let mut as_bob = SenderKeyReceiver::new(name("bob"), gid("g1"));
        as_bob.add_distribution(&dist).unwrap();
        let before = as_bob.to_pickle();
        assert_eq!(as_bob.decrypt(&msg), Err(SenderKeyError::Tampered));
        assert_eq!(*as_bob.to_pickle(), *before);

        // Another group: refused by id, and a rewritten id breaks the signature.
        let mut g2 = SenderKeyReceiver::new(name("alice"), gid("g2"));
        let mut d2 = dist.clone();
        d2.group_id = gid("g2");
        g2.add_distribution(&d2).unwrap();
        assert_eq!(g2.decrypt(&msg), Err(SenderKeyError::GroupMismatch));
        // "g1" -> "g2" in the header: same length, last byte changed.
        let mut rewritten = msg.clone();
        rewritten[7] = b'2';
        assert_eq!(g2.decrypt(&rewritten), Err(SenderKeyError::BadSignature));
        // A distribution for another group is refused by the store.
        let mut rx = SenderKeyReceiver::new(name("alice"), gid("g2"));
        assert_eq!(
            rx.add_distribution(&dist),
            Err(SenderKeyError::GroupMismatch)
        );

        // A 1:1 ratchet type byte is not a group message.
        let mut other = msg.clone();
        other[1] = 0x01;
        let mut rx = SenderKeyReceiver::new(name("alice"), gid("g1"));
        rx.add_distribution(&dist).unwrap();
        assert_eq!(rx.decrypt(&other), Err(SenderKeyError::NotGroupMessage(1)));
    }

    #[test]
    fn distribution_never_rolls_back_and_chains_are_bounded() {
        let (mut alice, mut rx) = pair(11, "g");
        let d0 = alice.distribution_message();
        let msgs: Vec<Vec<u8>> = (0..5u8)
            .map(|i| alice.encrypt(&name("alice"), &[i]).unwrap())
            .collect();
        for m in &msgs {
            rx.decrypt(m).unwrap();
        }
        // Re-sending the old distribution does not reopen consumed iterations.
        assert_eq!(
            rx.add_distribution(&d0),
            Ok(DistributionOutcome::AlreadyKnown)
        );
        assert!(matches!(
            rx.decrypt(&msgs[0]),
            Err(SenderKeyError::Duplicate { .. })
        ));
        // A later distribution within reach changes nothing either.
        assert_eq!(
            rx.add_distribution(&alice.distribution_message()),
            Ok(DistributionOutcome::AlreadyKnown)
        );
        // Same chain id, different key: refused.
        let mut conflicting = d0.clone();
        conflicting.signing_public = SenderKeyState::generate(gid("g"), &mut rng(99))
            .distribution_message()
            .signing_public;
        assert_eq!(
            rx.add_distribution(&conflicting),
            Err(SenderKeyError::ChainConflict {
                chain_id: d0.chain_id()
            })
        );
        // Far ahead: fast-forward, and the message there decrypts.
        for _ in 0..MAX_SKIP + 10 {
            alice.encrypt(&name("alice"), b"").unwrap();
        }
        assert_eq!(
            rx.add_distribution(&alice.distribution_message()),
            Ok(DistributionOutcome::FastForwarded)
        );
        let m = alice.encrypt(&name("alice"), b"later").unwrap();
        assert_eq!(rx.decrypt(&m).unwrap(), b"later");

        // Rotations: only the newest MAX_SENDER_KEY_STATES chains are kept.
        let mut ids = vec![alice.chain_id()];
        for s in 0..MAX_SENDER_KEY_STATES as u64 {
            let next = SenderKeyState::generate(gid("g"), &mut rng(1100 + s));
            ids.push(next.chain_id());
            rx.add_distribution(&next.distribution_message()).unwrap();
        }
        assert_eq!(rx.chain_ids().len(), MAX_SENDER_KEY_STATES);
        assert!(!rx.chain_ids().contains(&ids[0]));
        assert_eq!(rx.chain_ids()[0], *ids.last().unwrap());
        let m = alice.encrypt(&name("alice"), b"evicted").unwrap();
        assert_eq!(
            rx.decrypt(&m),
            Err(SenderKeyError::NoSenderKey { chain_id: ids[0] })
        );
    }

    #[test]
    fn exhausted_chain_refuses_to_encrypt() {
        let (mut alice, _) = pair(12, "g");
        alice.iteration = u32::MAX;
        assert_eq!(
            alice.encrypt(&name("alice"), b"x"),
            Err(SenderKeyError::ChainExhausted)
        );
        assert_eq!(alice.iteration(), u32::MAX);
    }

    #[test]
    fn debug_shows_no_secret_bytes() {
        let (mut alice, mut rx) = pair(13, "g");
        let m0 = alice.encrypt(&name("alice"), b"0").unwrap();
        let m1 = alice.encrypt(&name("alice"), b"1").unwrap();
        rx.decrypt(&m1).unwrap();
        let _ = m0;
        let dist = alice.distribution_message();
        let mut secrets: Vec<Vec<u8>> = vec![
            alice.chain_key.expose().to_vec(),
            alice.signing.as_bytes().to_vec(),
            dist.chain_key.expose().to_vec(),
            rx.chains[0].chain_key.expose().to_vec(),
            rx.chains[0].skipped[0].1.expose().to_vec(),
        ];
        secrets.push(dist.to_bytes()[10..42].to_vec());
        let shown = [
            format!("{alice:?}"),
            format!("{alice:#?}"),
            format!("{dist:?}"),
            format!("{rx:?}"),
            format!("{rx:#?}"),
        ];
        for s in &shown {
            for secret in &secrets {
                let b64 = base64::engine::general_purpose::STANDARD;
                let b64u = base64::engine::general_purpose::STANDARD_NO_PAD;
                for needle in [
                    hex::encode(secret),
                    hex::encode_upper(secret),
                    b64.encode(secret),
                    b64u.encode(secret),
                    format!("{:?}", &secret[..8]),
                ] {
                    assert!(!s.contains(&needle), "{s} shows {needle}");
                }
            }
        }
        assert!(shown[0].starts_with("SenderKeyState {"));
        assert!(shown[2].starts_with("SenderKeyDistribution {"));
    }

    /// One step of a group conversation in the property test.
    #[derive(Debug, Clone)]
    enum Op {
        Send(usize),
        Rotate(usize),
    }

    /// Something the network delivers to the one receiver we watch.
    enum Delivery {
        Dist(usize, Zeroizing<Vec<u8>>),
        Msg(usize, u32, Vec<u8>),
    }

    const SENDERS: [&str; 3] = ["alice", "bob", "carol"];

    fn run_group(ops: &[Op], order_seed: u64, drop_mask: &[bool]) {
        let group = gid("prop-group");
        let mut r = rng(order_seed);
        let mut senders: Vec<SenderKeyState> = (0..SENDERS.len())
            .map(|_| SenderKeyState::generate(group.clone(), &mut r))
            .collect();
        let mut rotations = [0usize; SENDERS.len()];
        let mut deliveries: Vec<Delivery> = senders
            .iter()
            .enumerate()
            .map(|(s, st)| Delivery::Dist(s, st.distribution_message().to_bytes()))
            .collect();
        let mut plaintexts: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut next_id = 0u32;
        for op in ops {
            match *op {
                Op::Send(s) => {
                    let pt = format!("{} #{next_id}", SENDERS[s]).into_bytes();
                    let m = senders[s].encrypt(&name(SENDERS[s]), &pt).unwrap();
                    plaintexts.insert(next_id, pt);
                    deliveries.push(Delivery::Msg(s, next_id, m));
                    next_id += 1;
                }
                // At most MAX_SENDER_KEY_STATES - 1 rotations per sender, so
                // no chain with messages in flight is evicted.
                Op::Rotate(s) if rotations[s] + 1 < MAX_SENDER_KEY_STATES => {
                    rotations[s] += 1;
                    senders[s] = SenderKeyState::generate(group.clone(), &mut r);
                    let dist = senders[s].distribution_message().to_bytes();
                    deliveries.push(Delivery::Dist(s, dist));
                }
                Op::Rotate(_) => {}
            }
        }
        deliveries.shuffle(&mut r);

        let mut rxs: Vec<SenderKeyReceiver> = SENDERS
            .iter()
            .map(|s| SenderKeyReceiver::new(name(s), group.clone()))
            .collect();
        let mut held: Vec<(usize, u32, Vec<u8>)> = Vec::new();
        let mut dropped: Vec<(usize, u32, Vec<u8>)> = Vec::new();
        let mut all: Vec<(usize, u32, Vec<u8>)> = Vec::new();
        let mut got: HashSet<u32> = HashSet::new();
        let try_msg = |rxs: &mut Vec<SenderKeyReceiver>,
                       held: &mut Vec<(usize, u32, Vec<u8>)>,
                       got: &mut HashSet<u32>,
                       (s, id, m): (usize, u32, Vec<u8>)| {
            match rxs[s].decrypt(&m) {
                Ok(pt) => {
                    assert_eq!(pt, plaintexts[&id]);
                    assert!(got.insert(id), "message {id} decrypted twice");
                }
                Err(SenderKeyError::NoSenderKey { .. }) => held.push((s, id, m)),
                Err(e) => panic!("message {id} from {}: {e}", SENDERS[s]),
            }
        };
        let mut k = 0;
        for d in deliveries {
            match d {
                Delivery::Dist(s, dist) => {
                    let dist = SenderKeyDistribution::from_bytes(&dist).unwrap();
                    assert_eq!(
                        rxs[s].add_distribution(&dist),
                        Ok(DistributionOutcome::Added)
                    );
                    let (retry, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut held)
                        .into_iter()
                        .partition(|h| h.0 == s);
                    held = keep;
                    for h in retry {
                        try_msg(&mut rxs, &mut held, &mut got, h);
                    }
                }
                Delivery::Msg(s, id, m) => {
                    all.push((s, id, m.clone()));
                    if drop_mask.get(k).copied().unwrap_or(false) {
                        dropped.push((s, id, m));
                    } else {
                        try_msg(&mut rxs, &mut held, &mut got, (s, id, m));
                    }
                    k += 1;
                }
            }
        }
        assert!(held.is_empty(), "{} messages never decrypted", held.len());
        assert_eq!(got.len() + dropped.len(), plaintexts.len());
        // Round trip every receiver through its pickle, then: dropped
        // messages arriving late still decrypt once; everything else is a
        // duplicate.
        let mut rxs: Vec<SenderKeyReceiver> = rxs
            .iter()
            .map(|rx| SenderKeyReceiver::from_pickle(&rx.to_pickle()).unwrap())
            .collect();
        for h in dropped {
            try_msg(&mut rxs, &mut held, &mut got, h);
        }
        assert!(held.is_empty());
        assert_eq!(got.len(), plaintexts.len());
        for (s, id, m) in all {
            assert!(
                matches!(rxs[s].decrypt(&m), Err(SenderKeyError::Duplicate { .. })),
                "replay of {id} accepted"
            );
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            12 => (0..SENDERS.len()).prop_map(Op::Send),
            1 => (0..SENDERS.len()).prop_map(Op::Rotate),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Several senders, rotations, random delivery order (distribution
        /// messages included), ~20 % drops delivered late.
        #[test]
        fn group_interleavings(
            ops in prop::collection::vec(op(), 0..150),
            seed in any::<u64>(),
            drops in prop::collection::vec(prop::bool::weighted(0.2), 150),
        ) {
            run_group(&ops, seed, &drops);
        }
    }
}

//! The Double Ratchet (Signal, "The Double Ratchet Algorithm", rev. 1) for 1:1
//! sessions, started by X3DH (§5.1 there: SK becomes the root key, the X3DH AD
//! becomes the ratchet AD, Bob's signed prekey is his first ratchet key).
//!
//! * `KDF_RK(rk, dh) = HKDF-SHA256(salt = rk, IKM = dh, info = "messenger/1 DR root")`
//!   → 64 bytes: new root key ‖ chain key (§3.1, §5.2).
//! * `KDF_CK(ck)`: `HMAC-SHA256(ck, 0x01)` is the message-key seed,
//!   `HMAC-SHA256(ck, 0x02)` the next chain key (§5.2).
//! * `ENCRYPT`: ChaCha20-Poly1305 with key ‖ nonce = `HKDF-SHA256(salt = 0,
//!   IKM = seed, info = "messenger/1 DR message")` (44 bytes); a fixed nonce per
//!   key is sound because each seed encrypts one message (§3.1).
//! * AEAD associated data: `u16 BE len(AD) ‖ AD ‖ every message byte before
//!   the ciphertext` (the header, and for a prekey message the X3DH fields), so
//!   `CONCAT` is unambiguous (§3.1) and the bytes authenticated are the bytes parsed.
//!
//! Decryption works on a copy of the state and commits it only when the AEAD
//! check passes (§3.5): a forged, replayed or tampered message leaves the
//! session exactly as it was. Skipped message keys are bounded per message
//! ([`MAX_SKIP`]), per chain and in total, expire after
//! [`SKIPPED_KEY_MAX_AGE_SECS`], and at most [`MAX_RECEIVING_CHAINS`] receiving
//! chains are kept.
//!
//! The caller must persist the session (through [`SessionPickle`]) after every
//! `encrypt` and *before* the ciphertext leaves the device; a state restored
//! from an older copy would reuse message keys.

use core::fmt;
use std::collections::VecDeque;
use std::sync::Arc;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use rand_core::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, Writer};
use crate::dh::{DhKeyPair, DhPublicKey};
use crate::identity::{IdentityKeyPair, KeyError, PUBLIC_IDENTITY_LEN, PublicIdentity, Username};
use crate::kdf::{aead_key, chain_step, hkdf_sha256};
use crate::padding::{pad_in_place, padded_len, unpadded_len};
use crate::prekey::{OneTimePrekeyPair, SignedPrekeyPair, VerifiedBundle};
use crate::secret::Secret32;
use crate::x3dh::{self, AssociatedData, Initiation};

/// Version byte that starts every 1:1 message.
pub const MESSAGE_VERSION: u8 = 1;
/// Message type: a Double Ratchet message. Group (sender-key) messages use
/// another type byte, and the type byte is authenticated, so one kind can
/// never be accepted as the other.
pub const TYPE_RATCHET: u8 = 0x01;
/// Message type: a Double Ratchet message carrying the X3DH initiation,
/// sent until the peer's first reply arrives.
pub const TYPE_PREKEY: u8 = 0x03;
/// Most message keys one message may make us skip (derive and store).
/// Enough for routine loss and reordering; small enough that a forged
/// counter costs little work. Same as libsignal's per-chain cap.
pub const MAX_SKIP: u32 = 2000;
/// Most skipped keys kept for one receiving chain; the oldest go first.
pub const MAX_SKIPPED_KEYS_PER_CHAIN: usize = 2000;
/// Most skipped keys kept in one session, all chains together.
pub const MAX_SKIPPED_KEYS: usize = 5000;
/// Receiving chains kept (libsignal and vodozemac both keep 5).
pub const MAX_RECEIVING_CHAINS: usize = 5;
/// Skipped keys older than this are deleted (DR §6.4): 30 days.
pub const SKIPPED_KEY_MAX_AGE_SECS: u64 = 30 * 24 * 60 * 60;
pub use crate::padding::MAX_PLAINTEXT_LEN;

/// Info of `KDF_RK` (DR §3.1), distinct from every other HKDF use.
const ROOT_KDF_INFO: &[u8] = b"messenger/1 DR root";
/// Info of the message-key expansion (DR §5.2, our ChaCha20-Poly1305 variant).
const MESSAGE_KEY_INFO: &[u8] = b"messenger/1 DR message";
/// Version of the [`SessionPickle`] encoding.
const PICKLE_VERSION: u8 = 1;
/// Ratchet header as laid out on the wire: version, type, ratchet key,
/// previous chain length, message number (a prekey message puts its X3DH
/// fields between the type and the ratchet key).
const HEADER_LEN: usize = 1 + 1 + 32 + 4 + 4;
const TAG_LEN: usize = 16;

/// Why a 1:1 message could not be made or read. No variant carries secret data.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RatchetError {
    /// The message bytes do not parse.
    #[error("malformed message: {0}")]
    Malformed(#[from] DecodeError),
    /// A key in the message, or the agreement it needs, was refused.
    #[error("key refused: {0}")]
    Key(#[from] KeyError),
    /// The message is of a type this function does not take.
    #[error("unexpected message type {0:#04x}")]
    WrongType(u8),
    /// The message would make us skip more than [`MAX_SKIP`] keys.
    #[error("message number too far ahead ({skip} keys to skip, at most {MAX_SKIP})")]
    TooFarAhead {
        /// How many keys it asked us to skip.
        skip: u64,
    },
    /// This message was already decrypted (or its key expired).
    #[error("duplicate or expired message")]
    Duplicate,
    /// Authentication failed: tampered, forged, or for another session.
    #[error("message failed authentication")]
    Tampered,
    /// The prekey message belongs to another session (different base key).
    #[error("prekey message for a different session")]
    SessionMismatch,
    /// A responder session cannot send before the first message arrives.
    #[error("session cannot send yet")]
    NotReady,
    /// The plaintext is longer than [`MAX_PLAINTEXT_LEN`].
    #[error("plaintext too large ({0} bytes; at most {max})", max = MAX_PLAINTEXT_LEN)]
    TooLarge(usize),
    /// The sending chain's counter is used up (after 2^32 messages).
    #[error("sending chain exhausted")]
    ChainExhausted,
}

/// What a 1:1 message is, read from its first two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageKind {
    /// A message that starts a session (carries the X3DH initiation).
    Prekey,
    /// A message in an established session.
    Ratchet,
}

/// Classifies a 1:1 message without decrypting it.
pub fn message_kind(bytes: &[u8]) -> Result<MessageKind, RatchetError> {
    let mut r = Reader::new(bytes, "message");
    r.version(MESSAGE_VERSION)?;
    match r.u8()? {
        TYPE_RATCHET => Ok(MessageKind::Ratchet),
        TYPE_PREKEY => Ok(MessageKind::Prekey),
        other => Err(RatchetError::WrongType(other)),
    }
}

/// The public fields of a prekey message, readable before any decryption so
/// the recipient can find its prekeys and check who is writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrekeyMessageInfo {
    /// The sender's public identity, as the message claims it.
    pub sender: PublicIdentity,
    /// The X3DH fields.
    pub initiation: Initiation,
}

impl PrekeyMessageInfo {
    /// Reads the public fields of a prekey message.
    pub fn parse(bytes: &[u8]) -> Result<Self, RatchetError> {
        let parsed = Parsed::parse(bytes)?;
        parsed.prekey.ok_or(RatchetError::WrongType(TYPE_RATCHET))
    }
}

/// The parts of a session that never change after it is made. Shared, so the
/// copy that decryption works on costs a reference count, not a deep copy.
struct Fixed {
    associated_data: AssociatedData,
    local: PublicIdentity,
    remote: PublicIdentity,
    initiation: Initiation,
}

#[derive(Clone)]
struct Chain {
    key: Secret32,
    next_index: u32,
}

#[derive(Clone)]
struct ReceivingChain {
    their_key: DhPublicKey,
    chain: Chain,
}

#[derive(Clone)]
struct SkippedKey {
    their_key: DhPublicKey,
    index: u32,
    seed: Secret32,
    stored_at: u64,
}

/// One side of a 1:1 Double Ratchet session. Secrets are wiped on drop; it
/// prints only public facts. Persist it only through [`Session::pickle`].
#[derive(Clone)]
pub struct Session {
    fixed: Arc<Fixed>,
    awaiting_reply: bool,
    root_key: Secret32,
    sending_key: DhKeyPair,
    sending: Option<Chain>,
    previous_sending_len: u32,
    receiving: VecDeque<ReceivingChain>,
    skipped: VecDeque<SkippedKey>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("remote", &self.fixed.remote.fingerprint())
            .field("base_key", &self.fixed.initiation.base_key)
            .field("awaiting_reply", &self.awaiting_reply)
            .field("receiving_chains", &self.receiving.len())
            .field("skipped_keys", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

/// A parsed message: borrowed slices of the input.
struct Parsed<'a> {
    prekey: Option<PrekeyMessageInfo>,
    ratchet_key: DhPublicKey,
    previous_len: u32,
    index: u32,
    authenticated: &'a [u8],
    ciphertext: &'a [u8],
}

impl<'a> Parsed<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, RatchetError> {
        let mut r = Reader::new(bytes, "message");
        r.version(MESSAGE_VERSION)?;
        let prekey = match r.u8()? {
            TYPE_RATCHET => None,
            TYPE_PREKEY => {
                let sender = PublicIdentity::from_bytes(r.take(PUBLIC_IDENTITY_LEN)?)?;
                let base_key = DhPublicKey::from_bytes(r.array()?)?;
                let signed_prekey_id = r.u32()?;
                let one_time_prekey_id = match r.u8()? {
                    0 => None,
                    1 => Some(r.u32()?),
                    _ => return Err(DecodeError::Invalid { what: "message" }.into()),
                };
                Some(PrekeyMessageInfo {
                    sender,
                    initiation: Initiation {
                        base_key,
                        signed_prekey_id,
                        one_time_prekey_id,
                    },
                })
            }
            other => return Err(RatchetError::WrongType(other)),
        };
        let ratchet_key = DhPublicKey::from_bytes(r.array()?)?;
        let previous_len = r.u32()?;
        let index = r.u32()?;
        let header_end = bytes.len() - r.remaining();
        let body = r.remaining();
        if body < TAG_LEN + padded_len(0)
            || !(body - TAG_LEN).is_multiple_of(crate::padding::PADDING_BUCKET)
        {
            return Err(DecodeError::Invalid {
                what: "message body",
            }
            .into());
        }
        if body - TAG_LEN > padded_len(MAX_PLAINTEXT_LEN) {
            return Err(RatchetError::TooLarge(body - TAG_LEN));
        }
        Ok(Self {
            prekey,
            ratchet_key,
            previous_len,
            index,
            authenticated: &bytes[..header_end],
            ciphertext: &bytes[header_end..],
        })
    }
}

fn kdf_rk(root: &Secret32, dh_out: &[u8; 32]) -> (Secret32, Chain) {
    let mut okm = Zeroizing::new([0u8; 64]);
    hkdf_sha256(Some(root.expose()), dh_out, ROOT_KDF_INFO, okm.as_mut());
    let mut rk = [0u8; 32];
    let mut ck = [0u8; 32];
    rk.copy_from_slice(&okm[..32]);
    ck.copy_from_slice(&okm[32..]);
    let out = (
        Secret32::from_bytes(rk),
        Chain {
            key: Secret32::from_bytes(ck),
            next_index: 0,
        },
    );
    zeroize::Zeroize::zeroize(&mut rk);
    zeroize::Zeroize::zeroize(&mut ck);
    out
}

/// Room for the AEAD associated data: 2 + [`MAX_AD_LEN`] + the longest
/// authenticated prefix (a prekey message header, 212 bytes).
const AEAD_AD_BUF: usize = 2 + MAX_AD_LEN + 256;

/// `u16 BE len(AD) ‖ AD ‖ authenticated`, built on the stack.
fn aead_ad<'b>(
    buf: &'b mut [u8; AEAD_AD_BUF],
    session_ad: &AssociatedData,
    authenticated: &[u8],
) -> Result<&'b [u8], RatchetError> {
    let ad = session_ad.as_bytes();
    let len = 2 + ad.len() + authenticated.len();
    if len > AEAD_AD_BUF {
        return Err(DecodeError::Invalid { what: "message" }.into());
    }
    // The session AD is at most MAX_AD_LEN bytes, far below u16::MAX.
    buf[..2].copy_from_slice(&(ad.len() as u16).to_be_bytes());
    buf[2..2 + ad.len()].copy_from_slice(ad);
    buf[2 + ad.len()..len].copy_from_slice(authenticated);
    Ok(&buf[..len])
}

impl Session {
    /// Alice: starts a session from a verified bundle (X3DH §3.3, then
    /// `RatchetInitAlice`). Every message she sends carries the X3DH
    /// initiation until Bob's first reply arrives.
    pub fn initiate<R: CryptoRng + ?Sized>(
        rng: &mut R,
        me: &IdentityKeyPair,
        my_name: &Username,
        bundle: &VerifiedBundle,
        their_name: &Username,
    ) -> Result<Self, RatchetError> {
        let (agreement, initiation) = x3dh::initiate(rng, me, my_name, bundle, their_name)?;
        let their_spk = bundle.signed_prekey().key();
        let sending_key = DhKeyPair::generate(rng);
        let dh = sending_key.agree(their_spk)?;
        let (root_key, sending) = kdf_rk(&agreement.shared_key, &dh);
        Ok(Self {
            fixed: Arc::new(Fixed {
                associated_data: agreement.associated_data,
                local: me.public().clone(),
                remote: bundle.identity().clone(),
                initiation,
            }),
            awaiting_reply: true,
            root_key,
            sending_key,
            sending: Some(sending),
            previous_sending_len: 0,
            receiving: VecDeque::new(),
            skipped: VecDeque::new(),
        })
    }

    /// Bob: answers a prekey message (X3DH §3.4, then `RatchetInitBob` and the
    /// first decryption). Returns the session only if the first message
    /// decrypts; the caller then deletes the one-time prekey it passed.
    ///
    /// Before calling, the caller checks that the sender identity in
    /// [`PrekeyMessageInfo`] is acceptable for `their_name`, and that no
    /// existing session has this base key (a replayed prekey message must go
    /// to that session, where it is rejected as a duplicate).
    #[allow(clippy::too_many_arguments)]
    pub fn respond<R: CryptoRng + ?Sized>(
        rng: &mut R,
        me: &IdentityKeyPair,
        my_name: &Username,
        signed_prekey: &SignedPrekeyPair,
        one_time_prekey: Option<&OneTimePrekeyPair>,
        their_name: &Username,
        message: &[u8],
        now: u64,
    ) -> Result<(Self, Vec<u8>), RatchetError> {
        let parsed = Parsed::parse(message)?;
        let info = parsed
            .prekey
            .clone()
            .ok_or(RatchetError::WrongType(TYPE_RATCHET))?;
        let agreement = x3dh::respond(
            me,
            my_name,
            signed_prekey,
            one_time_prekey,
            &info.sender,
            their_name,
            &info.initiation,
        )?;
        let mut session = Self {
            fixed: Arc::new(Fixed {
                associated_data: agreement.associated_data,
                local: me.public().clone(),
                remote: info.sender,
                initiation: info.initiation,
            }),
            awaiting_reply: false,
            root_key: agreement.shared_key,
            sending_key: signed_prekey.keypair().clone(),
            sending: None,
            previous_sending_len: 0,
            receiving: VecDeque::new(),
            skipped: VecDeque::new(),
        };
        let plaintext = session.decrypt_parsed(rng, &parsed, now)?;
        Ok((session, plaintext))
    }

    /// Encrypts one message and advances the sending chain. Persist the
    /// session before sending the result.
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, RatchetError> {
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(RatchetError::TooLarge(plaintext.len()));
        }
        let chain = self.sending.as_mut().ok_or(RatchetError::NotReady)?;
        let index = chain.next_index;
        if index == u32::MAX {
            return Err(RatchetError::ChainExhausted);
        }
        let (seed, next) = chain_step(&chain.key);

        let mut out = Vec::with_capacity(
            HEADER_LEN + PUBLIC_IDENTITY_LEN + 32 + 9 + padded_len(plaintext.len()) + TAG_LEN,
        );
        out.push(MESSAGE_VERSION);
        if self.awaiting_reply {
            out.push(TYPE_PREKEY);
            out.extend_from_slice(&self.fixed.local.to_bytes());
            out.extend_from_slice(self.fixed.initiation.base_key.as_bytes());
            out.extend_from_slice(&self.fixed.initiation.signed_prekey_id.to_be_bytes());
            match self.fixed.initiation.one_time_prekey_id {
                None => out.push(0),
                Some(id) => {
                    out.push(1);
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
        } else {
            out.push(TYPE_RATCHET);
        }
        out.extend_from_slice(self.sending_key.public().as_bytes());
        out.extend_from_slice(&self.previous_sending_len.to_be_bytes());
        out.extend_from_slice(&index.to_be_bytes());
        let header_end = out.len();
        let mut ad_buf = [0u8; AEAD_AD_BUF];
        let ad = aead_ad(&mut ad_buf, &self.fixed.associated_data, &out)?;

        out.extend_from_slice(plaintext);
        pad_in_place(&mut out, header_end);
        let key = aead_key(&seed, MESSAGE_KEY_INFO);
        #[cfg(test)]
        tests::record_key_nonce(&key);
        let cipher = ChaCha20Poly1305::new(&Key::from(*key.key));
        let tag = cipher
            .encrypt_inout_detached(&Nonce::from(key.nonce), ad, (&mut out[header_end..]).into())
            .map_err(|_| RatchetError::TooLarge(plaintext.len()))?;
        out.extend_from_slice(&tag);

        chain.key = next;
        chain.next_index = index + 1;
        Ok(out)
    }

    /// Decrypts a message of this session. On any error the session is
    /// unchanged. `now` (seconds) dates skipped keys and expires old ones.
    pub fn decrypt<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        message: &[u8],
        now: u64,
    ) -> Result<Vec<u8>, RatchetError> {
        let parsed = Parsed::parse(message)?;
        if let Some(info) = &parsed.prekey
            && (info.initiation != self.fixed.initiation || info.sender != self.fixed.remote)
        {
            return Err(RatchetError::SessionMismatch);
        }
        // Fast path: the next message of a known chain needs no skipping and
        // no DH step, so derive its key on the side and commit only after the
        // AEAD check, without copying the session.
        if let Some(pos) = self
            .receiving
            .iter()
            .position(|c| c.their_key == parsed.ratchet_key)
            && self.receiving[pos].chain.next_index == parsed.index
            && !self.has_expired_skipped(now)
        {
            let (seed, next) = chain_step(&self.receiving[pos].chain.key);
            let plaintext = self.open(&seed, &parsed)?;
            let chain = &mut self.receiving[pos].chain;
            chain.key = next;
            chain.next_index += 1;
            self.awaiting_reply = false;
            return Ok(plaintext);
        }
        let mut next = self.clone();
        let plaintext = next.decrypt_parsed(rng, &parsed, now)?;
        *self = next;
        Ok(plaintext)
    }

    fn has_expired_skipped(&self, now: u64) -> bool {
        self.skipped
            .iter()
            .any(|k| now.saturating_sub(k.stored_at) > SKIPPED_KEY_MAX_AGE_SECS)
    }

    fn decrypt_parsed<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        msg: &Parsed<'_>,
        now: u64,
    ) -> Result<Vec<u8>, RatchetError> {
        self.expire_skipped(now);
        let seed = match self
            .receiving
            .iter()
            .position(|c| c.their_key == msg.ratchet_key)
        {
            Some(pos) => {
                let next_index = self.receiving[pos].chain.next_index;
                if msg.index < next_index {
                    self.take_skipped(&msg.ratchet_key, msg.index)?
                } else {
                    check_skip(next_index, msg.index)?;
                    self.skip_to(pos, msg.index, now);
                    self.step_receiving(pos)
                }
            }
            None => {
                // Refuse before deriving anything (DR §3.5, SkipMessageKeys).
                if let Some(last) = self.receiving.back() {
                    check_skip(last.chain.next_index, msg.previous_len)?;
                }
                check_skip(0, msg.index)?;
                if let Some(last) = self.receiving.len().checked_sub(1) {
                    self.skip_to(last, msg.previous_len, now);
                }
                self.dh_ratchet(rng, &msg.ratchet_key)?;
                let pos = self.receiving.len() - 1;
                self.skip_to(pos, msg.index, now);
                self.step_receiving(pos)
            }
        };
        let plaintext = self.open(&seed, msg)?;
        self.awaiting_reply = false;
        Ok(plaintext)
    }

    fn open(&self, seed: &Secret32, msg: &Parsed<'_>) -> Result<Vec<u8>, RatchetError> {
        let key = aead_key(seed, MESSAGE_KEY_INFO);
        let mut ad_buf = [0u8; AEAD_AD_BUF];
        let ad = aead_ad(&mut ad_buf, &self.fixed.associated_data, msg.authenticated)?;
        let (body, tag) = msg.ciphertext.split_at(msg.ciphertext.len() - TAG_LEN);
        let mut buf = body.to_vec();
        let tag = Tag::try_from(tag).map_err(|_| RatchetError::Tampered)?;
        ChaCha20Poly1305::new(&Key::from(*key.key))
            .decrypt_inout_detached(&Nonce::from(key.nonce), ad, (&mut buf[..]).into(), &tag)
            .map_err(|_| RatchetError::Tampered)?;
        let len = unpadded_len(&buf).ok_or(RatchetError::Tampered)?;
        buf.truncate(len);
        Ok(buf)
    }

    /// `DHRatchet` (DR §3.5): a receiving chain for the peer's new key, then a
    /// new sending key and chain.
    fn dh_ratchet<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        their_key: &DhPublicKey,
    ) -> Result<(), RatchetError> {
        let dh = self.sending_key.agree(their_key)?;
        let (root, receiving) = kdf_rk(&self.root_key, &dh);
        let new_key = DhKeyPair::generate(rng);
        let dh = new_key.agree(their_key)?;
        let (root, sending) = kdf_rk(&root, &dh);
        self.root_key = root;
        self.previous_sending_len = self.sending.as_ref().map_or(0, |c| c.next_index);
        self.sending = Some(sending);
        self.sending_key = new_key;
        self.receiving.push_back(ReceivingChain {
            their_key: *their_key,
            chain: receiving,
        });
        while self.receiving.len() > MAX_RECEIVING_CHAINS {
            if let Some(old) = self.receiving.pop_front() {
                self.skipped.retain(|k| k.their_key != old.their_key);
            }
        }
        Ok(())
    }

    fn step_receiving(&mut self, pos: usize) -> Secret32 {
        let chain = &mut self.receiving[pos].chain;
        let (seed, next) = chain_step(&chain.key);
        chain.key = next;
        chain.next_index += 1;
        seed
    }

    /// Stores the keys of chain `pos` up to (not including) `until`. The
    /// caller has checked the distance against [`MAX_SKIP`].
    fn skip_to(&mut self, pos: usize, until: u32, now: u64) {
        let their_key = self.receiving[pos].their_key;
        if self.receiving[pos].chain.next_index >= until {
            return;
        }
        let mut in_chain = self
            .skipped
            .iter()
            .filter(|k| k.their_key == their_key)
            .count();
        while self.receiving[pos].chain.next_index < until {
            let index = self.receiving[pos].chain.next_index;
            let seed = self.step_receiving(pos);
            self.skipped.push_back(SkippedKey {
                their_key,
                index,
                seed,
                stored_at: now,
            });
            in_chain += 1;
            if in_chain > MAX_SKIPPED_KEYS_PER_CHAIN
                && let Some(oldest) = self.skipped.iter().position(|k| k.their_key == their_key)
            {
                self.skipped.remove(oldest);
                in_chain -= 1;
            }
            if self.skipped.len() > MAX_SKIPPED_KEYS
                && let Some(old) = self.skipped.pop_front()
                && old.their_key == their_key
            {
                in_chain -= 1;
            }
        }
    }

    fn take_skipped(
        &mut self,
        their_key: &DhPublicKey,
        index: u32,
    ) -> Result<Secret32, RatchetError> {
        let pos = self
            .skipped
            .iter()
            .position(|k| k.their_key == *their_key && k.index == index)
            .ok_or(RatchetError::Duplicate)?;
        self.skipped
            .remove(pos)
            .map(|k| k.seed)
            .ok_or(RatchetError::Duplicate)
    }

    /// Deletes skipped message keys older than [`SKIPPED_KEY_MAX_AGE_SECS`]
    /// (DR §6.4). Decryption does this too; call it when a session has been
    /// idle, then persist the session.
    pub fn expire_skipped_keys(&mut self, now: u64) {
        self.expire_skipped(now);
    }

    fn expire_skipped(&mut self, now: u64) {
        self.skipped
            .retain(|k| now.saturating_sub(k.stored_at) <= SKIPPED_KEY_MAX_AGE_SECS);
    }

    /// The peer's public identity (from the bundle, or from its prekey message).
    pub fn remote_identity(&self) -> &PublicIdentity {
        &self.fixed.remote
    }

    /// The X3DH base key this session grew from; a repeated prekey message
    /// with the same base key belongs to this session.
    pub fn base_key(&self) -> &DhPublicKey {
        &self.fixed.initiation.base_key
    }

    /// Whether X3DH used a one-time prekey (false when the server had none or
    /// withheld them: initial forward secrecy then rests on the signed prekey).
    pub fn used_one_time_prekey(&self) -> bool {
        self.fixed.initiation.one_time_prekey_id.is_some()
    }

    /// Whether we started the session and have not yet heard back.
    pub fn awaiting_reply(&self) -> bool {
        self.awaiting_reply
    }

    /// Skipped message keys currently stored.
    pub fn skipped_key_count(&self) -> usize {
        self.skipped.len()
    }

    /// Receiving chains currently kept.
    pub fn receiving_chain_count(&self) -> usize {
        self.receiving.len()
    }

    /// Serialises the whole state, secrets included, for the caller to seal.
    pub fn pickle(&self) -> SessionPickle {
        let mut w = Writer::with_capacity(512 + self.skipped.len() * 76);
        w.u8(PICKLE_VERSION)
            .var_bytes(self.fixed.associated_data.as_bytes())
            .bytes(&self.fixed.local.to_bytes())
            .bytes(&self.fixed.remote.to_bytes())
            .bytes(self.fixed.initiation.base_key.as_bytes())
            .u32(self.fixed.initiation.signed_prekey_id);
        match self.fixed.initiation.one_time_prekey_id {
            None => w.u8(0),
            Some(id) => w.u8(1).u32(id),
        };
        w.u8(u8::from(self.awaiting_reply))
            .bytes(self.root_key.expose())
            .bytes(self.sending_key.secret_bytes().as_ref());
        match &self.sending {
            None => w.u8(0),
            Some(c) => w.u8(1).bytes(c.key.expose()).u32(c.next_index),
        };
        w.u32(self.previous_sending_len);
        w.u8(self.receiving.len() as u8);
        for r in &self.receiving {
            w.bytes(r.their_key.as_bytes())
                .bytes(r.chain.key.expose())
                .u32(r.chain.next_index);
        }
        w.u32(self.skipped.len() as u32);
        for k in &self.skipped {
            w.bytes(k.their_key.as_bytes())
                .u32(k.index)
                .bytes(k.seed.expose())
                .u64(k.stored_at);
        }
        SessionPickle(Zeroizing::new(w.finish()))
    }

    /// Restores a session from [`Session::pickle`]'s bytes, re-checking
    /// every bound and key encoding.
    pub fn from_pickle(pickle: &SessionPickle) -> Result<Self, RatchetError> {
        let mut r = Reader::new(&pickle.0, "session pickle");
        r.version(PICKLE_VERSION)?;
        let associated_data = AssociatedData::from_raw(r.var_bytes(MAX_AD_LEN)?.to_vec());
        let local = PublicIdentity::from_bytes(r.take(PUBLIC_IDENTITY_LEN)?)?;
        let remote = PublicIdentity::from_bytes(r.take(PUBLIC_IDENTITY_LEN)?)?;
        let base_key = DhPublicKey::from_bytes(r.array()?)?;
        let signed_prekey_id = r.u32()?;
        let one_time_prekey_id = match r.u8()? {
            0 => None,
            1 => Some(r.u32()?),
            _ => {
                return Err(DecodeError::Invalid {
                    what: "session pickle",
                }
                .into());
            }
        };
        let awaiting_reply = read_bool(&mut r)?;
        let root_key = read_secret(&mut r)?;
        let sending_key = DhKeyPair::from_secret_bytes(*read_secret(&mut r)?.expose());
        let sending = if read_bool(&mut r)? {
            Some(Chain {
                key: read_secret(&mut r)?,
                next_index: r.u32()?,
            })
        } else {
            None
        };
        let previous_sending_len = r.u32()?;
        let n = usize::from(r.u8()?);
        if n > MAX_RECEIVING_CHAINS {
            return Err(DecodeError::Invalid {
                what: "session pickle",
            }
            .into());
        }
        let mut receiving = VecDeque::with_capacity(n);
        for _ in 0..n {
            receiving.push_back(ReceivingChain {
                their_key: DhPublicKey::from_bytes(r.array()?)?,
                chain: Chain {
                    key: read_secret(&mut r)?,
                    next_index: r.u32()?,
                },
            });
        }
        let n = r.count(MAX_SKIPPED_KEYS)?;
        let mut skipped = VecDeque::with_capacity(n);
        for _ in 0..n {
            skipped.push_back(SkippedKey {
                their_key: DhPublicKey::from_bytes(r.array()?)?,
                index: r.u32()?,
                seed: read_secret(&mut r)?,
                stored_at: r.u64()?,
            });
        }
        r.finish()?;
        for chain in &receiving {
            let n = skipped
                .iter()
                .filter(|k| k.their_key == chain.their_key)
                .count();
            if n > MAX_SKIPPED_KEYS_PER_CHAIN {
                return Err(DecodeError::Invalid {
                    what: "session pickle",
                }
                .into());
            }
        }
        if skipped
            .iter()
            .any(|k| !receiving.iter().any(|c| c.their_key == k.their_key))
        {
            return Err(DecodeError::Invalid {
                what: "session pickle",
            }
            .into());
        }
        Ok(Self {
            fixed: Arc::new(Fixed {
                associated_data,
                local,
                remote,
                initiation: Initiation {
                    base_key,
                    signed_prekey_id,
                    one_time_prekey_id,
                },
            }),
            awaiting_reply,
            root_key,
            sending_key,
            sending,
            previous_sending_len,
            receiving,
            skipped,
        })
    }
}

/// Longest associated data a pickle may hold (the real one is about 210 bytes).
const MAX_AD_LEN: usize = 512;

fn read_bool(r: &mut Reader<'_>) -> Result<bool, DecodeError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::Invalid {
            what: "session pickle",
        }),
    }
}

fn read_secret(r: &mut Reader<'_>) -> Result<Secret32, DecodeError> {
    let mut bytes = r.array::<32>()?;
    let s = Secret32::from_bytes(bytes);
    zeroize::Zeroize::zeroize(&mut bytes);
    Ok(s)
}

fn check_skip(next_index: u32, until: u32) -> Result<(), RatchetError> {
    let skip = u64::from(until).saturating_sub(u64::from(next_index));
    if skip > u64::from(MAX_SKIP) {
        return Err(RatchetError::TooFarAhead { skip });
    }
    Ok(())
}

/// The sealed-before-storage form of a [`Session`]: its bytes contain every
/// session secret, so the caller encrypts them before they touch a disk.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionPickle(Zeroizing<Vec<u8>>);

impl SessionPickle {
    /// Wraps bytes read back from (decrypted) storage.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes to seal.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SessionPickle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionPickle({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::kdf::AeadKey;

    thread_local! {
        static RECORDED: RefCell<Option<Vec<[u8; 44]>>> = const { RefCell::new(None) };
    }

    pub(super) fn record_key_nonce(key: &AeadKey) {
        RECORDED.with(|r| {
            if let Some(v) = r.borrow_mut().as_mut() {
                let mut kn = [0u8; 44];
                kn[..32].copy_from_slice(key.key.as_ref());
                kn[32..].copy_from_slice(&key.nonce);
                v.push(kn);
            }
        });
    }

    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use crate::kdf::CHAIN_STEPS;
    use crate::prekey::PrekeyIdCounter;

    const NOW: u64 = 1_700_000_000;

    pub(super) struct Pair {
        pub(super) alice: Session,
        pub(super) bob: Session,
        pub(super) rng: StdRng,
        pub(super) first: Vec<u8>,
    }

    pub(super) fn names() -> (Username, Username) {
        (
            Username::parse("alice").unwrap(),
            Username::parse("bob").unwrap(),
        )
    }

    /// Alice starts a session with Bob and Bob answers her first message.
    pub(super) fn pair(seed: u64, with_opk: bool) -> Pair {
        let mut rng = StdRng::seed_from_u64(seed);
        let (an, bn) = names();
        let alice_id = IdentityKeyPair::generate(&mut rng);
        let bob_id = IdentityKeyPair::generate(&mut rng);
        let spk =
            SignedPrekeyPair::generate(&bob_id, &mut PrekeyIdCounter::new(), &mut rng).unwrap();
        let opk = OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::new(), 1, &mut rng)
            .unwrap()
            .remove(0);
        let bundle = VerifiedBundle::verify(
            bob_id.public().clone(),
            *spk.public(),
            with_opk.then(|| opk.public()),
        )
        .unwrap();
        let mut alice = Session::initiate(&mut rng, &alice_id, &an, &bundle, &bn).unwrap();
        let first = alice.encrypt(b"hello bob").unwrap();
        assert_eq!(message_kind(&first).unwrap(), MessageKind::Prekey);
        let (bob, pt) = Session::respond(
            &mut rng,
            &bob_id,
            &bn,
            &spk,
            with_opk.then_some(&opk),
            &an,
            &first,
            NOW,
        )
        .unwrap();
        assert_eq!(pt, b"hello bob");
        assert_eq!(bob.used_one_time_prekey(), with_opk);
        Pair {
            alice,
            bob,
            rng,
            first,
        }
    }

    fn pickled(s: &Session) -> Vec<u8> {
        s.pickle().as_bytes().to_vec()
    }

    #[test]
    fn ping_pong_and_prekey_until_reply() {
        let mut p = pair(1, true);
        let m = p.alice.encrypt(b"second").unwrap();
        assert_eq!(message_kind(&m).unwrap(), MessageKind::Prekey);
        assert_eq!(p.bob.decrypt(&mut p.rng, &m, NOW).unwrap(), b"second");
        for round in 0..10u8 {
            let m = p.bob.encrypt(&[round; 300]).unwrap();
            assert_eq!(message_kind(&m).unwrap(), MessageKind::Ratchet);
            assert_eq!(
                p.alice.decrypt(&mut p.rng, &m, NOW).unwrap(),
                vec![round; 300]
            );
            let m = p.alice.encrypt(&[round; 3]).unwrap();
            assert_eq!(message_kind(&m).unwrap(), MessageKind::Ratchet);
            assert_eq!(p.bob.decrypt(&mut p.rng, &m, NOW).unwrap(), vec![round; 3]);
        }
        assert!(!p.alice.awaiting_reply());
        // Empty and maximal plaintexts; one byte more is refused.
        let m = p.alice.encrypt(b"").unwrap();
        assert_eq!(p.bob.decrypt(&mut p.rng, &m, NOW).unwrap(), b"");
        let big = vec![7u8; MAX_PLAINTEXT_LEN];
        let m = p.alice.encrypt(&big).unwrap();
        assert_eq!(p.bob.decrypt(&mut p.rng, &m, NOW).unwrap(), big);
        assert_eq!(
            p.alice.encrypt(&vec![0u8; MAX_PLAINTEXT_LEN + 1]),
            Err(RatchetError::TooLarge(MAX_PLAINTEXT_LEN + 1))
        );
    }

    #[test]
    fn ciphertext_sizes_fall_on_buckets() {
        let mut p = pair(2, true);
        let reply = p.bob.encrypt(b"x").unwrap();
        p.alice.decrypt(&mut p.rng, &reply, NOW).unwrap();
        for len in [0usize, 1, 100, 255, 256, 1000] {
            let m = p.alice.encrypt(&vec![1u8; len]).unwrap();
            let body = m.len() - 2 - 32 - 8 - TAG_LEN;
            assert_eq!(body % crate::padding::PADDING_BUCKET, 0, "len {len}");
        }
    }

    #[test]
    fn out_of_order_across_chains() {
        let mut p = pair(3, false);
        let a1: Vec<_> = (0..5).map(|i| p.alice.encrypt(&[i]).unwrap()).collect();
        // Bob replies (new chain for Alice), Alice answers (new chain for Bob).
        let b1 = p.bob.encrypt(b"b1").unwrap();
        assert_eq!(p.alice.decrypt(&mut p.rng, &b1, NOW).unwrap(), b"b1");
        let a2: Vec<_> = (10..13).map(|i| p.alice.encrypt(&[i]).unwrap()).collect();
        // Deliver the new chain first, then the old one backwards.
        for (m, i) in a2.iter().zip(10..13u8).rev() {
            assert_eq!(p.bob.decrypt(&mut p.rng, m, NOW).unwrap(), [i]);
        }
        for (m, i) in a1.iter().zip(0..5u8).rev() {
            assert_eq!(p.bob.decrypt(&mut p.rng, m, NOW).unwrap(), [i]);
        }
        assert_eq!(p.bob.skipped_key_count(), 0);
    }

    /// T-12: a jump of exactly MAX_SKIP is fine; one more is refused before any
    /// key is derived, and the state is unchanged. Both in a known chain and
    /// for a new ratchet key.
    #[test]
    fn skip_limit_edge_and_one_past() {
        for new_chain in [false, true] {
            let mut p = pair(4, true);
            if !new_chain {
                // Put Bob on a known chain of Alice's first.
                let m = p.bob.encrypt(b"r").unwrap();
                p.alice.decrypt(&mut p.rng, &m, NOW).unwrap();
                let m = p.alice.encrypt(b"a").unwrap();
                p.bob.decrypt(&mut p.rng, &m, NOW).unwrap();
            } else {
                let m = p.bob.encrypt(b"r").unwrap();
                p.alice.decrypt(&mut p.rng, &m, NOW).unwrap();
            }
            let msgs: Vec<_> = (0..MAX_SKIP + 2)
                .map(|_| p.alice.encrypt(b"m").unwrap())
                .collect();
            let before = pickled(&p.bob);
            let steps = CHAIN_STEPS.with(|c| c.get());
            let err = p.bob.decrypt(&mut p.rng, &msgs[MAX_SKIP as usize + 1], NOW);
            assert_eq!(
                err,
                Err(RatchetError::TooFarAhead {
                    skip: u64::from(MAX_SKIP) + 1
                })
            );
            assert_eq!(
                CHAIN_STEPS.with(|c| c.get()),
                steps,
                "keys derived for a refused message"
            );
            assert_eq!(pickled(&p.bob), before);
            assert_eq!(
                p.bob
                    .decrypt(&mut p.rng, &msgs[MAX_SKIP as usize], NOW)
                    .unwrap(),
                b"m"
            );
            assert_eq!(p.bob.skipped_key_count(), MAX_SKIP as usize);
        }
    }

    /// T-13: forged headers (random counters, fresh ratchet keys) never change
    /// the state; honest skipping stays within the per-chain and total bounds.
    #[test]
    fn forged_headers_change_nothing_and_bounds_hold() {
        let mut p = pair(5, true);
        let m = p.bob.encrypt(b"r").unwrap();
        p.alice.decrypt(&mut p.rng, &m, NOW).unwrap();
        let template = p.alice.encrypt(b"real").unwrap();
        let before = pickled(&p.bob);
        let mut forge_rng = StdRng::seed_from_u64(99);
        for i in 0..1000u32 {
            let mut f = template.clone();
            let n = rand::RngExt::random_range(&mut forge_rng, 0..=MAX_SKIP);
            if f[2 + 32 + 4..2 + 32 + 8] == n.to_be_bytes() && i % 2 == 1 {
                continue; // that is the real message, not a forgery
            }
            f[2 + 32 + 4..2 + 32 + 8].copy_from_slice(&n.to_be_bytes());
            if i % 2 == 0 {
                let fresh = DhKeyPair::generate(&mut forge_rng).public();
                f[2..34].copy_from_slice(fresh.as_bytes());
            }
            assert!(p.bob.decrypt(&mut p.rng, &f, NOW).is_err());
        }
        assert_eq!(
            pickled(&p.bob),
            before,
            "a forged message changed the state"
        );
        assert_eq!(p.bob.decrypt(&mut p.rng, &template, NOW).unwrap(), b"real");

        // Honest skips over 7 chains: at most 5 chains, per-chain and total caps.
        for _ in 0..7 {
            let skipped: Vec<_> = (0..MAX_SKIP)
                .map(|_| p.alice.encrypt(b"s").unwrap())
                .collect();
            let last = p.alice.encrypt(b"last").unwrap();
            assert_eq!(p.bob.decrypt(&mut p.rng, &last, NOW).unwrap(), b"last");
            drop(skipped);
            let r = p.bob.encrypt(b"r").unwrap();
            p.alice.decrypt(&mut p.rng, &r, NOW).unwrap();
            assert!(p.bob.skipped_key_count() <= MAX_SKIPPED_KEYS);
            assert!(p.bob.receiving_chain_count() <= MAX_RECEIVING_CHAINS);
        }
        assert_eq!(p.bob.skipped_key_count(), MAX_SKIPPED_KEYS);
        assert_eq!(p.bob.receiving_chain_count(), MAX_RECEIVING_CHAINS);
        let restored = Session::from_pickle(&p.bob.pickle()).unwrap();
        assert_eq!(pickled(&restored), pickled(&p.bob));
    }

    /// T-14: every message of a 200-message conversation re-delivered, before
    /// and after save/load, is rejected; the first prekey message too.
    #[test]
    fn replays_rejected_before_and_after_restore() {
        for with_opk in [false, true] {
            let mut p = pair(6, with_opk);
            let mut to_bob = vec![p.first.clone()];
            let mut to_alice = vec![];
            for i in 0..100u32 {
                let m = p.alice.encrypt(&i.to_be_bytes()).unwrap();
                p.bob.decrypt(&mut p.rng, &m, NOW).unwrap();
                to_bob.push(m);
                let m = p.bob.encrypt(&i.to_be_bytes()).unwrap();
                p.alice.decrypt(&mut p.rng, &m, NOW).unwrap();
                to_alice.push(m);
            }
            for restore in [false, true] {
                if restore {
                    p.alice = Session::from_pickle(&p.alice.pickle()).unwrap();
                    p.bob = Session::from_pickle(&p.bob.pickle()).unwrap();
                }
                let (a, b) = (pickled(&p.alice), pickled(&p.bob));
                // Replays on a retained chain are typed duplicates; older ones
                // (their chain evicted) fail authentication. None decrypts.
                let recent = MAX_RECEIVING_CHAINS;
                for (i, m) in to_bob.iter().enumerate() {
                    let e = p.bob.decrypt(&mut p.rng, m, NOW).unwrap_err();
                    if i + recent > to_bob.len() {
                        assert_eq!(e, RatchetError::Duplicate, "message {i}");
                    } else {
                        assert!(matches!(
                            e,
                            RatchetError::Duplicate | RatchetError::Tampered
                        ));
                    }
                }
                for (i, m) in to_alice.iter().enumerate() {
                    let e = p.alice.decrypt(&mut p.rng, m, NOW).unwrap_err();
                    if i + recent > to_alice.len() {
                        assert_eq!(e, RatchetError::Duplicate, "message {i}");
                    } else {
                        assert!(matches!(
                            e,
                            RatchetError::Duplicate | RatchetError::Tampered
                        ));
                    }
                }
                assert_eq!((pickled(&p.alice), pickled(&p.bob)), (a, b));
            }
            // The replayed prekey message names this session's base key, which
            // is how the caller routes it here instead of to `respond`.
            let info = PrekeyMessageInfo::parse(&p.first).unwrap();
            assert_eq!(&info.initiation.base_key, p.bob.base_key());
        }
    }

    /// T-15: every bit of a message flipped is rejected and leaves the state as it was.
    #[test]
    fn every_bit_flip_rejected_state_unchanged() {
        let mut p = pair(7, true);
        let r = p.bob.encrypt(b"r").unwrap();
        p.alice.decrypt(&mut p.rng, &r, NOW).unwrap();
        let m = p.alice.encrypt(&[0x42; 64]).unwrap();
        let before = pickled(&p.bob);
        for bit in 0..m.len() * 8 {
            let mut t = m.clone();
            t[bit / 8] ^= 1 << (bit % 8);
            assert!(
                p.bob.decrypt(&mut p.rng, &t, NOW).is_err(),
                "bit {bit} accepted"
            );
        }
        assert_eq!(pickled(&p.bob), before);
        // Truncated and extended copies, too.
        for cut in [1, 16, 100, m.len() - 1] {
            assert!(p.bob.decrypt(&mut p.rng, &m[..cut], NOW).is_err());
        }
        let mut long = m.clone();
        long.push(0);
        assert!(p.bob.decrypt(&mut p.rng, &long, NOW).is_err());
        assert_eq!(pickled(&p.bob), before);
        assert_eq!(p.bob.decrypt(&mut p.rng, &m, NOW).unwrap(), [0x42; 64]);
    }

    /// T-16: after message i is decrypted the saved state holds neither its
    /// key seed nor the chain key that made it, and i cannot be read again.
    #[test]
    fn forward_secrecy_after_decrypt() {
        let mut p = pair(8, true);
        let r = p.bob.encrypt(b"r").unwrap();
        p.alice.decrypt(&mut p.rng, &r, NOW).unwrap();
        let m = p.alice.encrypt(b"secret").unwrap();
        // Bob's chain for Alice's current key does not exist yet; take it after
        // a first message, then check the second.
        p.bob.decrypt(&mut p.rng, &m, NOW).unwrap();
        let m2 = p.alice.encrypt(b"secret 2").unwrap();
        let chain = p.bob.receiving.back().unwrap().chain.key.clone();
        let (seed, _) = chain_step(&chain);
        let key = aead_key(&seed, MESSAGE_KEY_INFO);
        p.bob.decrypt(&mut p.rng, &m2, NOW).unwrap();
        let saved = pickled(&p.bob);
        for needle in [&seed.expose()[..], &chain.expose()[..], &key.key[..]] {
            assert!(
                !saved.windows(32).any(|w| w == needle),
                "old key material in pickle"
            );
        }
        let mut restored = Session::from_pickle(&p.bob.pickle()).unwrap();
        assert_eq!(
            restored.decrypt(&mut p.rng, &m2, NOW),
            Err(RatchetError::Duplicate)
        );
    }

    /// T-17: 100,000 messages over 100 DH steps in both directions never repeat
    /// a (key, nonce) pair.
    #[test]
    fn key_nonce_pairs_never_repeat() {
        let mut p = pair(9, true);
        RECORDED.with(|r| *r.borrow_mut() = Some(Vec::with_capacity(100_000)));
        for step in 0..100 {
            let (from, to) = if step % 2 == 0 {
                (&mut p.alice, &mut p.bob)
            } else {
                (&mut p.bob, &mut p.alice)
            };
            for i in 0..1000u32 {
                let m = from.encrypt(&i.to_be_bytes()).unwrap();
                if i % 100 == 0 || i == 999 {
                    to.decrypt(&mut p.rng, &m, NOW).unwrap();
                }
            }
        }
        let all = RECORDED.with(|r| r.borrow_mut().take().unwrap());
        assert_eq!(all.len(), 100_000);
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
    }

    /// T-18: Alice thinks she writes to "charlie", whose bundle the server
    /// filled with Bob's keys; the message reaches Bob, who cannot read it.
    #[test]
    fn identity_misbinding_fails() {
        let mut rng = StdRng::seed_from_u64(10);
        let (an, bn) = names();
        let cn = Username::parse("charlie").unwrap();
        let alice_id = IdentityKeyPair::generate(&mut rng);
        let bob_id = IdentityKeyPair::generate(&mut rng);
        let spk =
            SignedPrekeyPair::generate(&bob_id, &mut PrekeyIdCounter::new(), &mut rng).unwrap();
        let bundle = VerifiedBundle::verify(bob_id.public().clone(), *spk.public(), None).unwrap();
        let mut alice = Session::initiate(&mut rng, &alice_id, &an, &bundle, &cn).unwrap();
        let m = alice.encrypt(b"for charlie").unwrap();
        let r = Session::respond(&mut rng, &bob_id, &bn, &spk, None, &an, &m, NOW);
        assert_eq!(r.unwrap_err(), RatchetError::Tampered);
        // And a sender name the server lies about fails the same way.
        let mut alice = Session::initiate(&mut rng, &alice_id, &an, &bundle, &bn).unwrap();
        let m = alice.encrypt(b"hi").unwrap();
        let r = Session::respond(&mut rng, &bob_id, &bn, &spk, None, &cn, &m, NOW);
        assert_eq!(r.unwrap_err(), RatchetError::Tampered);
    }

    /// T-06 for ratchet keys: a low-order ratchet key in a header is refused
    /// with a typed error and no state change.
    #[test]
    fn low_order_ratchet_keys_refused() {
        use curve25519_dalek::constants::X25519_LOW_ORDER_POINTS;
        let mut p = pair(11, true);
        let r = p.bob.encrypt(b"r").unwrap();
        p.alice.decrypt(&mut p.rng, &r, NOW).unwrap();
        let m = p.alice.encrypt(b"x").unwrap();
        let before = pickled(&p.bob);
        let mut bad: Vec<[u8; 32]> = X25519_LOW_ORDER_POINTS
            .iter()
            .map(|p| p.to_bytes())
            .collect();
        bad.push([0; 32]);
        for point in bad {
            let mut f = m.clone();
            f[2..34].copy_from_slice(&point);
            let e = p.bob.decrypt(&mut p.rng, &f, NOW).unwrap_err();
            assert!(
                matches!(
                    e,
                    RatchetError::Key(KeyError::NonContributory | KeyError::NonCanonicalDhKey)
                ),
                "{e:?}"
            );
        }
        assert_eq!(pickled(&p.bob), before);
    }

    /// The type byte is authenticated: a ratchet message relabelled as another
    /// type (a group message, or a prekey message) is refused.
    #[test]
    fn type_confusion_refused() {
        let mut p = pair(12, true);
        let r = p.bob.encrypt(b"r").unwrap();
        let mut as_group = r.clone();
        as_group[1] = 0x02;
        assert_eq!(
            p.alice.decrypt(&mut p.rng, &as_group, NOW),
            Err(RatchetError::WrongType(0x02))
        );
        assert_eq!(message_kind(&as_group), Err(RatchetError::WrongType(0x02)));
        assert_eq!(p.alice.decrypt(&mut p.rng, &r, NOW).unwrap(), b"r");
    }

    #[test]
    fn idle_sessions_expire_skipped_keys() {
        let mut p = pair(16, true);
        let _late = p.alice.encrypt(b"late").unwrap();
        let next = p.alice.encrypt(b"next").unwrap();
        p.bob.decrypt(&mut p.rng, &next, NOW).unwrap();
        p.bob.expire_skipped_keys(NOW + SKIPPED_KEY_MAX_AGE_SECS);
        assert_eq!(p.bob.skipped_key_count(), 1);
        p.bob
            .expire_skipped_keys(NOW + SKIPPED_KEY_MAX_AGE_SECS + 1);
        assert_eq!(p.bob.skipped_key_count(), 0);
    }

    #[test]
    fn skipped_keys_expire() {
        let mut p = pair(13, true);
        let late = p.alice.encrypt(b"late").unwrap();
        let next = p.alice.encrypt(b"next").unwrap();
        p.bob.decrypt(&mut p.rng, &next, NOW).unwrap();
        assert_eq!(p.bob.skipped_key_count(), 1);
        let later = NOW + SKIPPED_KEY_MAX_AGE_SECS + 1;
        assert_eq!(
            p.bob.decrypt(&mut p.rng, &late, later),
            Err(RatchetError::Duplicate)
        );
        // The expiry commits with the next successful decryption.
        let m = p.alice.encrypt(b"m").unwrap();
        p.bob.decrypt(&mut p.rng, &m, later).unwrap();
        assert_eq!(p.bob.skipped_key_count(), 0);
    }

    #[test]
    fn pickle_is_strict() {
        let p = pair(14, true);
        let bytes = pickled(&p.bob);
        for cut in 0..bytes.len() {
            assert!(
                Session::from_pickle(&SessionPickle::from_bytes(bytes[..cut].to_vec())).is_err()
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Session::from_pickle(&SessionPickle::from_bytes(long)).is_err());
        let dbg = format!("{:?} {:?}", p.bob, p.bob.pickle());
        assert!(!dbg.contains(&hex::encode(p.bob.root_key.expose())));
    }

    /// Deliveries pick among this many of the oldest messages in flight.
    const WINDOW: usize = 16;
    /// Actions after which an undelivered message counts as lost.
    const HORIZON: usize = 24;

    #[derive(Debug, Clone)]
    enum Action {
        AliceSends,
        BobSends,
        Deliver(usize),
        Drop(usize),
        Restore,
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            4 => Just(Action::AliceSends),
            4 => Just(Action::BobSends),
            8 => (0usize..64).prop_map(Action::Deliver),
            1 => (0usize..64).prop_map(Action::Drop),
            1 => Just(Action::Restore),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("RATCHET_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
        ))]

        /// T-11: random interleavings, reorderings within a window, drops and
        /// restarts: every delivered message decrypts exactly once, to its own
        /// plaintext; redelivery is refused.
        #[test]
        fn random_conversations(seed in any::<u64>(), actions in prop::collection::vec(action(), 1..400)) {
            let mut p = pair(seed, seed % 2 == 0);
            // In flight: (to_bob, plaintext, bytes, sent at action number).
            let mut flight: Vec<(bool, Vec<u8>, Vec<u8>, usize)> = Vec::new();
            let mut delivered: Vec<(bool, Vec<u8>)> = Vec::new();
            let mut counter = 0u32;
            for (now_action, a) in actions.into_iter().enumerate() {
                // A message older than the horizon is lost for good: with only
                // MAX_RECEIVING_CHAINS chains kept, a message that stays in
                // flight across many ratchet steps is expected to be unreadable.
                flight.retain(|m| now_action - m.3 <= HORIZON);
                match a {
                    Action::AliceSends | Action::BobSends => {
                        counter += 1;
                        let pt = counter.to_be_bytes().to_vec();
                        let to_bob = matches!(a, Action::AliceSends);
                        let m = if to_bob { p.alice.encrypt(&pt) } else { p.bob.encrypt(&pt) };
                        flight.push((to_bob, pt, m.unwrap(), now_action));
                    }
                    Action::Deliver(i) if !flight.is_empty() => {
                        let (to_bob, pt, m, _) = flight.remove(i % flight.len().min(WINDOW));
                        let got = if to_bob {
                            p.bob.decrypt(&mut p.rng, &m, NOW)
                        } else {
                            p.alice.decrypt(&mut p.rng, &m, NOW)
                        };
                        prop_assert_eq!(got.as_ref(), Ok(&pt));
                        // A second delivery of the same bytes is a duplicate.
                        let again = if to_bob {
                            p.bob.decrypt(&mut p.rng, &m, NOW)
                        } else {
                            p.alice.decrypt(&mut p.rng, &m, NOW)
                        };
                        prop_assert_eq!(again, Err(RatchetError::Duplicate));
                        delivered.push((to_bob, pt));
                    }
                    Action::Drop(i) if !flight.is_empty() => {
                        flight.remove(i % flight.len());
                    }
                    Action::Restore => {
                        p.alice = Session::from_pickle(&p.alice.pickle()).unwrap();
                        p.bob = Session::from_pickle(&p.bob.pickle()).unwrap();
                    }
                    _ => {}
                }
            }
            let unique: std::collections::HashSet<_> = delivered.iter().collect();
            prop_assert_eq!(unique.len(), delivered.len());
        }
    }

    #[test]
    fn header_len_matches_layout() {
        let mut p = pair(15, true);
        let r = p.bob.encrypt(b"r").unwrap();
        p.alice.decrypt(&mut p.rng, &r, NOW).unwrap();
        let m = p.alice.encrypt(b"").unwrap();
        assert_eq!(m.len(), HEADER_LEN + 256 + TAG_LEN);
    }
}

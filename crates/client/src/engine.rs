//! The messaging core: prekeys, contacts and their keys, and 1:1 messages
//! over the local [`Store`]. Synchronous, no network and no clock: the
//! caller passes `now` (seconds since the Unix epoch) and the random number
//! generator, and moves envelopes to and from the server itself.
//!
//! ## Persistence order (the rules that keep keys single-use)
//!
//! * **Send.** [`Engine::prepare_send`] runs X3DH if needed, encrypts with
//!   the ratchet and commits, in one durable transaction, the advanced
//!   session, the [`OutboxEntry`] (ciphertext and a 16-byte id: time ‖ random) and
//!   the history row (`Pending`). Only after it returns may the ciphertext
//!   leave the client. If the process dies before the server accepts it, the
//!   entry is still in [`Engine::outbox`] and is resent byte for byte, with
//!   the same id (the server drops a repeated id): nothing is ever
//!   re-encrypted, so no (key, nonce) pair is used twice (T-53, T-54).
//!   [`Engine::mark_sent`] then removes the entry and marks the row `Sent`,
//!   together.
//! * **Receive.** [`Engine::receive`] drops an envelope already stored
//!   (same sender and message id, T-73) and answers
//!   [`Received::Duplicate`] so the caller can acknowledge it. Otherwise it
//!   decrypts and commits in one transaction the session, the history row,
//!   the dedupe marker and, for a first message, the deletion of the
//!   one-time prekey it used and the sender's identity. The caller
//!   acknowledges the envelope to the server only after `receive` returned
//!   `Ok`. A message that fails to decrypt changes nothing and is reported
//!   as an error; whether to acknowledge it is the caller's decision.
//! * **Prekeys.** Private halves and the advanced id counter are committed
//!   before the public halves are returned for upload, and signed and
//!   one-time prekeys share one counter, so an id never repeats, across
//!   restarts too (T-27, vodozemac #382).
//!
//! ## Key-change policy
//!
//! Every identity the engine meets (a fetched bundle, a prekey message, or
//! one the caller passes to [`Engine::observe_identity`]) is compared with
//! the contact's recorded one. A different key is recorded, the old one is
//! kept as `previous_identity`, and `key_changed` is set until the user
//! verifies the new safety number ([`Engine::verify`]) or acknowledges the
//! change ([`Engine::acknowledge_key_change`]). If the contact had been
//! verified, the contact is also **blocked**: [`Engine::prepare_send`]
//! refuses with [`EngineError::Blocked`] and stores nothing until the new
//! safety number is verified (T-71); acknowledging does not unblock.
//! Messages from a changed key are still decrypted and shown, flagged by the
//! contact's `key_changed`, since they prove possession of the new key.
//!
//! ## Sessions
//!
//! Each contact has an active session and up to
//! [`MAX_SESSIONS_PER_CONTACT`]` - 1` older ones. A message is tried on
//! the active session first, then on the older ones; a message that opens an
//! older session (after both sides started a session at the same time)
//! makes it active again, so both sides converge. Skipped message keys are
//! expired whenever a session is loaded. Whether a session's X3DH used a
//! one-time prekey is kept in it ([`SessionInfo::used_one_time_prekey`],
//! T-78).
//!
//! ## Signed prekey rotation
//!
//! [`Engine::rotate_signed_prekey_if_due`] makes a new signed prekey every
//! [`SIGNED_PREKEY_ROTATION_SECS`] and keeps each replaced private key for
//! [`SIGNED_PREKEY_GRACE_SECS`], so a first message made from a bundle
//! fetched before the rotation can still be read when it arrives late.

use std::fmt;
use std::path::{Path, PathBuf};

use messenger_crypto::fingerprint::SafetyNumber;
use messenger_crypto::identity::{KeyError, PublicIdentity, Username};
use messenger_crypto::prekey::{
    OneTimePrekeyPair, PrekeyIdCounter, SignedPrekeyPair, VerifiedBundle,
};
use messenger_crypto::ratchet::{self, MessageKind, PrekeyMessageInfo, RatchetError, Session};
use messenger_proto::msg::{DEFAULT_DEVICE, Envelope, MessageId, OutgoingEnvelope};
use rand::CryptoRng;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::home::{Home, Unlocked};
pub use crate::store::{
    Contact, DeliveryState, Direction, HistoryEntry, MAX_SESSIONS_PER_CONTACT, OutboxEntry,
};
use crate::store::{STORE_FILE, SignedPrekeyRecord, Store, StoreError, Tx};

/// How long a signed prekey is published before a new one replaces it: 7
/// days, the low end of Signal's "once a week or once a month". A shorter
/// period bounds how many first messages a stolen signed prekey exposes
/// when no one-time prekey was used; a longer one saves nothing that
/// matters (one small upload).
pub const SIGNED_PREKEY_ROTATION_SECS: u64 = 7 * 24 * 60 * 60;
/// How long a replaced signed prekey's private key is kept: 30 days, the
/// server's envelope lifetime (`DEFAULT_ENVELOPE_TTL_SECS`), so a first
/// message encrypted just before the rotation and left waiting in the
/// mailbox as long as the server keeps anything can still be read. After
/// that it is deleted, which is what makes the rotation give forward
/// secrecy.
pub const SIGNED_PREKEY_GRACE_SECS: u64 = 30 * 24 * 60 * 60;
/// One-time prekeys made at registration: a hundred first contacts before
/// the first top-up, in one upload well under a frame (about 4 KiB).
pub const REGISTRATION_ONE_TIME_PREKEYS: u32 = 100;

/// Why an engine operation failed. No variant carries key bytes or message
/// text.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Making prekeys failed (the id space is used up, or a batch is too large).
    #[error("could not make prekeys: {0}")]
    Prekeys(#[from] KeyError),
    /// No contact by that name.
    #[error("no contact named {user}")]
    UnknownContact {
        /// The name.
        user: Username,
    },
    /// The contact was verified and their identity key has changed since.
    #[error(
        "{user}'s identity key changed since you verified it; compare and verify the new safety number before sending"
    )]
    Blocked {
        /// The contact.
        user: Username,
    },
    /// There is no usable session with the contact: fetch their prekey
    /// bundle and pass it.
    #[error("no session with {user} yet: a prekey bundle is needed")]
    NeedBundle {
        /// The contact.
        user: Username,
    },
    /// The bundle's identity is not the contact's recorded identity.
    #[error("the prekey bundle for {user} does not carry their recorded identity key")]
    BundleMismatch {
        /// The contact.
        user: Username,
    },
    /// The safety number typed does not match.
    #[error("the safety number does not match {user}'s current identity key")]
    WrongSafetyNumber {
        /// The contact.
        user: Username,
    },
    /// The name is my own.
    #[error("that is your own username")]
    SelfContact,
    /// A signed prekey is needed but none was made yet.
    #[error("no signed prekey yet: register first")]
    NotRegistered,
    /// Encryption failed (text too long, or a key in the bundle refused).
    #[error("could not encrypt for {user}: {source}")]
    Encrypt {
        /// The recipient.
        user: Username,
        /// Why.
        #[source]
        source: RatchetError,
    },
    /// A message did not decrypt; nothing was changed.
    #[error("message from {from} could not be read: {source}")]
    Decrypt {
        /// The sender.
        from: Username,
        /// Why.
        #[source]
        source: RatchetError,
    },
    /// A first message names a prekey this device no longer holds (used,
    /// or expired after rotation); nothing was changed.
    #[error("message from {from} uses prekey {id}, which this device no longer has")]
    UnknownPrekey {
        /// The sender.
        from: Username,
        /// The prekey id.
        id: u32,
    },
    /// A message in a session this device does not have.
    #[error("message from {from} belongs to no session on this device")]
    NoSession {
        /// The sender.
        from: Username,
    },
    /// The envelope's sender is not a valid username.
    #[error("envelope from an invalid username")]
    BadSender,
    /// A kind of envelope this version does not handle.
    #[error("unsupported envelope: {what}")]
    Unsupported {
        /// What it was.
        what: &'static str,
    },
}

/// What to upload when registering: encodings from `messenger-crypto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationMaterial {
    /// `PublicIdentity` encoding.
    pub identity: Vec<u8>,
    /// `SignedPrekey` encoding.
    pub signed_prekey: Vec<u8>,
    /// `OneTimePrekey` encodings.
    pub one_time_prekeys: Vec<Vec<u8>>,
}

/// A signed prekey the server does not have yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPrekeyUpload {
    /// Its id, for [`Engine::confirm_signed_prekey`].
    pub id: u32,
    /// `SignedPrekey` encoding, for `RotateSignedPrekey`.
    pub signed_prekey: Vec<u8>,
}

/// What an identity was, compared with what we knew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    /// A new contact, now recorded.
    New,
    /// The recorded key.
    Same,
    /// A different key than the recorded one, now recorded instead.
    Changed {
        /// The contact was verified before; it is now blocked until verified again.
        was_verified: bool,
    },
}

/// Public facts about the active session with a contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    /// Whether its X3DH used a one-time prekey (false: the server had none,
    /// or withheld them; first-message secrecy then rests on the signed
    /// prekey, T-78).
    pub used_one_time_prekey: bool,
    /// Whether I started it and have not heard back yet.
    pub awaiting_reply: bool,
    /// Sessions kept with this contact, the active one included.
    pub sessions: usize,
}

/// A session started by a received first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewSession {
    /// The sender's identity compared with what we knew.
    pub key_status: KeyStatus,
    /// Whether the sender used one of my one-time prekeys.
    pub used_one_time_prekey: bool,
}

/// What [`Engine::receive`] made of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A new message, now stored.
    Message(Box<ReceivedMessage>),
    /// Already stored (or a replay of a stored one): acknowledge it, show
    /// nothing.
    Duplicate,
}

/// A message just received and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The sender.
    pub from: Username,
    /// Its history row.
    pub entry: HistoryEntry,
    /// The sender as a contact now (check `key_changed`).
    pub contact: Contact,
    /// Set when this message started a new session.
    pub new_session: Option<NewSession>,
}

impl OutboxEntry {
    /// The envelope to send (to the default device).
    pub fn to_envelope(&self) -> OutgoingEnvelope {
        OutgoingEnvelope {
            to: self.to.as_str().to_owned(),
            to_device: DEFAULT_DEVICE,
            id: self.id,
            body: self.body.clone(),
        }
    }
}

/// A new message id: the send time in milliseconds since the Unix epoch
/// (8 bytes, big-endian), then 8 random bytes.
///
/// The server de-duplicates by (message id, recipient, sender) in a B-tree;
/// ids that rise with time make one group commit's inserts land next to
/// each other at the tree's end instead of on random leaves
/// (docs/benchmarks.md §1). The server knows the time anyway (it stamps
/// `sent_at`); 64 random bits per sender and millisecond keep ids unique.
/// `now` is the caller's clock in seconds (tests inject it): the wall
/// clock's milliseconds are used when they agree with it, else `now`
/// itself in milliseconds.
fn message_id<R: CryptoRng + ?Sized>(now: u64, rng: &mut R) -> MessageId {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let millis = if wall / 1000 == now {
        wall
    } else {
        now.saturating_mul(1000)
    };
    let mut id: MessageId = [0; 16];
    id[..8].copy_from_slice(&millis.to_be_bytes());
    rng.fill_bytes(&mut id[8..]);
    id
}

/// The messaging engine of one unlocked home.
pub struct Engine {
    store: Store,
    unlocked: Unlocked,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("user", self.me())
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens the store at `path` (creating it) for `unlocked`. A store sealed
    /// under another storage key fails with [`StoreError::WrongKey`].
    pub fn open(path: &Path, unlocked: Unlocked) -> Result<Self, EngineError> {
        let store = Store::open(
            path,
            unlocked.storage_key(),
            unlocked.identity().identity_key(),
        )?;
        Ok(Self { store, unlocked })
    }

    /// Opens the store of `home` (`HOME/store.redb`).
    pub fn open_home(home: &Home, unlocked: Unlocked) -> Result<Self, EngineError> {
        Self::open(&Self::store_path(home), unlocked)
    }

    /// Where the store of `home` lives.
    pub fn store_path(home: &Home) -> PathBuf {
        home.path().join(STORE_FILE)
    }

    /// The unlocked identity this engine works for.
    pub fn unlocked(&self) -> &Unlocked {
        &self.unlocked
    }

    /// My username.
    pub fn me(&self) -> &Username {
        self.unlocked.profile().name()
    }

    // ----- prekeys -------------------------------------------------------

    /// Makes a fresh signed prekey and [`REGISTRATION_ONE_TIME_PREKEYS`]
    /// one-time prekeys, stores their private halves (and retires any
    /// earlier signed prekey), then returns what to register.
    pub fn registration_material<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        now: u64,
    ) -> Result<RegistrationMaterial, EngineError> {
        let identity = self.unlocked.identity();
        self.store.write(|tx| {
            let mut meta = tx.meta()?;
            let mut ids = PrekeyIdCounter::restore(meta.next_prekey_id);
            let spk = SignedPrekeyPair::generate(identity, &mut ids, rng)?;
            let opks =
                OneTimePrekeyPair::generate_batch(&mut ids, REGISTRATION_ONE_TIME_PREKEYS, rng)?;
            retire_current(tx, meta.current_signed_prekey, now)?;
            tx.put_signed_prekey(&SignedPrekeyRecord {
                pair: spk.clone(),
                created_at: now,
                retired_at: None,
            })?;
            for opk in &opks {
                tx.put_one_time_prekey(opk)?;
            }
            meta.next_prekey_id = ids.next();
            meta.current_signed_prekey = spk.id();
            meta.signed_prekey_published = false;
            tx.put_meta(&meta)?;
            Ok(RegistrationMaterial {
                identity: identity.public().to_bytes(),
                signed_prekey: spk.public().to_bytes(),
                one_time_prekeys: opks.iter().map(|k| k.public().to_bytes()).collect(),
            })
        })
    }

    /// Makes `count` (at most `MAX_PREKEY_BATCH`) new one-time prekeys,
    /// stores their private halves, and returns the public encodings to upload.
    pub fn one_time_prekeys<R: CryptoRng + ?Sized>(
        &self,
        count: u32,
        rng: &mut R,
    ) -> Result<Vec<Vec<u8>>, EngineError> {
        self.store.write(|tx| {
            let mut meta = tx.meta()?;
            let mut ids = PrekeyIdCounter::restore(meta.next_prekey_id);
            let opks = OneTimePrekeyPair::generate_batch(&mut ids, count, rng)?;
            for opk in &opks {
                tx.put_one_time_prekey(opk)?;
            }
            meta.next_prekey_id = ids.next();
            tx.put_meta(&meta)?;
            Ok(opks.iter().map(|k| k.public().to_bytes()).collect())
        })
    }

    /// How many unused one-time prekey private keys this device holds.
    pub fn one_time_prekey_count(&self) -> Result<u64, EngineError> {
        Ok(self.store.read(|tx| tx.one_time_prekey_count())?)
    }

    /// The signed prekey to upload, if any: a new one when the current one
    /// is older than [`SIGNED_PREKEY_ROTATION_SECS`], or the current one
    /// while the server has not confirmed it ([`Self::confirm_signed_prekey`]),
    /// so a failed upload is retried. Also deletes replaced signed prekeys
    /// older than [`SIGNED_PREKEY_GRACE_SECS`].
    pub fn rotate_signed_prekey_if_due<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        now: u64,
    ) -> Result<Option<SignedPrekeyUpload>, EngineError> {
        // Most logins have nothing to do: find that out without a write
        // transaction (each durable commit costs an fsync).
        let idle = self.store.read(|tx| -> Result<bool, StoreError> {
            let meta = tx.meta()?;
            let Some(current) = tx.signed_prekey(meta.current_signed_prekey)? else {
                return Ok(false);
            };
            let expired = tx.signed_prekeys()?.iter().any(|old| {
                old.retired_at
                    .is_some_and(|r| now.saturating_sub(r) >= SIGNED_PREKEY_GRACE_SECS)
            });
            Ok(meta.signed_prekey_published
                && !expired
                && now.saturating_sub(current.created_at) < SIGNED_PREKEY_ROTATION_SECS)
        })?;
        if idle {
            return Ok(None);
        }
        let identity = self.unlocked.identity();
        self.store.write(|tx| {
            let mut meta = tx.meta()?;
            if meta.current_signed_prekey == 0 {
                return Err(EngineError::NotRegistered);
            }
            for old in tx.signed_prekeys()? {
                if let Some(retired) = old.retired_at
                    && now.saturating_sub(retired) >= SIGNED_PREKEY_GRACE_SECS
                {
                    tx.remove_signed_prekey(old.pair.id())?;
                }
            }
            let current =
                tx.signed_prekey(meta.current_signed_prekey)?
                    .ok_or(StoreError::Corrupt {
                        table: "my_signed_prekeys/1",
                        reason: "current signed prekey missing",
                    })?;
            if now.saturating_sub(current.created_at) < SIGNED_PREKEY_ROTATION_SECS {
                return Ok((!meta.signed_prekey_published).then(|| SignedPrekeyUpload {
                    id: current.pair.id(),
                    signed_prekey: current.pair.public().to_bytes(),
                }));
            }
            let mut ids = PrekeyIdCounter::restore(meta.next_prekey_id);
            let spk = SignedPrekeyPair::generate(identity, &mut ids, rng)?;
            retire_current(tx, meta.current_signed_prekey, now)?;
            tx.put_signed_prekey(&SignedPrekeyRecord {
                pair: spk.clone(),
                created_at: now,
                retired_at: None,
            })?;
            meta.next_prekey_id = ids.next();
            meta.current_signed_prekey = spk.id();
            meta.signed_prekey_published = false;
            tx.put_meta(&meta)?;
            Ok(Some(SignedPrekeyUpload {
                id: spk.id(),
                signed_prekey: spk.public().to_bytes(),
            }))
        })
    }

    /// Records that the server now holds signed prekey `id` (after
    /// registration or a `RotateSignedPrekey` answered `Ok`). An id that is
    /// no longer current is ignored.
    pub fn confirm_signed_prekey(&self, id: u32) -> Result<(), EngineError> {
        self.store.write(|tx| {
            let mut meta = tx.meta()?;
            if meta.current_signed_prekey == id && !meta.signed_prekey_published {
                meta.signed_prekey_published = true;
                tx.put_meta(&meta)?;
            }
            Ok(())
        })
    }

    // ----- contacts and keys ---------------------------------------------

    /// Compares `identity` with what is recorded for `user` and records it
    /// (see the key-change policy in the module docs).
    pub fn observe_identity(
        &self,
        user: &Username,
        identity: &PublicIdentity,
        now: u64,
    ) -> Result<KeyStatus, EngineError> {
        self.not_me(user)?;
        self.store
            .write(|tx| Ok(observe_in(tx, user, identity, now)?))
    }

    /// The contact `user`, if known.
    pub fn contact(&self, user: &Username) -> Result<Option<Contact>, EngineError> {
        Ok(self.store.read(|tx| tx.contact(user))?)
    }

    /// Every contact, by username.
    pub fn contacts(&self) -> Result<Vec<Contact>, EngineError> {
        let mut all = self.store.read(|tx| tx.contacts())?;
        all.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(all)
    }

    /// The safety number of me and `user` with their current key.
    pub fn safety_number(&self, user: &Username) -> Result<SafetyNumber, EngineError> {
        let contact = self.known(user)?;
        Ok(self.safety_number_of(&contact))
    }

    /// Marks `user` verified if `digits` (spaces and dashes ignored) is our
    /// safety number; clears `key_changed` and any block. A wrong number
    /// changes nothing.
    pub fn verify(&self, user: &Username, digits: &str) -> Result<(), EngineError> {
        self.store.write(|tx| {
            let mut contact = tx
                .contact(user)?
                .ok_or_else(|| EngineError::UnknownContact { user: user.clone() })?;
            if !self.safety_number_of(&contact).matches(digits) {
                return Err(EngineError::WrongSafetyNumber { user: user.clone() });
            }
            contact.verified = true;
            contact.key_changed = false;
            contact.blocked = false;
            tx.put_contact(&contact)?;
            Ok(())
        })
    }

    /// Clears the `key_changed` warning of an unverified contact. A blocked
    /// contact stays blocked: only [`Self::verify`] lifts that.
    pub fn acknowledge_key_change(&self, user: &Username) -> Result<(), EngineError> {
        self.store.write(|tx| {
            let mut contact = tx
                .contact(user)?
                .ok_or_else(|| EngineError::UnknownContact { user: user.clone() })?;
            if contact.blocked {
                return Err(EngineError::Blocked { user: user.clone() });
            }
            if contact.key_changed {
                contact.key_changed = false;
                tx.put_contact(&contact)?;
            }
            Ok(())
        })
    }

    /// Whether sending to `user` is refused until their new key is verified.
    pub fn is_blocked(&self, user: &Username) -> Result<bool, EngineError> {
        Ok(self.contact(user)?.is_some_and(|c| c.blocked))
    }

    /// Facts about the active session with `user`, if there is one.
    pub fn session_info(&self, user: &Username) -> Result<Option<SessionInfo>, EngineError> {
        self.store.read(|tx| {
            let sessions = load_sessions(tx, user, 0)?;
            Ok(sessions.first().map(|s| SessionInfo {
                used_one_time_prekey: s.used_one_time_prekey(),
                awaiting_reply: s.awaiting_reply(),
                sessions: sessions.len(),
            }))
        })
    }

    // ----- sending -------------------------------------------------------

    /// Whether [`Self::prepare_send`] to `user` needs a prekey bundle: there
    /// is no session, or the active one is with a key that is no longer the
    /// contact's recorded key.
    pub fn needs_bundle(&self, user: &Username) -> Result<bool, EngineError> {
        self.store.read(|tx| {
            let Some(contact) = tx.contact(user)? else {
                return Ok(true);
            };
            let sessions = load_sessions(tx, user, 0)?;
            Ok(!usable(&sessions, &contact))
        })
    }

    /// Encrypts `text` for `user` and commits it to the outbox; see the
    /// module docs for the order. With a `bundle` (a verified one: the
    /// signature check cannot be skipped) its identity is first observed
    /// like [`Self::observe_identity`], which records a key change even if
    /// the send is then refused. Without a usable session the bundle starts
    /// one (X3DH); with one the bundle is not used. Refused, storing no
    /// message, when `user` is blocked.
    pub fn prepare_send<R: CryptoRng + ?Sized>(
        &self,
        user: &Username,
        bundle: Option<&VerifiedBundle>,
        text: &str,
        rng: &mut R,
        now: u64,
    ) -> Result<OutboxEntry, EngineError> {
        self.not_me(user)?;
        if let Some(bundle) = bundle {
            self.observe_identity(user, bundle.identity(), now)?;
        }
        self.store.write(|tx| {
            let contact = tx
                .contact(user)?
                .ok_or_else(|| EngineError::NeedBundle { user: user.clone() })?;
            if contact.blocked {
                return Err(EngineError::Blocked { user: user.clone() });
            }
            let mut sessions = load_sessions(tx, user, now)?;
            if !usable(&sessions, &contact) {
                let bundle =
                    bundle.ok_or_else(|| EngineError::NeedBundle { user: user.clone() })?;
                if bundle.identity() != &contact.identity {
                    return Err(EngineError::BundleMismatch { user: user.clone() });
                }
                let session =
                    Session::initiate(rng, self.unlocked.identity(), self.me(), bundle, user)
                        .map_err(|source| EngineError::Encrypt {
                            user: user.clone(),
                            source,
                        })?;
                sessions.insert(0, session);
                sessions.truncate(MAX_SESSIONS_PER_CONTACT);
            }
            let Some(active) = sessions.first_mut() else {
                return Err(EngineError::NeedBundle { user: user.clone() });
            };
            let body = active
                .encrypt(text.as_bytes())
                .map_err(|source| EngineError::Encrypt {
                    user: user.clone(),
                    source,
                })?;
            let id = message_id(now, rng);
            let history_seq = tx.append_history(
                user,
                &HistoryEntry {
                    seq: 0,
                    direction: Direction::Outgoing,
                    text: text.to_owned(),
                    message_id: id,
                    created_at: now,
                    sent_at: None,
                    received_at: None,
                    state: DeliveryState::Pending,
                    server_seq: None,
                },
            )?;
            let entry = OutboxEntry {
                to: user.clone(),
                id,
                body,
                created_at: now,
                history_seq,
            };
            tx.put_outbox(&entry)?;
            save_sessions(tx, user, &sessions)?;
            Ok(entry)
        })
    }

    /// Every message committed but not yet accepted by the server, oldest
    /// first: send each again as it is.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, EngineError> {
        Ok(self.store.read(|tx| tx.outbox())?)
    }

    /// The server accepted message `id` as `server_seq`: removes it from the
    /// outbox and marks its history row `Sent`, together. `false` if it was
    /// not in the outbox (already marked).
    pub fn mark_sent(
        &self,
        id: &MessageId,
        server_seq: u64,
        now: u64,
    ) -> Result<bool, EngineError> {
        self.finish_outbox(id, DeliveryState::Sent, Some(server_seq), now)
    }

    /// The server refused message `id` for good (e.g. no such user): removes
    /// it from the outbox and marks its history row `Failed`.
    pub fn mark_failed(&self, id: &MessageId, now: u64) -> Result<bool, EngineError> {
        self.finish_outbox(id, DeliveryState::Failed, None, now)
    }

    // ----- receiving -----------------------------------------------------

    /// Reads one envelope and stores the result; see the module docs for
    /// what is committed together. Acknowledge the envelope only after `Ok`.
    pub fn receive<R: CryptoRng + ?Sized>(
        &self,
        envelope: &Envelope,
        rng: &mut R,
        now: u64,
    ) -> Result<Received, EngineError> {
        if envelope.group.is_some() {
            return Err(EngineError::Unsupported {
                what: "group message",
            });
        }
        let from = Username::parse(&envelope.from).map_err(|_| EngineError::BadSender)?;
        self.not_me(&from)?;
        if self.store.read(|tx| tx.is_seen(&from, &envelope.id))? {
            return Ok(Received::Duplicate);
        }
        let body = &envelope.body;
        let decrypt_error = |source| EngineError::Decrypt {
            from: from.clone(),
            source,
        };
        let kind = ratchet::message_kind(body).map_err(decrypt_error)?;
        self.store.write(|tx| {
            if tx.is_seen(&from, &envelope.id)? {
                return Ok(Received::Duplicate);
            }
            let mut sessions = load_sessions(tx, &from, now)?;
            let mut new_session = None;
            let decrypted = match kind {
                MessageKind::Prekey => {
                    let info = PrekeyMessageInfo::parse(body).map_err(decrypt_error)?;
                    let base_key = info.initiation.base_key;
                    match sessions.iter().position(|s| s.base_key() == &base_key) {
                        Some(pos) => decrypt_in(tx, &from, &mut sessions, &[pos], body, rng, now)?,
                        None if tx.is_base_key_seen(&from, base_key.as_bytes())? => None,
                        None => {
                            let (session, plaintext) =
                                self.respond(tx, &from, &info, body, rng, now)?;
                            tx.mark_base_key_seen(&from, base_key.as_bytes())?;
                            let key_status = observe_in(tx, &from, session.remote_identity(), now)?;
                            new_session = Some(NewSession {
                                key_status,
                                used_one_time_prekey: session.used_one_time_prekey(),
                            });
                            sessions.insert(0, session);
                            sessions.truncate(MAX_SESSIONS_PER_CONTACT);
                            Some(plaintext)
                        }
                    }
                }
                MessageKind::Ratchet | _ => {
                    if sessions.is_empty() {
                        return Err(EngineError::NoSession { from: from.clone() });
                    }
                    let order: Vec<usize> = (0..sessions.len()).collect();
                    decrypt_in(tx, &from, &mut sessions, &order, body, rng, now)?
                }
            };
            let Some(plaintext) = decrypted else {
                return Ok(Received::Duplicate);
            };
            let text = String::from_utf8_lossy(&plaintext).into_owned();
            let mut entry = HistoryEntry {
                seq: 0,
                direction: Direction::Incoming,
                text,
                message_id: envelope.id,
                created_at: now,
                sent_at: Some(envelope.sent_at),
                received_at: Some(now),
                state: DeliveryState::Received,
                server_seq: Some(envelope.seq),
            };
            entry.seq = tx.append_history(&from, &entry)?;
            tx.mark_seen(&from, &envelope.id)?;
            save_sessions(tx, &from, &sessions)?;
            let contact = tx.contact(&from)?.ok_or(StoreError::Corrupt {
                table: "contacts/1",
                reason: "session without contact",
            })?;
            Ok(Received::Message(Box::new(ReceivedMessage {
                from: from.clone(),
                entry,
                contact,
                new_session,
            })))
        })
    }

    // ----- history -------------------------------------------------------

    /// The last `limit` messages with `user`, oldest first.
    pub fn history(&self, user: &Username, limit: usize) -> Result<Vec<HistoryEntry>, EngineError> {
        Ok(self.store.read(|tx| tx.history(user, limit))?)
    }

    // ----- helpers -------------------------------------------------------

    fn not_me(&self, user: &Username) -> Result<(), EngineError> {
        if user == self.me() {
            Err(EngineError::SelfContact)
        } else {
            Ok(())
        }
    }

    fn known(&self, user: &Username) -> Result<Contact, EngineError> {
        self.contact(user)?
            .ok_or_else(|| EngineError::UnknownContact { user: user.clone() })
    }

    fn safety_number_of(&self, contact: &Contact) -> SafetyNumber {
        SafetyNumber::compute(
            self.me(),
            self.unlocked.identity().identity_key(),
            &contact.username,
            contact.identity.identity_key(),
        )
    }

    fn finish_outbox(
        &self,
        id: &MessageId,
        state: DeliveryState,
        server_seq: Option<u64>,
        now: u64,
    ) -> Result<bool, EngineError> {
        self.store.write(|tx| {
            let Some(entry) = tx.outbox_entry(id)? else {
                return Ok(false);
            };
            tx.remove_outbox(id)?;
            if let Some(mut row) = tx.history_entry(&entry.to, entry.history_seq)? {
                row.state = state;
                row.server_seq = server_seq;
                if state == DeliveryState::Sent {
                    row.sent_at = Some(now);
                }
                tx.put_history(&entry.to, &row)?;
            }
            Ok(true)
        })
    }

    /// X3DH as the responder for a first message from `from`, with my
    /// prekeys from the store; deletes the one-time prekey it used (in the
    /// caller's transaction).
    fn respond<R: CryptoRng + ?Sized>(
        &self,
        tx: &mut Tx<'_>,
        from: &Username,
        info: &PrekeyMessageInfo,
        body: &[u8],
        rng: &mut R,
        now: u64,
    ) -> Result<(Session, Zeroizing<Vec<u8>>), EngineError> {
        let unknown = |id| EngineError::UnknownPrekey {
            from: from.clone(),
            id,
        };
        let spk_id = info.initiation.signed_prekey_id;
        let spk = tx.signed_prekey(spk_id)?.ok_or_else(|| unknown(spk_id))?;
        let opk = match info.initiation.one_time_prekey_id {
            Some(id) => Some(tx.one_time_prekey(id)?.ok_or_else(|| unknown(id))?),
            None => None,
        };
        let (session, plaintext) = Session::respond(
            rng,
            self.unlocked.identity(),
            self.me(),
            &spk.pair,
            opk.as_ref(),
            from,
            body,
            now,
        )
        .map_err(|source| EngineError::Decrypt {
            from: from.clone(),
            source,
        })?;
        if let Some(opk) = &opk {
            tx.remove_one_time_prekey(opk.id())?;
        }
        Ok((session, Zeroizing::new(plaintext)))
    }
}

/// Marks the current signed prekey (if any) as replaced at `now`.
fn retire_current(tx: &mut Tx<'_>, current: u32, now: u64) -> Result<(), StoreError> {
    if current == 0 {
        return Ok(());
    }
    if let Some(mut old) = tx.signed_prekey(current)? {
        old.retired_at = Some(now);
        tx.put_signed_prekey(&old)?;
    }
    Ok(())
}

/// Records `identity` for `user` and says how it compares.
fn observe_in(
    tx: &mut Tx<'_>,
    user: &Username,
    identity: &PublicIdentity,
    now: u64,
) -> Result<KeyStatus, StoreError> {
    match tx.contact(user)? {
        None => {
            tx.put_contact(&Contact {
                username: user.clone(),
                identity: identity.clone(),
                verified: false,
                key_changed: false,
                blocked: false,
                first_seen: now,
                changed_at: None,
                previous_identity: None,
            })?;
            Ok(KeyStatus::New)
        }
        Some(contact) if &contact.identity == identity => Ok(KeyStatus::Same),
        Some(mut contact) => {
            let was_verified = contact.verified;
            contact.previous_identity = Some(contact.identity.clone());
            contact.identity = identity.clone();
            contact.key_changed = true;
            contact.blocked = contact.blocked || was_verified;
            contact.verified = false;
            contact.changed_at = Some(now);
            tx.put_contact(&contact)?;
            Ok(KeyStatus::Changed { was_verified })
        }
    }
}

/// Whether the active session can carry a message to `contact`.
fn usable(sessions: &[Session], contact: &Contact) -> bool {
    sessions
        .first()
        .is_some_and(|s| s.remote_identity() == &contact.identity)
}

/// The sessions with `user`, active first, with expired skipped keys dropped
/// (`now` 0 skips expiry, for read-only callers).
fn load_sessions(tx: &Tx<'_>, user: &Username, now: u64) -> Result<Vec<Session>, StoreError> {
    let pickles = tx.sessions(user)?;
    let mut out = Vec::with_capacity(pickles.len());
    for pickle in &pickles {
        let mut session = Session::from_pickle(pickle).map_err(|_| StoreError::Corrupt {
            table: "sessions/1",
            reason: "session does not load",
        })?;
        if now != 0 {
            session.expire_skipped_keys(now);
        }
        out.push(session);
    }
    Ok(out)
}

fn save_sessions(tx: &mut Tx<'_>, user: &Username, sessions: &[Session]) -> Result<(), StoreError> {
    let pickles: Vec<_> = sessions.iter().map(Session::pickle).collect();
    tx.put_sessions(user, &pickles)
}

/// Tries the sessions at `order` in turn. `Ok(None)` means a duplicate;
/// on success the session that opened the message becomes active if it is
/// with the contact's current key.
fn decrypt_in<R: CryptoRng + ?Sized>(
    tx: &Tx<'_>,
    from: &Username,
    sessions: &mut Vec<Session>,
    order: &[usize],
    body: &[u8],
    rng: &mut R,
    now: u64,
) -> Result<Option<Zeroizing<Vec<u8>>>, EngineError> {
    let mut first_error = None;
    let mut duplicate = false;
    for &pos in order {
        match sessions[pos].decrypt(rng, body, now) {
            Ok(plaintext) => {
                if pos != 0 {
                    let current = tx.contact(from)?.map(|c| c.identity);
                    if current.as_ref() == Some(sessions[pos].remote_identity()) {
                        let session = sessions.remove(pos);
                        sessions.insert(0, session);
                    }
                }
                return Ok(Some(Zeroizing::new(plaintext)));
            }
            Err(RatchetError::Duplicate) => duplicate = true,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if duplicate {
        return Ok(None);
    }
    Err(EngineError::Decrypt {
        from: from.clone(),
        source: first_error.unwrap_or(RatchetError::Tampered),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::message_id;

    fn millis(id: &[u8; 16]) -> u64 {
        u64::from_be_bytes(id[..8].try_into().unwrap())
    }

    #[test]
    fn message_ids_start_with_the_send_time_in_milliseconds() {
        let mut rng = rand::rng();
        // An injected clock far from the wall clock: its own milliseconds.
        let a = message_id(1_000_000, &mut rng);
        let b = message_id(1_000_000, &mut rng);
        assert_eq!(millis(&a), 1_000_000_000);
        assert_ne!(a, b, "the random half differs");
        // The wall clock: its milliseconds, within that second.
        let now = crate::client::now();
        let id = message_id(now, &mut rng);
        let ms = millis(&id);
        assert!(
            ms / 1000 == now || ms / 1000 == now + 1 || ms == now * 1000,
            "{ms} vs {now}"
        );
        // Later ids sort after earlier ones (big-endian time first).
        let later = message_id(now + 5, &mut rng);
        assert!(later > id);
    }
}

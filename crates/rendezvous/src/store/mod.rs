//! The server's storage: a narrow interface owned by the service layer, with
//! redb as its one implementation.
//!
//! Everything the server keeps (accounts and the key directory, invites,
//! mailboxes of ciphertext envelopes, friends, groups, announcements) goes
//! through [`Store`]. Each method is one redb transaction, so each is atomic;
//! every write transaction commits with [`redb::Durability::Immediate`] and
//! two-phase commit (the server writes bytes that attackers choose, which is
//! the case redb recommends it for), except [`Store::ack`], a
//! [`Store::commit_batch`] of acks alone and [`Store::forget_friend_notices`]
//! (see there). A
//! method that returns `Ok` has been durably committed; one that returns `Err` may, after an I/O error in the
//! final `fsync`, still have been committed, which is why [`Store::append`] is
//! idempotent: a sender that retries gets [`AppendOutcome::Duplicate`].
//!
//! Group commit: [`Store::append`] takes a batch of envelopes (one per
//! recipient; a group send is one envelope per member) and stores them in one
//! write transaction, one `fsync` pair for the batch. The service layer
//! collects the batch; no envelope of it may be acknowledged before `append`
//! returns.
//!
//! Disk full and other I/O errors: redb refuses every later operation with
//! `PreviousIo` until the database is reopened. The store does that itself:
//! after a failed operation it drops the database and reopens it from the
//! same path (or the same backend factory) before the next operation, and an
//! operation that redb refuses with `PreviousIo` before it began reopens and
//! retries once (a commit that fails is never retried). While the disk
//! stays full, operations fail with [`StoreError::StorageFull`]; once space
//! returns, service resumes without a restart. `docs/storage.md` has the
//! table layout and the reasons behind each bound.
//!
//! What it does not do: it never sees plaintext (bodies are ciphertext made
//! on clients and stored as opaque bytes), checks no signatures (the service
//! verifies before it stores) and keeps no presence (that lives in memory).
//!
//! ```
//! use messenger_rendezvous::store::{AccountRecord, AppendOutcome, NewEnvelope, Store, StoreOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(&dir.path().join("server.redb"), StoreOptions::default())?;
//! for name in ["alice", "bob"] {
//!     let account = AccountRecord {
//!         username: name.to_owned(),
//!         identity: vec![1; 32],
//!         signed_prekey: vec![2; 96],
//!         registered_at: 1,
//!     };
//!     store.create_account(account, vec![(1, vec![3; 32])])?;
//! }
//! let sent = store.append(vec![NewEnvelope {
//!     recipient: "bob".to_owned(),
//!     sender: "alice".to_owned(),
//!     group: None,
//!     message_id: [7; 16],
//!     sent_at: 10,
//!     body: b"ciphertext".to_vec(),
//! }]);
//! let Ok(AppendOutcome::Stored { seq }) = sent[0] else { panic!("not stored") };
//! let pending = store.pending("bob", 0, 100)?;
//! assert_eq!(pending[0].seq, seq);
//! assert_eq!(store.ack("bob", &[seq])?, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use redb::{Database, DatabaseError, Durability, ReadableDatabase, WriteTransaction};

mod accounts;
mod create;
mod mailbox;

pub use mailbox::{COMPACT_BATCH_BYTES, Compacted};
mod segments;
mod social;
mod tables;

pub use redb::StorageBackend;

/// The directory where [`Store::open`] keeps the envelope bodies of the
/// database file `database`: `<file name>.bodies` beside it.
pub fn bodies_dir(database: &Path) -> PathBuf {
    segments::dir_for(database)
}

/// Default maximum number of envelopes waiting in one mailbox: a month of
/// heavy use (300 messages a day) for someone offline, while one abusive
/// sender cannot grow a mailbox without bound.
pub const DEFAULT_MAILBOX_MAX_MESSAGES: u32 = 10_000;

/// Default maximum body bytes waiting in one mailbox (64 MiB): 10,000
/// envelopes of the common 1-4 KiB size fit, plus a few relayed file chunks;
/// 1,000 offline users then cost at most 64 GiB of disk.
pub const DEFAULT_MAILBOX_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Default time an envelope waits for its recipient (30 days), as the
/// threat-model tests (T-41) assume: long enough for a holiday, short enough
/// that abandoned accounts do not keep ciphertext forever.
pub const DEFAULT_ENVELOPE_TTL_SECS: u64 = 30 * 24 * 60 * 60;

/// Most one-time prekeys stored per user. A client uploads about 100 at a
/// time; 1,000 covers ten uploads without anyone using up server space with
/// an endless pool (each costs about 60 bytes).
pub const MAX_ONE_TIME_PREKEYS: u32 = 1_000;

/// About the most envelopes (each a dedupe record and, unless it was acked,
/// the envelope) one [`Store::purge_expired`] call removes: it stops at the
/// first expiry row past this many, so that one
/// purge transaction stays short (well under 100 ms) and does not hold up
/// appends; the caller repeats while [`Purged::more`] is true.
pub const PURGE_BATCH: usize = 10_000;

/// Default size at which the store starts a new segment file of envelope
/// bodies (16 MiB): a segment is deleted once its last body is acknowledged
/// or expired, so smaller segments give space back sooner; larger ones
/// mean fewer files (one per 16 MiB: 64 per GiB waiting).
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Most announcements one [`Store::announcements_after`] call returns, so a
/// user returning after a long time gets them in bounded pages.
pub const MAX_ANNOUNCEMENTS_PER_CALL: usize = 1_000;

/// Tunable bounds of a [`Store`]; every field has a documented default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Most envelopes waiting per recipient ([`DEFAULT_MAILBOX_MAX_MESSAGES`]).
    pub mailbox_max_messages: u32,
    /// Most body bytes waiting per recipient ([`DEFAULT_MAILBOX_MAX_BYTES`]).
    pub mailbox_max_bytes: u64,
    /// Seconds after `sent_at` when an envelope expires
    /// ([`DEFAULT_ENVELOPE_TTL_SECS`]). The dedupe record of an envelope is
    /// kept for the same time, even after the envelope was acknowledged.
    pub envelope_ttl_secs: u64,
    /// Whether every write transaction uses redb's two-phase commit (two
    /// `fsync`s per commit; default true, see `docs/storage.md`
    /// "Durability"). With false a commit takes one `fsync` and redb relies
    /// on its page checksums to detect a torn commit at recovery, which is
    /// weaker against an attacker who can shape the bytes being written
    /// (redb's documentation of `set_two_phase_commit`).
    pub two_phase_commit: bool,
    /// Size at which a new segment file of bodies is started
    /// ([`DEFAULT_SEGMENT_MAX_BYTES`]).
    pub segment_max_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            mailbox_max_messages: DEFAULT_MAILBOX_MAX_MESSAGES,
            mailbox_max_bytes: DEFAULT_MAILBOX_MAX_BYTES,
            envelope_ttl_secs: DEFAULT_ENVELOPE_TTL_SECS,
            two_phase_commit: true,
            segment_max_bytes: DEFAULT_SEGMENT_MAX_BYTES,
        }
    }
}

/// An account and its long-lived public keys, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// Lowercase, already validated username.
    pub username: String,
    /// Public identity key bytes, as the service encodes them.
    pub identity: Vec<u8>,
    /// The current signed prekey (public key and signature), opaque.
    pub signed_prekey: Vec<u8>,
    /// Registration time, seconds since the Unix epoch.
    pub registered_at: u64,
}

/// A one-time prekey: its id (chosen by the owner) and public key bytes.
pub type OneTimePrekey = (u32, Vec<u8>);

/// An envelope to store: routing fields and an opaque ciphertext body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEnvelope {
    /// The user whose mailbox receives it.
    pub recipient: String,
    /// The authenticated sender.
    pub sender: String,
    /// The group it was sent to, if any.
    pub group: Option<String>,
    /// The sender's id for the message; with recipient and sender it makes
    /// the dedupe key.
    pub message_id: [u8; 16],
    /// When the server accepted it, seconds since the Unix epoch; expiry
    /// counts from here.
    pub sent_at: u64,
    /// Ciphertext made on the sender's client.
    pub body: Vec<u8>,
}

/// A stored envelope, as returned to its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeRecord {
    /// Server sequence number; increasing in order of storage (global, so
    /// per recipient too).
    pub seq: u64,
    /// The mailbox it sits in.
    pub recipient: String,
    /// The authenticated sender.
    pub sender: String,
    /// The group it was sent to, if any.
    pub group: Option<String>,
    /// The sender's id for the message.
    pub message_id: [u8; 16],
    /// When the server accepted it.
    pub sent_at: u64,
    /// Ciphertext.
    pub body: Vec<u8>,
}

/// What one [`Store::purge_expired`] call removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Purged {
    /// Expired envelopes removed that were still waiting (not acked).
    pub envelopes: u32,
    /// Whether the call stopped at [`PURGE_BATCH`]: more may be due.
    pub more: bool,
}

/// What [`Store::commit_batch`] did: one result per appended envelope and
/// one removed count per ack, each in the order given.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Per envelope, as [`Store::append`] reports it.
    pub appended: Vec<Result<AppendOutcome, StoreError>>,
    /// Per ack, how many envelopes it removed.
    pub acked: Vec<u32>,
}

/// What became of one envelope of an [`Store::append`] batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Newly stored and durably committed under this sequence number.
    Stored {
        /// The envelope's sequence number.
        seq: u64,
    },
    /// The same (recipient, sender, message id) was stored before (and may
    /// since have been delivered): nothing stored again; safe to acknowledge.
    Duplicate {
        /// Sequence number of the first copy.
        seq: u64,
    },
}

/// Result of [`Store::friend_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FriendRequestOutcome {
    /// A new pending request from `from` to `to`.
    Sent,
    /// They are friends already; nothing changed.
    AlreadyFriends,
    /// The same request is already pending; nothing changed.
    AlreadyRequested,
    /// `to` had already asked `from`: the two are now friends, and `to`
    /// has a [`FriendNotice::Accepted`] kept under this number.
    AcceptedReverse {
        /// The kept notice's number.
        notice: u64,
    },
}

/// What a user is told about a friend request they made, or a friendship
/// that ended: kept by the transaction that made it (so a crash cannot lose
/// it), pushed at once if the user is online, else at their next login.
/// Per pair of users only the latest is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FriendNotice {
    /// The other user declined the request.
    Declined,
    /// The other user accepted it: they are friends.
    Accepted,
    /// The other user ended the friendship.
    Removed,
}

impl FriendNotice {
    /// The byte stored for it in `friend_notices/1`.
    pub(super) fn to_u8(self) -> u8 {
        match self {
            Self::Declined => 0,
            Self::Accepted => 1,
            Self::Removed => 2,
        }
    }

    /// The notice a stored byte names; `None` for a byte no version wrote.
    pub(super) fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Declined),
            1 => Some(Self::Accepted),
            2 => Some(Self::Removed),
            _ => None,
        }
    }
}

/// A [`FriendNotice`] kept for a user ([`Store::friend_notices`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptNotice {
    /// Who answered or ended the friendship.
    pub other: String,
    /// Its number: names this notice when it is forgotten.
    pub number: u64,
    /// What happened.
    pub notice: FriendNotice,
}

/// A group and its owner-signed roster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// The group's unique name.
    pub name: String,
    /// The owner, who signs every roster.
    pub owner: String,
    /// Roster version; every update must raise it.
    pub version: u64,
    /// Members, the owner included, as the signed roster lists them.
    pub members: Vec<String>,
    /// The owner's signature over `roster_bytes`, opaque here.
    pub roster_signature: Vec<u8>,
    /// The signed roster exactly as the owner sent it.
    pub roster_bytes: Vec<u8>,
}

/// A server announcement, signed by the server key (opaque here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnouncementRecord {
    /// Increasing id, assigned by [`Store::add_announcement`] (from 1).
    pub id: u64,
    /// When it was issued, seconds since the Unix epoch.
    pub issued_at: u64,
    /// The signed announcement.
    pub bytes: Vec<u8>,
}

/// Which per-recipient bound an append would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaKind {
    /// The number of waiting envelopes.
    Count,
    /// The body bytes of waiting envelopes.
    Bytes,
}

/// Errors of the store. Messages name the operation, never any stored bytes.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The username is taken.
    #[error("user already exists")]
    UserExists,
    /// No account has this username.
    #[error("unknown user")]
    UnknownUser,
    /// The recipient's mailbox is full.
    #[error("recipient's mailbox quota exceeded ({kind:?}, limit {limit})")]
    QuotaExceeded {
        /// Which bound.
        kind: QuotaKind,
        /// The bound's value.
        limit: u64,
    },
    /// A group with this name exists.
    #[error("group already exists")]
    GroupExists,
    /// No group has this name.
    #[error("unknown group")]
    UnknownGroup,
    /// The stored group version is not the expected one, or the new version
    /// does not raise it.
    #[error("group version conflict: stored version is {stored}")]
    VersionConflict {
        /// The version stored now.
        stored: u64,
    },
    /// There is no such pending friend request.
    #[error("no such friend request")]
    NoSuchRequest,
    /// The two users are not friends.
    #[error("not friends")]
    NotFriends,
    /// A user cannot befriend themself.
    #[error("a user cannot befriend themself")]
    SelfFriend,
    /// The one-time prekey id was stored before (ids must rise above every
    /// id ever stored for the user).
    #[error("one-time prekey id {0} was used before")]
    PrekeyIdReused(u32),
    /// Storing these one-time prekeys would exceed the per-user cap.
    #[error("too many one-time prekeys (limit {limit})")]
    TooManyPrekeys {
        /// [`MAX_ONE_TIME_PREKEYS`].
        limit: u32,
    },
    /// The disk (or quota) is full; nothing of the operation was committed.
    /// The store recovers by itself once space returns.
    #[error("storage full during {op}")]
    StorageFull {
        /// The operation that failed.
        op: &'static str,
        /// The redb error carrying the I/O error.
        #[source]
        source: Arc<redb::Error>,
    },
    /// Another process has the database open (redb locks the file).
    #[error(
        "the database is open in another process (is another rendezvous serving this data directory?)"
    )]
    InUse,
    /// Any other storage failure.
    #[error("storage error during {op}: {source}")]
    Storage {
        /// The operation that failed.
        op: &'static str,
        /// The redb error.
        #[source]
        source: Arc<redb::Error>,
    },
    /// The database holds something this code did not write.
    #[error("database corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the database must be reopened before it serves again (an I/O
    /// error, a full disk, or redb's `PreviousIo`). An error of a segment
    /// file ([`segments::io_error`]) does not: redb did not see it.
    fn needs_reopen(&self) -> bool {
        match self {
            Self::StorageFull { source, .. } | Self::Storage { source, .. } => match &**source {
                redb::Error::Io(io) => !segments::is_segment_error(io),
                redb::Error::PreviousIo | redb::Error::Backend(_) => true,
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether redb refused because of an earlier I/O error, before doing
    /// anything: the operation can be retried after a reopen.
    fn is_previous_io(&self) -> bool {
        match self {
            Self::StorageFull { source, .. } | Self::Storage { source, .. } => {
                matches!(**source, redb::Error::PreviousIo)
            }
            _ => false,
        }
    }
}

/// The server's store; cheap to clone (one shared database inside).
///
/// Reads run concurrently; write transactions serialize inside redb.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("source", &self.inner.source)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database file at `path`.
    ///
    /// A new database is created under a temporary name in the same
    /// directory (`<name>.creating`) and renamed to `path` once complete
    /// and synced, so a crash during the first creation leaves nothing at
    /// `path`; a temporary file left by such a crash is removed here. An
    /// existing database is opened as it is.
    ///
    /// Envelope bodies are kept in segment files in the directory
    /// `<file name>.bodies` beside it (created if missing); the database and
    /// that directory belong together (docs/storage.md, docs/operations.md).
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        create::ensure_created(path, options)?;
        let owned: PathBuf = path.to_owned();
        let opener = move || Database::builder().create(&owned);
        Self::from_opener(
            Box::new(opener),
            &segments::dir_for(path),
            format!("{}", path.display()),
            options,
        )
    }

    /// Opens a database on backends made by `factory`, which is called again
    /// whenever the store reopens after an I/O error (so it must give a
    /// backend over the same storage), with envelope bodies in segment files
    /// in the directory `bodies`. For fault-injection tests.
    pub fn open_with_backend<B, F>(
        factory: F,
        bodies: &Path,
        options: StoreOptions,
    ) -> Result<Store, StoreError>
    where
        B: StorageBackend,
        F: Fn() -> io::Result<B> + Send + Sync + 'static,
    {
        let opener = move || {
            let backend = factory()?;
            Database::builder().create_with_backend(backend)
        };
        Self::from_opener(
            Box::new(opener),
            bodies,
            "custom backend".to_owned(),
            options,
        )
    }

    /// The options the store was opened with.
    pub fn options(&self) -> StoreOptions {
        self.inner.options
    }

    /// Runs redb's full integrity check (checksums of every page) and
    /// repairs the allocator state, then reads every waiting body from the
    /// segment files (checking its CRC-32) and checks the segments' counts
    /// against the index; `Ok(true)` when nothing needed repair, `Corrupt`
    /// when a body or count is wrong. Waits for all running operations.
    pub fn check_integrity(&self) -> Result<bool, StoreError> {
        const OP: &str = "check integrity";
        let mut slot = self
            .inner
            .slot
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.db.is_none() || self.inner.failed.load(Ordering::Acquire) {
            self.reopen_locked(&mut slot, OP)?;
        }
        let Some(db) = slot.db.as_mut() else {
            return Err(StoreError::Corrupt("database not open".to_owned()));
        };
        // A failed check discards redb's allocator state: no write
        // transaction begins until the database is reopened.
        let intact = db.check_integrity().map_err(|e| {
            self.inner.failed.store(true, Ordering::Release);
            classify(OP, e.into())
        })?;
        drop(slot);
        self.check_bodies()?;
        Ok(intact)
    }

    fn from_opener(
        opener: Opener,
        bodies: &Path,
        source: String,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let segments =
            segments::Segments::open(bodies).map_err(|e| segments::io_error("open", e))?;
        let db = opener().map_err(|e| classify("open", e.into()))?;
        let store = Store {
            inner: Arc::new(Inner {
                slot: RwLock::new(Slot {
                    db: Some(db),
                    generation: 0,
                }),
                failed: AtomicBool::new(false),
                opener,
                source,
                options,
                segments,
                deferred: Mutex::new(Vec::new()),
            }),
        };
        store.write("create tables", tables::create_all)?;
        // Recovery first, so the moves below start from a directory that
        // matches the committed rows (and a missing segment is reported as
        // such); a crash during a move leaves what the next open recovers.
        store.recover_segments()?;
        store.migrate_bodies()?;
        store.migrate_dedupe()?;
        Ok(store)
    }

    /// Runs `f` on the open database, reopening it first if an earlier
    /// operation failed with an I/O error, and once more (with a retry) if
    /// redb refused to begin `f`'s transaction with `PreviousIo`: only then
    /// is it known that nothing was done. A later `PreviousIo` (a commit
    /// can return it after its durable part) is not retried: the first try
    /// may have been committed, and a retry would answer `Duplicate` or
    /// `UserExists` to what the caller sees as its first try.
    fn run<T>(&self, f: impl Fn(&Database) -> Result<T, RunError>) -> Result<T, StoreError> {
        let mut retried = false;
        loop {
            let generation;
            {
                let slot = self
                    .inner
                    .slot
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                generation = slot.generation;
                if let Some(db) = slot.db.as_ref()
                    && !self.inner.failed.load(Ordering::Acquire)
                {
                    match f(db) {
                        Ok(value) => return Ok(value),
                        Err(RunError::Begin(e)) if e.is_previous_io() && !retried => {
                            self.inner.failed.store(true, Ordering::Release);
                        }
                        Err(RunError::Begin(e) | RunError::Op(e)) => {
                            if e.needs_reopen() {
                                self.inner.failed.store(true, Ordering::Release);
                            }
                            return Err(e);
                        }
                    }
                }
            }
            retried = true;
            self.reopen(generation)?;
        }
    }

    /// Drops and reopens the database unless another thread already did
    /// since `seen_generation`.
    fn reopen(&self, seen_generation: u64) -> Result<(), StoreError> {
        let mut slot = self
            .inner
            .slot
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.generation != seen_generation {
            return Ok(());
        }
        self.reopen_locked(&mut slot, "reopen")
    }

    /// Drops and reopens the database, with the slot's write lock held (so
    /// no operation runs), and brings the deferred segment deletions in
    /// line with what the reopened database holds.
    ///
    /// Relaxed commits not yet made durable may have been rolled back (after
    /// an I/O error redb does not write them out when it closes), bringing
    /// back the rows of segments they emptied: those segments are dropped
    /// from the list (deleting them would lose bodies that rows name). A
    /// listed segment without a row was truly emptied by a commit that
    /// survived, and stays listed for deletion after the next durable
    /// commit (forgetting it would leave its file until the next open).
    fn reopen_locked(&self, slot: &mut Slot, op: &'static str) -> Result<(), StoreError> {
        // The old handle must be closed (file lock released) before the new open.
        slot.db = None;
        slot.generation += 1;
        let db = (self.inner.opener)().map_err(|e| classify(op, e.into()))?;
        let mut deferred = self.deferred();
        let kept = if deferred.is_empty() {
            Ok(Vec::new())
        } else {
            without_rows(&db, op, &deferred)
        };
        slot.db = Some(db);
        match kept {
            Ok(kept) => {
                *deferred = kept;
                self.inner.failed.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Unknown which rows came back: keeping the files is safe.
                deferred.clear();
                self.inner.failed.store(e.needs_reopen(), Ordering::Release);
                Err(e)
            }
        }
    }

    /// Commits `tx`. A commit that fails (or panics) part way leaves redb
    /// refusing new write transactions until the database is reopened (its
    /// allocator state is discarded), whatever the error: every failure but
    /// a poisoned transaction (refused before anything was written) marks
    /// the store failed, so the next operation reopens first.
    fn commit(&self, op: &'static str, tx: WriteTransaction) -> Result<(), StoreError> {
        let pending = FailUnlessDone(&self.inner.failed, true);
        match tx.commit() {
            Ok(()) => {
                pending.done();
                Ok(())
            }
            Err(redb::CommitError::TransactionPoisoned) => {
                pending.done();
                Err(classify(op, redb::Error::TransactionPoisoned))
            }
            Err(e) => Err(classify(op, e.into())),
        }
    }

    /// One durable write transaction: `f` fills it, then it commits with
    /// immediate durability and (by default) two-phase commit. Nothing is committed if `f`
    /// fails.
    fn write<T>(
        &self,
        op: &'static str,
        f: impl Fn(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (value, emptied) = self.run(|db| {
            let mut tx = db.begin_write().map_err(|e| RunError::begin(op, e))?;
            tx.set_durability(Durability::Immediate)
                .map_err(|e| classify(op, e.into()))?;
            tx.set_two_phase_commit(self.inner.options.two_phase_commit);
            let value = f(&tx)?;
            // Taken while this transaction holds redb's single write slot:
            // each relaxed commit lists its emptied segments only after it
            // committed, so everything listed now committed before this
            // transaction and this commit makes it durable. Taken after the
            // commit instead, the list could hold segments of a relaxed
            // commit made in between, which a crash would still roll back
            // (their rows back, their files gone: `Corrupt` at open).
            let emptied = std::mem::take(&mut *self.deferred());
            if let Err(e) = self.commit(op, tx) {
                // Maybe committed after all: the reopen sorts them out.
                self.deferred().extend(emptied);
                return Err(e.into());
            }
            Ok((value, emptied))
        })?;
        self.inner.segments.delete(&emptied);
        Ok(value)
    }

    /// The segments relaxed commits emptied, waiting for a durable commit.
    fn deferred(&self) -> MutexGuard<'_, Vec<u64>> {
        self.inner
            .deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A durable write transaction that may empty segments of bodies: `f`
    /// lists them in its second argument, and they are deleted once the
    /// commit is durable.
    fn write_segments<T>(
        &self,
        op: &'static str,
        f: impl Fn(&WriteTransaction, &mut Vec<u64>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (value, dead) = self.write(op, |tx| {
            let mut dead = Vec::new();
            let value = f(tx, &mut dead)?;
            Ok((value, dead))
        })?;
        self.inner.segments.delete(&dead);
        Ok(value)
    }

    /// [`Store::write_segments`] without `fsync`: one write transaction that
    /// its own commit does not make durable ([`Durability::None`]): it
    /// becomes durable with the next durable commit (the group commit,
    /// continuous under load) or when the database closes; a crash before
    /// then rolls it back whole. Only for changes whose loss is harmless.
    ///
    /// The segments it emptied are listed for deletion after the next
    /// durable commit, right after its commit and before the slot's read
    /// lock is released: a reopen (which sorts the list against the rows
    /// that survived) cannot come in between.
    fn write_relaxed_segments<T>(
        &self,
        op: &'static str,
        f: impl Fn(&WriteTransaction, &mut Vec<u64>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let value = self.run(|db| {
            let mut tx = db.begin_write().map_err(|e| RunError::begin(op, e))?;
            tx.set_durability(Durability::None)
                .map_err(|e| classify(op, e.into()))?;
            let mut dead = Vec::new();
            let value = f(&tx, &mut dead)?;
            self.commit(op, tx)?;
            if !dead.is_empty() {
                self.deferred().extend(dead);
            }
            Ok(value)
        })?;
        #[cfg(test)]
        tests::after_relaxed_write(self);
        Ok(value)
    }

    /// One read transaction.
    fn read<T>(
        &self,
        op: &'static str,
        f: impl Fn(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.run(|db| {
            let tx = db.begin_read().map_err(|e| RunError::begin(op, e))?;
            Ok(f(&tx)?)
        })
    }
}

/// Of `segments` (emptied by relaxed commits), those that have no row in
/// the segments table of `db`, read in one read transaction.
fn without_rows(db: &Database, op: &'static str, segments: &[u64]) -> Result<Vec<u64>, StoreError> {
    let tx = db.begin_read().op(op)?;
    let table = tx.open_table(tables::SEGMENTS).op(op)?;
    let mut kept = Vec::with_capacity(segments.len());
    for &segment in segments {
        if table.get(segment).op(op)?.is_none() {
            kept.push(segment);
        }
    }
    Ok(kept)
}

/// How an operation run by [`Store::run`] failed.
enum RunError {
    /// redb refused to begin its transaction: nothing was done.
    Begin(StoreError),
    /// Anything later, the commit included.
    Op(StoreError),
}

impl RunError {
    /// The error of `begin_write` or `begin_read`.
    fn begin(op: &'static str, err: redb::TransactionError) -> Self {
        Self::Begin(classify(op, err.into()))
    }
}

impl From<StoreError> for RunError {
    fn from(err: StoreError) -> Self {
        Self::Op(err)
    }
}

impl From<RunError> for StoreError {
    fn from(err: RunError) -> Self {
        match err {
            RunError::Begin(e) | RunError::Op(e) => e,
        }
    }
}

/// Marks the store failed when dropped while still armed: a commit that
/// returns an error, or unwinds.
struct FailUnlessDone<'a>(&'a AtomicBool, bool);

impl FailUnlessDone<'_> {
    fn done(mut self) {
        self.1 = false;
    }
}

impl Drop for FailUnlessDone<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::Release);
        }
    }
}

type Opener = Box<dyn Fn() -> Result<Database, DatabaseError> + Send + Sync>;

struct Inner {
    slot: RwLock<Slot>,
    /// Set after an I/O error: the next operation reopens first.
    failed: AtomicBool,
    opener: Opener,
    source: String,
    options: StoreOptions,
    /// The segment files of envelope bodies.
    segments: segments::Segments,
    /// Segments emptied by relaxed commits, deleted after the next durable
    /// one (before it, a crash could bring their rows back).
    deferred: Mutex<Vec<u64>>,
}

struct Slot {
    db: Option<Database>,
    /// Bumped on every reopen, so that concurrent failures reopen once.
    generation: u64,
}

/// Maps a redb error to a [`StoreError`], naming the operation.
fn classify(op: &'static str, err: redb::Error) -> StoreError {
    match &err {
        redb::Error::Corrupted(msg) => return StoreError::Corrupt(format!("{op}: {msg}")),
        redb::Error::DatabaseAlreadyOpen => return StoreError::InUse,
        _ => {}
    }
    let full = match &err {
        redb::Error::Io(io) => io_is_full(io),
        redb::Error::Backend(inner) => chain_is_full(&**inner),
        _ => false,
    };
    let source = Arc::new(err);
    if full {
        StoreError::StorageFull { op, source }
    } else {
        StoreError::Storage { op, source }
    }
}

/// Extension to name the operation of any redb result.
trait OpResult<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> OpResult<T> for Result<T, E> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| classify(op, e.into()))
    }
}

/// `ENOSPC` on Linux and most Unixes.
const ENOSPC: i32 = 28;
/// `EDQUOT` on Linux.
const EDQUOT: i32 = 122;

fn io_is_full(err: &io::Error) -> bool {
    if matches!(
        err.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(err.raw_os_error(), Some(ENOSPC | EDQUOT))
    {
        return true;
    }
    err.get_ref().is_some_and(|inner| chain_is_full(inner))
}

fn chain_is_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io_is_full(io)
        {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
pub(crate) mod tests;

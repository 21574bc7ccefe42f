//! The local store: one redb file in the home (`HOME/store.redb`) whose every
//! secret or content value is sealed under the storage key.
//!
//! * Sealing: XChaCha20-Poly1305 with a random 24-byte nonce under
//!   `HKDF-SHA256(ikm = storage key, info = "messenger/1 local store record")`.
//!   The associated data is `table name ‖ 0x00 ‖ record key`, so a sealed value
//!   moved to another row or table no longer opens. A sealed value is
//!   `0x01 ‖ nonce(24) ‖ ciphertext ‖ tag(16)`.
//! * Blind index: record keys that would name a contact use
//!   `HMAC-SHA256(index key, "contact" ‖ username)[..16]`, the index key being
//!   `HKDF-SHA256(ikm = storage key, info = "messenger/1 local store index")`,
//!   so usernames never appear in clear.
//! * A store opened with the wrong storage key fails at once with
//!   [`StoreError::WrongKey`]: the `meta` row is sealed like everything else.
//! * Every write transaction commits with [`Durability::Immediate`] and
//!   two-phase commit; a caller groups the changes that must go together into
//!   one [`Store::write`].
//!
//! `docs/client-storage.md` lists every table with its key and value layout.
//! This module only persists; the rules (what goes together, key-change
//! policy) live in [`crate::engine`].

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use messenger_crypto::identity::{IdentityKey, PublicIdentity, Username};
use messenger_crypto::prekey::{OneTimePrekeyPair, SignedPrekeyPair};
use messenger_crypto::ratchet::SessionPickle;
use messenger_crypto::secret::Secret32;
use messenger_proto::msg::MessageId;
use rand::Rng;
use redb::backends::FileBackend;
use redb::{
    Database, DatabaseError, Durability, ReadableTable, StorageBackend, StorageError,
    TableDefinition, TransactionError, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// File name of the store inside a home.
pub const STORE_FILE: &str = "store.redb";
/// Format of the records this build writes and reads (kept in `meta`).
pub const STORE_FORMAT: u32 = 1;
/// First byte of every sealed value: the sealing scheme.
pub const SEAL_VERSION: u8 = 1;
/// HKDF info of the record-sealing subkey.
pub const RECORD_KEY_INFO: &[u8] = b"messenger/1 local store record";
/// HKDF info of the blind-index subkey.
pub const INDEX_KEY_INFO: &[u8] = b"messenger/1 local store index";
/// Length of a blind index: 128 bits keeps collisions between contacts out of
/// reach (birthday bound 2^64) while halving the key size of a full HMAC.
pub const BLIND_INDEX_LEN: usize = 16;
/// Length of the XChaCha20-Poly1305 nonce. Random 192-bit nonces under one
/// long-lived key stay far from the birthday bound, unlike 96-bit ones
/// (security.md, "Nonce reuse").
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Most sessions kept per contact (the active one and archived ones), so a
/// message from a session the peer still uses after a simultaneous first
/// contact or a reinstall can be read; libsignal keeps more (40), but every
/// extra one costs a trial decryption of a message that fits none.
pub const MAX_SESSIONS_PER_CONTACT: usize = 5;

/// A contact's blind index.
pub type BlindIndex = [u8; BLIND_INDEX_LEN];

/// Why the store failed. No variant carries key bytes or record contents.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store does not open with this storage key: the key file and the
    /// store belong to different identities, or the store was damaged.
    #[error("the local store does not open with this identity's storage key")]
    WrongKey,
    /// The store opened but was made for another identity.
    #[error("the local store belongs to another identity")]
    OtherIdentity,
    /// Another process has the store open.
    #[error("the local store {} is in use by another process", path.display())]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// Written by a newer build.
    #[error("unsupported local store format {found}; a newer messenger may read it")]
    UnsupportedFormat {
        /// The format found.
        found: u32,
    },
    /// A record failed to open or decode.
    #[error("damaged record in table {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What is wrong, in a few words.
        reason: &'static str,
    },
    /// A filesystem operation on the store file failed.
    #[error("could not {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// redb failed.
    #[error("local store error during {op}")]
    Database {
        /// The operation.
        op: &'static str,
        /// The redb error.
        #[source]
        source: Box<redb::Error>,
    },
}

/// The tables. Every key and value is a byte string; values are sealed
/// except in `seen`, whose value is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `"state"` → [`MetaRecord`].
    Meta,
    /// prekey id (u32 BE) → [`SignedPrekeyRecord`].
    SignedPrekeys,
    /// prekey id (u32 BE) → one-time prekey secret.
    OneTimePrekeys,
    /// blind index → [`Contact`].
    Contacts,
    /// blind index → the contact's sessions, active first.
    Sessions,
    /// blind index ‖ seq (u64 BE) → [`HistoryEntry`].
    History,
    /// message id → [`OutboxEntry`].
    Outbox,
    /// sender's blind index ‖ message id (16 bytes) → empty, and sender's
    /// blind index ‖ X3DH base key (32 bytes) → empty.
    Seen,
}

impl Table {
    /// Every table, in the order they are created.
    pub const ALL: [Table; 8] = [
        Self::Meta,
        Self::SignedPrekeys,
        Self::OneTimePrekeys,
        Self::Contacts,
        Self::Sessions,
        Self::History,
        Self::Outbox,
        Self::Seen,
    ];

    /// The redb table name (with its layout version), also the first part of
    /// the sealing AD.
    pub fn name(self) -> &'static str {
        match self {
            Self::Meta => "meta/1",
            Self::SignedPrekeys => "my_signed_prekeys/1",
            Self::OneTimePrekeys => "my_one_time_prekeys/1",
            Self::Contacts => "contacts/1",
            Self::Sessions => "sessions/1",
            Self::History => "history/1",
            Self::Outbox => "outbox/1",
            Self::Seen => "seen/1",
        }
    }

    fn def(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

/// The store's own state (table `meta`, key `"state"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRecord {
    /// [`STORE_FORMAT`].
    pub format: u32,
    /// The owner's Ed25519 identity key.
    pub owner: [u8; 32],
    /// The next prekey id to hand out (signed and one-time prekeys share
    /// one counter, so no id ever repeats; see `PrekeyIdCounter`).
    pub next_prekey_id: u32,
    /// Id of the signed prekey being published; 0 before registration.
    pub current_signed_prekey: u32,
    /// Whether the server confirmed it holds the current signed prekey.
    pub signed_prekey_published: bool,
}

/// One of my signed prekeys, with its secret.
#[derive(Debug, Clone)]
pub struct SignedPrekeyRecord {
    /// The key pair (zeroized on drop).
    pub pair: SignedPrekeyPair,
    /// When it was made.
    pub created_at: u64,
    /// When a newer one replaced it; `None` while current.
    pub retired_at: Option<u64>,
}

/// Who a contact is and how far we trust their key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// The contact's username.
    pub username: Username,
    /// The identity key we know them by now.
    pub identity: PublicIdentity,
    /// The safety number of the current key was compared.
    pub verified: bool,
    /// The key changed since it was last verified or acknowledged.
    pub key_changed: bool,
    /// A verified contact whose key changed: sending is refused until the
    /// new safety number is verified.
    pub blocked: bool,
    /// When we first saw this contact.
    pub first_seen: u64,
    /// When the key last changed.
    pub changed_at: Option<u64>,
    /// The key before the last change.
    pub previous_identity: Option<PublicIdentity>,
}

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// I received it.
    Incoming,
    /// I wrote it.
    Outgoing,
}

/// Where a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Outgoing, encrypted and in the outbox, not yet accepted by the server.
    Pending,
    /// Outgoing, accepted by the server.
    Sent,
    /// Outgoing, confirmed delivered (reserved: the protocol has no receipts yet).
    Delivered,
    /// Outgoing, given up on (the server refused it for good).
    Failed,
    /// Incoming, decrypted and stored.
    Received,
}

/// One row of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Position in the conversation (per contact, from 1, increasing).
    pub seq: u64,
    /// In or out.
    pub direction: Direction,
    /// The text.
    pub text: String,
    /// The message id (mine for outgoing, the sender's for incoming).
    pub message_id: MessageId,
    /// Local time the row was made (encrypted, or received).
    pub created_at: u64,
    /// Outgoing: local time the server accepted it. Incoming: the server's
    /// acceptance time from the envelope.
    pub sent_at: Option<u64>,
    /// Incoming: local time it was received.
    pub received_at: Option<u64>,
    /// Delivery state.
    pub state: DeliveryState,
    /// The server's sequence number (outgoing once sent; incoming from the
    /// envelope).
    pub server_seq: Option<u64>,
}

/// A ciphertext committed for sending. Resending it must reuse the same id
/// and body (the server drops a repeated id; the ratchet never re-encrypts).
#[derive(Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Recipient.
    pub to: Username,
    /// Random message id.
    pub id: MessageId,
    /// The ciphertext.
    pub body: Vec<u8>,
    /// When it was encrypted.
    pub created_at: u64,
    /// Its history row (per contact).
    pub history_seq: u64,
}

impl fmt::Debug for OutboxEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxEntry")
            .field("to", &self.to)
            .field("id", &Hex(&self.id))
            .field("body_len", &self.body.len())
            .field("created_at", &self.created_at)
            .field("history_seq", &self.history_seq)
            .finish()
    }
}

struct Hex<'a>(&'a [u8]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The two subkeys derived from the storage key.
#[derive(Zeroize, ZeroizeOnDrop)]
struct Keys {
    record: [u8; 32],
    index: [u8; 32],
}

/// The open store. `Debug` shows only the path.
pub struct Store {
    /// None only while a reopen failed; the next transaction tries again.
    db: Mutex<Option<Database>>,
    /// Opens the database again after an I/O error ([`Store::begin`]).
    opener: Opener,
    keys: Keys,
    owner: IdentityKey,
    path: PathBuf,
}

/// How a [`Store`] opens its database file again.
type Opener = Box<dyn Fn() -> Result<Database, StoreError> + Send + Sync>;

/// Opens the existing database file at `path` again, with redb's own file
/// backend. Never creates one: should the file have gone meanwhile, the
/// store reports it rather than carry on in an empty new file.
fn reopener(path: &Path) -> Opener {
    let path = path.to_owned();
    Box::new(move || Database::builder().open(&path).map_err(open_error(&path)))
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One transaction over the store: typed reads and writes of sealed records.
pub struct Tx<'s> {
    tx: WriteTransaction,
    store: &'s Store,
}

impl fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tx(..)")
    }
}

const META_KEY: &[u8] = b"state";

impl Store {
    /// Opens (creating if needed, mode 0600) the store at `path` for the
    /// identity `owner`, sealed under `storage_key`.
    ///
    /// A new store is built under a temporary name beside `path`
    /// ([`CREATING_MARK`]), committed, synced and then linked to `path`
    /// without replacing anything there, so a crash during the very first
    /// creation never leaves a half-made file at `path` (redb refuses such
    /// a file). Temporary files an earlier crash left behind are removed
    /// once they are older than [`STALE_CREATION`].
    pub fn open(
        path: &Path,
        storage_key: &Secret32,
        owner: &IdentityKey,
    ) -> Result<Store, StoreError> {
        match fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_new_store(path, storage_key, owner)?;
            }
            Err(source) => return Err(io_error("inspect", path)(source)),
        }
        Self::open_existing(path, storage_key, owner)
    }

    /// [`Store::open`] on a file that exists (or, for a new store being
    /// built, was just created empty with mode 0600).
    fn open_existing(
        path: &Path,
        storage_key: &Secret32,
        owner: &IdentityKey,
    ) -> Result<Store, StoreError> {
        let db = Database::builder().create(path).map_err(open_error(path))?;
        Self::on_database(db, reopener(path), path, storage_key, owner)
    }

    /// [`Store::open_existing`] once the database is open (and `opener`
    /// opens it again): derives the keys, creates the tables and checks
    /// (or, new, writes) the metadata.
    fn on_database(
        db: Database,
        opener: Opener,
        path: &Path,
        storage_key: &Secret32,
        owner: &IdentityKey,
    ) -> Result<Store, StoreError> {
        let hk = Hkdf::<Sha256>::new(None, storage_key.expose());
        let mut keys = Keys {
            record: [0; 32],
            index: [0; 32],
        };
        // 32 bytes is always a valid HKDF-SHA256 output length.
        if hk.expand(RECORD_KEY_INFO, &mut keys.record).is_err()
            || hk.expand(INDEX_KEY_INFO, &mut keys.index).is_err()
        {
            return Err(StoreError::WrongKey);
        }
        let store = Store {
            db: Mutex::new(Some(db)),
            opener,
            keys,
            owner: *owner,
            path: path.to_owned(),
        };
        store.write(|tx| {
            for table in Table::ALL {
                tx.tx
                    .open_table(table.def())
                    .map_err(db_error("create table"))?;
            }
            match tx.get_raw(Table::Meta, META_KEY)? {
                None => tx.put_meta(&MetaRecord {
                    format: STORE_FORMAT,
                    owner: owner.to_bytes(),
                    next_prekey_id: 1,
                    current_signed_prekey: 0,
                    signed_prekey_published: false,
                }),
                Some(sealed) => {
                    let plain = tx
                        .store
                        .unseal(Table::Meta, META_KEY, &sealed)
                        .map_err(|_| StoreError::WrongKey)?;
                    let meta: MetaRecord = decode(Table::Meta, &plain)?;
                    if meta.format != STORE_FORMAT {
                        return Err(StoreError::UnsupportedFormat { found: meta.format });
                    }
                    if meta.owner != owner.to_bytes() {
                        return Err(StoreError::OtherIdentity);
                    }
                    Ok(())
                }
            }
        })?;
        Ok(store)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The blind index of `user`.
    pub fn blind_index(&self, user: &Username) -> BlindIndex {
        blind_index(&self.keys.index, user)
    }

    /// Runs `f` in one write transaction and commits (durably, two-phase)
    /// only if it returns `Ok`; if `f` returns `Err` nothing of it is
    /// stored. A commit that fails with an I/O error is not on disk if the
    /// write or first `fsync` failed; one whose final `fsync` reported an
    /// error after writing may be.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut tx = self.begin()?;
        tx.set_durability(Durability::Immediate)
            .map_err(db_error("set durability"))?;
        tx.set_two_phase_commit(true);
        let mut tx = Tx { tx, store: self };
        match f(&mut tx) {
            Ok(value) => {
                tx.tx.commit().map_err(db_error("commit"))?;
                Ok(value)
            }
            Err(e) => {
                // Dropping would abort as well; abort explicitly so the intent shows.
                let _ = tx.tx.abort();
                Err(e)
            }
        }
    }

    /// Runs `f` in a transaction that is never committed (for reads). It
    /// takes the write lock, which in a one-process client costs nothing and
    /// lets reads and writes share one code path.
    pub fn read<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = self.begin()?;
        let mut tx = Tx { tx, store: self };
        let result = f(&mut tx);
        let _ = tx.tx.abort();
        result
    }

    /// Begins a write transaction. After an I/O error (a full disk, a
    /// failed `fsync`) redb refuses every transaction with `PreviousIo`
    /// until the database is opened again; this reopens it then and tries
    /// once more, so that a long-running client goes on once the disk is
    /// back. A transaction refused so did nothing, and the reopened
    /// database holds exactly what was committed.
    fn begin(&self) -> Result<WriteTransaction, StoreError> {
        let mut slot = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = slot.as_ref() {
            match db.begin_write() {
                Err(TransactionError::Storage(StorageError::PreviousIo)) => {}
                other => return other.map_err(db_error("begin")),
            }
        }
        // The old handle goes first: it holds the file's lock.
        *slot = None;
        let db = (self.opener)()?;
        let tx = db.begin_write().map_err(db_error("begin"));
        *slot = Some(db);
        tx
    }

    fn seal(&self, table: Table, key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let cipher = XChaCha20Poly1305::new(&Key::from(self.keys.record));
        let ad = associated_data(table, key);
        let ct = cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &ad,
                },
            )
            .map_err(|_| StoreError::Corrupt {
                table: table.name(),
                reason: "record too large to seal",
            })?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unseal(
        &self,
        table: Table,
        key: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let corrupt = |reason| StoreError::Corrupt {
            table: table.name(),
            reason,
        };
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN {
            return Err(corrupt("sealed value too short"));
        }
        if sealed[0] != SEAL_VERSION {
            return Err(corrupt("unknown sealing version"));
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        let cipher = XChaCha20Poly1305::new(&Key::from(self.keys.record));
        let ad = associated_data(table, key);
        cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad: &ad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| corrupt("does not open (wrong key, damaged, or moved)"))
    }
}

impl Tx<'_> {
    /// The store's state.
    pub fn meta(&self) -> Result<MetaRecord, StoreError> {
        let plain = self
            .get_sealed(Table::Meta, META_KEY)?
            .ok_or(StoreError::Corrupt {
                table: Table::Meta.name(),
                reason: "missing",
            })?;
        decode(Table::Meta, &plain)
    }

    /// Replaces the store's state.
    pub fn put_meta(&mut self, meta: &MetaRecord) -> Result<(), StoreError> {
        let plain = encode(Table::Meta, meta)?;
        self.put_sealed(Table::Meta, META_KEY, &plain)
    }

    /// One of my signed prekeys.
    pub fn signed_prekey(&self, id: u32) -> Result<Option<SignedPrekeyRecord>, StoreError> {
        let key = id.to_be_bytes();
        self.get_sealed(Table::SignedPrekeys, &key)?
            .map(|plain| self.decode_signed_prekey(&plain))
            .transpose()
    }

    /// All my signed prekeys, by id.
    pub fn signed_prekeys(&self) -> Result<Vec<SignedPrekeyRecord>, StoreError> {
        let rows = self.range_raw(Table::SignedPrekeys, &[], None, false, usize::MAX)?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, sealed) in rows {
            let plain = self.store.unseal(Table::SignedPrekeys, &key, &sealed)?;
            out.push(self.decode_signed_prekey(&plain)?);
        }
        Ok(out)
    }

    /// Stores (or replaces) a signed prekey.
    pub fn put_signed_prekey(&mut self, record: &SignedPrekeyRecord) -> Result<(), StoreError> {
        // created_at(8) ‖ has_retired(1) ‖ retired_at(8) ‖ secret encoding.
        let secret = record.pair.to_secret_bytes();
        let mut plain = Zeroizing::new(Vec::with_capacity(17 + secret.len()));
        plain.extend_from_slice(&record.created_at.to_be_bytes());
        plain.push(u8::from(record.retired_at.is_some()));
        plain.extend_from_slice(&record.retired_at.unwrap_or(0).to_be_bytes());
        plain.extend_from_slice(&secret);
        self.put_sealed(
            Table::SignedPrekeys,
            &record.pair.id().to_be_bytes(),
            &plain,
        )
    }

    /// Deletes a signed prekey.
    pub fn remove_signed_prekey(&mut self, id: u32) -> Result<bool, StoreError> {
        self.remove_raw(Table::SignedPrekeys, &id.to_be_bytes())
    }

    /// One of my unused one-time prekeys.
    pub fn one_time_prekey(&self, id: u32) -> Result<Option<OneTimePrekeyPair>, StoreError> {
        self.get_sealed(Table::OneTimePrekeys, &id.to_be_bytes())?
            .map(|plain| {
                OneTimePrekeyPair::from_secret_bytes(&plain).map_err(|_| StoreError::Corrupt {
                    table: Table::OneTimePrekeys.name(),
                    reason: "bad one-time prekey",
                })
            })
            .transpose()
    }

    /// Stores a one-time prekey's secret.
    pub fn put_one_time_prekey(&mut self, pair: &OneTimePrekeyPair) -> Result<(), StoreError> {
        let plain = pair.to_secret_bytes();
        self.put_sealed(Table::OneTimePrekeys, &pair.id().to_be_bytes(), &plain)
    }

    /// Deletes a one-time prekey (it was used).
    pub fn remove_one_time_prekey(&mut self, id: u32) -> Result<bool, StoreError> {
        self.remove_raw(Table::OneTimePrekeys, &id.to_be_bytes())
    }

    /// How many unused one-time prekeys I hold.
    pub fn one_time_prekey_count(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        let table = self
            .tx
            .open_table(Table::OneTimePrekeys.def())
            .map_err(db_error("open table"))?;
        table.len().map_err(db_error("count"))
    }

    /// A contact.
    pub fn contact(&self, user: &Username) -> Result<Option<Contact>, StoreError> {
        let key = self.store.blind_index(user);
        self.get_sealed(Table::Contacts, &key)?
            .map(|plain| decode_contact(&plain))
            .transpose()
    }

    /// Every contact, in no particular order.
    pub fn contacts(&self) -> Result<Vec<Contact>, StoreError> {
        let rows = self.range_raw(Table::Contacts, &[], None, false, usize::MAX)?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, sealed) in rows {
            let plain = self.store.unseal(Table::Contacts, &key, &sealed)?;
            out.push(decode_contact(&plain)?);
        }
        Ok(out)
    }

    /// Stores (or replaces) a contact, keyed by its username's blind index.
    pub fn put_contact(&mut self, contact: &Contact) -> Result<(), StoreError> {
        let wire = ContactWire {
            username: contact.username.as_str().to_owned(),
            identity: contact.identity.to_bytes(),
            verified: contact.verified,
            key_changed: contact.key_changed,
            blocked: contact.blocked,
            first_seen: contact.first_seen,
            changed_at: contact.changed_at,
            previous_identity: contact.previous_identity.as_ref().map(|p| p.to_bytes()),
        };
        let plain = encode(Table::Contacts, &wire)?;
        let key = self.store.blind_index(&contact.username);
        self.put_sealed(Table::Contacts, &key, &plain)
    }

    /// The sessions with `user` as pickles, the active one first.
    pub fn sessions(&self, user: &Username) -> Result<Vec<SessionPickle>, StoreError> {
        let key = self.store.blind_index(user);
        let Some(plain) = self.get_sealed(Table::Sessions, &key)? else {
            return Ok(Vec::new());
        };
        decode_sessions(&plain)
    }

    /// Replaces the sessions with `user` (at most
    /// [`MAX_SESSIONS_PER_CONTACT`], the active one first).
    pub fn put_sessions(
        &mut self,
        user: &Username,
        sessions: &[SessionPickle],
    ) -> Result<(), StoreError> {
        // count(u8) ‖ (len(u32 BE) ‖ pickle)*
        let total: usize = sessions.iter().map(|s| 4 + s.as_bytes().len()).sum();
        let mut plain = Zeroizing::new(Vec::with_capacity(1 + total));
        let count = u8::try_from(sessions.len().min(MAX_SESSIONS_PER_CONTACT)).unwrap_or(0);
        plain.push(count);
        for s in sessions.iter().take(usize::from(count)) {
            let len = u32::try_from(s.as_bytes().len()).map_err(|_| StoreError::Corrupt {
                table: Table::Sessions.name(),
                reason: "session too large",
            })?;
            plain.extend_from_slice(&len.to_be_bytes());
            plain.extend_from_slice(s.as_bytes());
        }
        let key = self.store.blind_index(user);
        self.put_sealed(Table::Sessions, &key, &plain)
    }

    /// Appends a history row for `user`, giving it the next per-contact seq
    /// (`entry.seq` is ignored); returns that seq.
    pub fn append_history(
        &mut self,
        user: &Username,
        entry: &HistoryEntry,
    ) -> Result<u64, StoreError> {
        let blind = self.store.blind_index(user);
        let last = self.range_raw(Table::History, &blind, Some(&prefix_end(&blind)), true, 1)?;
        let seq = match last.first() {
            Some((key, _)) => history_seq(key)? + 1,
            None => 1,
        };
        let mut entry = entry.clone();
        entry.seq = seq;
        self.put_history(user, &entry)?;
        Ok(seq)
    }

    /// Replaces the history row `entry.seq` of `user`.
    pub fn put_history(&mut self, user: &Username, entry: &HistoryEntry) -> Result<(), StoreError> {
        let key = history_key(&self.store.blind_index(user), entry.seq);
        let wire = HistoryWire {
            direction: entry.direction,
            text: entry.text.clone(),
            message_id: entry.message_id,
            created_at: entry.created_at,
            sent_at: entry.sent_at,
            received_at: entry.received_at,
            state: entry.state,
            server_seq: entry.server_seq,
        };
        let plain = encode(Table::History, &wire)?;
        self.put_sealed(Table::History, &key, &plain)
    }

    /// One history row.
    pub fn history_entry(
        &self,
        user: &Username,
        seq: u64,
    ) -> Result<Option<HistoryEntry>, StoreError> {
        let key = history_key(&self.store.blind_index(user), seq);
        self.get_sealed(Table::History, &key)?
            .map(|plain| decode_history(seq, &plain))
            .transpose()
    }

    /// The last `limit` rows with `user`, oldest first.
    pub fn history(&self, user: &Username, limit: usize) -> Result<Vec<HistoryEntry>, StoreError> {
        let blind = self.store.blind_index(user);
        let rows = self.range_raw(
            Table::History,
            &blind,
            Some(&prefix_end(&blind)),
            true,
            limit,
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, sealed) in rows.into_iter().rev() {
            let plain = self.store.unseal(Table::History, &key, &sealed)?;
            out.push(decode_history(history_seq(&key)?, &plain)?);
        }
        Ok(out)
    }

    /// Stores an outbox entry under its message id.
    pub fn put_outbox(&mut self, entry: &OutboxEntry) -> Result<(), StoreError> {
        let wire = OutboxWire {
            to: entry.to.as_str().to_owned(),
            body: entry.body.clone(),
            created_at: entry.created_at,
            history_seq: entry.history_seq,
        };
        let plain = encode(Table::Outbox, &wire)?;
        self.put_sealed(Table::Outbox, &entry.id, &plain)
    }

    /// The outbox entry with this id.
    pub fn outbox_entry(&self, id: &MessageId) -> Result<Option<OutboxEntry>, StoreError> {
        self.get_sealed(Table::Outbox, id)?
            .map(|plain| decode_outbox(*id, &plain))
            .transpose()
    }

    /// Every outbox entry, oldest first (by creation time, then by history
    /// position, which is encryption order per contact).
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows = self.range_raw(Table::Outbox, &[], None, false, usize::MAX)?;
        let mut out = Vec::with_capacity(rows.len());
        for (key, sealed) in rows {
            let id: MessageId = key.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                table: Table::Outbox.name(),
                reason: "bad key",
            })?;
            let plain = self.store.unseal(Table::Outbox, &key, &sealed)?;
            out.push(decode_outbox(id, &plain)?);
        }
        out.sort_by(|a, b| {
            (a.created_at, &a.to, a.history_seq).cmp(&(b.created_at, &b.to, b.history_seq))
        });
        Ok(out)
    }

    /// Deletes an outbox entry.
    pub fn remove_outbox(&mut self, id: &MessageId) -> Result<bool, StoreError> {
        self.remove_raw(Table::Outbox, id)
    }

    /// Whether the envelope `(from, id)` was already stored.
    pub fn is_seen(&self, from: &Username, id: &MessageId) -> Result<bool, StoreError> {
        Ok(self
            .get_raw(Table::Seen, &seen_key(&self.store.blind_index(from), id))?
            .is_some())
    }

    /// Records the envelope `(from, id)` as stored.
    pub fn mark_seen(&mut self, from: &Username, id: &MessageId) -> Result<(), StoreError> {
        let key = seen_key(&self.store.blind_index(from), id);
        let mut table = self
            .tx
            .open_table(Table::Seen.def())
            .map_err(db_error("open table"))?;
        table
            .insert(key.as_slice(), [].as_slice())
            .map_err(db_error("insert"))?;
        Ok(())
    }

    /// Whether a session was already made from the X3DH base key `base_key`
    /// sent by `from` (so a replayed prekey message, even under a new
    /// message id and after its session was dropped, is not read twice).
    pub fn is_base_key_seen(
        &self,
        from: &Username,
        base_key: &[u8; 32],
    ) -> Result<bool, StoreError> {
        Ok(self
            .get_raw(
                Table::Seen,
                &base_key_key(&self.store.blind_index(from), base_key),
            )?
            .is_some())
    }

    /// Records that a session was made from `base_key` sent by `from`.
    pub fn mark_base_key_seen(
        &mut self,
        from: &Username,
        base_key: &[u8; 32],
    ) -> Result<(), StoreError> {
        let key = base_key_key(&self.store.blind_index(from), base_key);
        let mut table = self
            .tx
            .open_table(Table::Seen.def())
            .map_err(db_error("open table"))?;
        table
            .insert(key.as_slice(), [].as_slice())
            .map_err(db_error("insert"))?;
        Ok(())
    }

    fn decode_signed_prekey(&self, plain: &[u8]) -> Result<SignedPrekeyRecord, StoreError> {
        let corrupt = |reason| StoreError::Corrupt {
            table: Table::SignedPrekeys.name(),
            reason,
        };
        if plain.len() < 17 {
            return Err(corrupt("too short"));
        }
        let created_at = u64_at(&plain[..8]);
        let retired_at = match plain[8] {
            0 => None,
            1 => Some(u64_at(&plain[9..17])),
            _ => return Err(corrupt("bad flag")),
        };
        let pair = SignedPrekeyPair::from_secret_bytes(&plain[17..], &self.store.owner)
            .map_err(|_| corrupt("bad signed prekey"))?;
        Ok(SignedPrekeyRecord {
            pair,
            created_at,
            retired_at,
        })
    }

    fn get_raw(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self
            .tx
            .open_table(table.def())
            .map_err(db_error("open table"))?;
        let value = t.get(key).map_err(db_error("get"))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn get_sealed(
        &self,
        table: Table,
        key: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        self.get_raw(table, key)?
            .map(|sealed| self.store.unseal(table, key, &sealed))
            .transpose()
    }

    fn put_sealed(&mut self, table: Table, key: &[u8], plain: &[u8]) -> Result<(), StoreError> {
        let sealed = self.store.seal(table, key, plain)?;
        let mut t = self
            .tx
            .open_table(table.def())
            .map_err(db_error("open table"))?;
        t.insert(key, sealed.as_slice())
            .map_err(db_error("insert"))?;
        Ok(())
    }

    fn remove_raw(&mut self, table: Table, key: &[u8]) -> Result<bool, StoreError> {
        let mut t = self
            .tx
            .open_table(table.def())
            .map_err(db_error("open table"))?;
        let removed = t.remove(key).map_err(db_error("remove"))?;
        Ok(removed.is_some())
    }

    /// Rows with `lo <= key < hi` (no upper bound when `hi` is `None`), at
    /// most `limit`, from the end when `reverse`.
    fn range_raw(
        &self,
        table: Table,
        lo: &[u8],
        hi: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Rows, StoreError> {
        let t = self
            .tx
            .open_table(table.def())
            .map_err(db_error("open table"))?;
        let range = match hi {
            Some(hi) => t.range::<&[u8]>(lo..hi),
            None => t.range::<&[u8]>(lo..),
        }
        .map_err(db_error("range"))?;
        let items: Box<dyn Iterator<Item = _>> = if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        let mut out = Vec::new();
        for item in items.take(limit) {
            let (k, v) = item.map_err(db_error("range"))?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }
}

/// Raw (key, sealed value) rows of a range read.
type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// `HMAC-SHA256(index key, "contact" ‖ username)[..16]`.
fn blind_index(index_key: &[u8; 32], user: &Username) -> BlindIndex {
    let mut out = [0u8; BLIND_INDEX_LEN];
    if let Ok(mut mac) = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(index_key) {
        mac.update(b"contact");
        mac.update(user.as_str().as_bytes());
        out.copy_from_slice(&mac.finalize().into_bytes()[..BLIND_INDEX_LEN]);
    }
    out
}

/// `table name ‖ 0x00 ‖ record key`.
fn associated_data(table: Table, key: &[u8]) -> Vec<u8> {
    let name = table.name().as_bytes();
    let mut ad = Vec::with_capacity(name.len() + 1 + key.len());
    ad.extend_from_slice(name);
    ad.push(0);
    ad.extend_from_slice(key);
    ad
}

fn history_key(blind: &BlindIndex, seq: u64) -> [u8; BLIND_INDEX_LEN + 8] {
    let mut key = [0u8; BLIND_INDEX_LEN + 8];
    key[..BLIND_INDEX_LEN].copy_from_slice(blind);
    key[BLIND_INDEX_LEN..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn history_seq(key: &[u8]) -> Result<u64, StoreError> {
    if key.len() != BLIND_INDEX_LEN + 8 {
        return Err(StoreError::Corrupt {
            table: Table::History.name(),
            reason: "bad key",
        });
    }
    Ok(u64_at(&key[BLIND_INDEX_LEN..]))
}

fn seen_key(blind: &BlindIndex, id: &MessageId) -> [u8; BLIND_INDEX_LEN + 16] {
    let mut key = [0u8; BLIND_INDEX_LEN + 16];
    key[..BLIND_INDEX_LEN].copy_from_slice(blind);
    key[BLIND_INDEX_LEN..].copy_from_slice(id);
    key
}

fn base_key_key(blind: &BlindIndex, base_key: &[u8; 32]) -> [u8; BLIND_INDEX_LEN + 32] {
    let mut key = [0u8; BLIND_INDEX_LEN + 32];
    key[..BLIND_INDEX_LEN].copy_from_slice(blind);
    key[BLIND_INDEX_LEN..].copy_from_slice(base_key);
    key
}

/// The smallest key above every key starting with `prefix`: the blind index
/// read as a 128-bit number plus one. `None`-free because a blind index of
/// all 0xFF (probability 2^-128) simply gets an empty upper range.
fn prefix_end(prefix: &BlindIndex) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xFF; BLIND_INDEX_LEN + 9]
}

fn u64_at(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(b)
}

#[derive(Serialize, Deserialize)]
struct ContactWire {
    username: String,
    identity: Vec<u8>,
    verified: bool,
    key_changed: bool,
    blocked: bool,
    first_seen: u64,
    changed_at: Option<u64>,
    previous_identity: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
struct HistoryWire {
    direction: Direction,
    text: String,
    message_id: MessageId,
    created_at: u64,
    sent_at: Option<u64>,
    received_at: Option<u64>,
    state: DeliveryState,
    server_seq: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct OutboxWire {
    to: String,
    body: Vec<u8>,
    created_at: u64,
    history_seq: u64,
}

fn decode_contact(plain: &[u8]) -> Result<Contact, StoreError> {
    let corrupt = |reason| StoreError::Corrupt {
        table: Table::Contacts.name(),
        reason,
    };
    let wire: ContactWire = decode(Table::Contacts, plain)?;
    let username = Username::parse(&wire.username).map_err(|_| corrupt("bad username"))?;
    let identity =
        PublicIdentity::from_bytes(&wire.identity).map_err(|_| corrupt("bad identity"))?;
    let previous_identity = wire
        .previous_identity
        .map(|p| PublicIdentity::from_bytes(&p))
        .transpose()
        .map_err(|_| corrupt("bad previous identity"))?;
    Ok(Contact {
        username,
        identity,
        verified: wire.verified,
        key_changed: wire.key_changed,
        blocked: wire.blocked,
        first_seen: wire.first_seen,
        changed_at: wire.changed_at,
        previous_identity,
    })
}

fn decode_history(seq: u64, plain: &[u8]) -> Result<HistoryEntry, StoreError> {
    let w: HistoryWire = decode(Table::History, plain)?;
    Ok(HistoryEntry {
        seq,
        direction: w.direction,
        text: w.text,
        message_id: w.message_id,
        created_at: w.created_at,
        sent_at: w.sent_at,
        received_at: w.received_at,
        state: w.state,
        server_seq: w.server_seq,
    })
}

fn decode_outbox(id: MessageId, plain: &[u8]) -> Result<OutboxEntry, StoreError> {
    let w: OutboxWire = decode(Table::Outbox, plain)?;
    let to = Username::parse(&w.to).map_err(|_| StoreError::Corrupt {
        table: Table::Outbox.name(),
        reason: "bad recipient",
    })?;
    Ok(OutboxEntry {
        to,
        id,
        body: w.body,
        created_at: w.created_at,
        history_seq: w.history_seq,
    })
}

fn decode_sessions(plain: &[u8]) -> Result<Vec<SessionPickle>, StoreError> {
    let corrupt = || StoreError::Corrupt {
        table: Table::Sessions.name(),
        reason: "bad session list",
    };
    let (&count, mut rest) = plain.split_first().ok_or_else(corrupt)?;
    let mut out = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        if rest.len() < 4 {
            return Err(corrupt());
        }
        let len = usize::try_from(u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]))
            .map_err(|_| corrupt())?;
        rest = &rest[4..];
        if rest.len() < len {
            return Err(corrupt());
        }
        out.push(SessionPickle::from_bytes(rest[..len].to_vec()));
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(corrupt());
    }
    Ok(out)
}

fn encode<T: Serialize>(table: Table, value: &T) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    postcard::to_allocvec(value)
        .map(Zeroizing::new)
        .map_err(|_| StoreError::Corrupt {
            table: table.name(),
            reason: "record does not encode",
        })
}

fn decode<'a, T: Deserialize<'a>>(table: Table, plain: &'a [u8]) -> Result<T, StoreError> {
    match postcard::take_from_bytes(plain) {
        Ok((value, [])) => Ok(value),
        _ => Err(StoreError::Corrupt {
            table: table.name(),
            reason: "record does not decode",
        }),
    }
}

fn db_error<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Database {
        op,
        source: Box::new(e.into()),
    }
}

/// Marks the temporary file a new store is built in: `<name>.creating.`
/// followed by 16 random hex digits, in the store's directory.
pub const CREATING_MARK: &str = ".creating.";

/// A temporary creation file this old is a leftover of a crash (creating a
/// store takes well under a second), and is removed; a younger one may be
/// another process creating the same store at this moment, and is left.
pub const STALE_CREATION: std::time::Duration = std::time::Duration::from_secs(3600);

/// Builds a new store for [`Store::open`] as that method describes. If
/// another process created `path` meanwhile, its store is kept and ours
/// discarded.
fn create_new_store(
    path: &Path,
    storage_key: &Secret32,
    owner: &IdentityKey,
) -> Result<(), StoreError> {
    create_new_store_with(path, storage_key, owner, |file| {
        FileBackend::new(file).map_err(io::Error::other)
    })
}

/// [`create_new_store`] with the temporary file's storage made by
/// `backend` (tests inject disk faults there).
fn create_new_store_with<B: StorageBackend>(
    path: &Path,
    storage_key: &Secret32,
    owner: &IdentityKey,
    backend: impl FnOnce(fs::File) -> io::Result<B>,
) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .ok_or_else(|| {
            io_error("create", path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the store path has no file name",
            ))
        })?
        .to_string_lossy()
        .into_owned();
    remove_stale_creations(path, &name);
    let temp = path.with_file_name(format!(
        "{name}{CREATING_MARK}{:016x}",
        rand::random::<u64>()
    ));
    let built = (|| {
        let file = create_private_file(&temp)?;
        let backend = backend(file).map_err(io_error("open", &temp))?;
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(open_error(&temp))?;
        // Never reopened: any error fails the creation.
        drop(Store::on_database(
            db,
            reopener(&temp),
            &temp,
            storage_key,
            owner,
        )?);
        fs::File::open(&temp)
            .and_then(|f| f.sync_all())
            .map_err(io_error("sync", &temp))?;
        // A hard link never replaces an existing file, unlike a rename.
        match fs::hard_link(&temp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(_) => fs::rename(&temp, path).map_err(io_error("rename", &temp))?,
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Makes the new name durable (not possible on every platform).
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    // Gone on success (the link took it) and on failure.
    let _ = fs::remove_file(&temp);
    built
}

/// Removes `<name>.creating.*` files older than [`STALE_CREATION`] beside
/// `path`; errors are ignored (a leftover only takes space).
fn remove_stale_creations(path: &Path, name: &str) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{name}{CREATING_MARK}");
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_CREATION);
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Creates the new file `path` with mode 0600 (so the store is never
/// world-readable, even for a moment) and returns it open for reading and
/// writing; redb then initialises it.
fn create_private_file(path: &Path) -> Result<fs::File, StoreError> {
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map_err(io_error("create", path))
}

/// Maps an I/O error of `action` on the file `at` to a [`StoreError`].
fn io_error(action: &'static str, at: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = at.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// Maps a failure to open the database at `path`: another process holding
/// it is [`StoreError::Locked`].
fn open_error(path: &Path) -> impl FnOnce(DatabaseError) -> StoreError {
    let path = path.to_owned();
    move |e| match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path },
        other => db_error("open")(other),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use messenger_crypto::identity::IdentityKeyPair;
    use messenger_testkit::redb_fault::{Fault, FaultBackend};

    use super::*;

    fn open(dir: &Path, key: u8, owner: &IdentityKeyPair) -> Result<Store, StoreError> {
        Store::open(
            &dir.join(STORE_FILE),
            &Secret32::from_bytes([key; 32]),
            owner.identity_key(),
        )
    }

    fn user(name: &str) -> Username {
        Username::parse(name).unwrap()
    }

    fn entry(text: &str) -> HistoryEntry {
        HistoryEntry {
            seq: 0,
            direction: Direction::Outgoing,
            text: text.to_owned(),
            message_id: [7; 16],
            created_at: 5,
            sent_at: None,
            received_at: None,
            state: DeliveryState::Pending,
            server_seq: None,
        }
    }

    #[test]
    fn wrong_key_and_other_identity_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        drop(open(dir.path(), 1, &me).unwrap());
        let err = open(dir.path(), 2, &me).unwrap_err();
        assert!(matches!(err, StoreError::WrongKey), "{err:?}");
        let other = IdentityKeyPair::generate(&mut rand::rng());
        let err = open(dir.path(), 1, &other).unwrap_err();
        assert!(matches!(err, StoreError::OtherIdentity), "{err:?}");
        let held = open(dir.path(), 1, &me).unwrap();
        let err = open(dir.path(), 1, &me).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        drop(held);
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_store_is_built_aside_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        drop(open(dir.path(), 1, &me).unwrap());
        assert_eq!(names_in(dir.path()), [STORE_FILE]);
        // The linked file is the complete store: the right key opens it,
        // a wrong one is refused as such (not as a half-made file).
        assert!(matches!(
            open(dir.path(), 2, &me).unwrap_err(),
            StoreError::WrongKey
        ));
        drop(open(dir.path(), 1, &me).unwrap());
        assert_eq!(names_in(dir.path()), [STORE_FILE]);
    }

    /// Builds a store at `dir/STORE_FILE` whose temporary file fails like a
    /// full disk after `budget` bytes and whose `fsync` number `syncs`
    /// (from 0; `u64::MAX` for none) fails.
    fn create_failing(
        dir: &Path,
        me: &IdentityKeyPair,
        budget: u64,
        syncs: u64,
    ) -> Result<(), StoreError> {
        let fault = Arc::new(Fault::default());
        fault.arm(budget);
        if let Some(n) = syncs.checked_add(1) {
            fault.fail_sync(n);
        }
        create_new_store_with(
            &dir.join(STORE_FILE),
            &Secret32::from_bytes([1; 32]),
            me.identity_key(),
            move |file| FaultBackend::new(file, Arc::clone(&fault)),
        )
    }

    /// A disk that fills or fails at any write or `fsync` of a new store's
    /// creation: an error, nothing at the store's path and no temporary
    /// file left, and the next open creates a working store. Budgets large
    /// enough succeed, so the failures are the injected ones.
    #[test]
    fn a_creation_failing_at_any_write_or_fsync_leaves_nothing_behind() {
        let me = IdentityKeyPair::generate(&mut rand::rng());
        // The cause is kept in the error's chain for the user to see.
        let check_failed = |dir: &Path, what: &str, cause: &str, e: StoreError| {
            assert!(
                matches!(e, StoreError::Database { .. }) && format!("{e:?}").contains(cause),
                "{what}: {e:?}"
            );
            assert_eq!(names_in(dir), Vec::<String>::new(), "{what}: files left");
            drop(open(dir, 1, &me).unwrap());
            assert_eq!(names_in(dir), [STORE_FILE], "{what}");
        };
        let mut failed = 0;
        let mut budget = 0u64;
        loop {
            assert!(budget < 64 << 20, "creation never succeeded");
            let dir = tempfile::tempdir().unwrap();
            match create_failing(dir.path(), &me, budget, u64::MAX) {
                Ok(()) => break,
                Err(e) => check_failed(dir.path(), &format!("budget {budget}"), "StorageFull", e),
            }
            failed += 1;
            budget = if budget < 8192 {
                budget + 512
            } else {
                budget * 2
            };
        }
        let mut syncs = 0u64;
        loop {
            assert!(syncs < 100, "creation never succeeded");
            let dir = tempfile::tempdir().unwrap();
            match create_failing(dir.path(), &me, u64::MAX, syncs) {
                Ok(()) => break,
                Err(e) => check_failed(
                    dir.path(),
                    &format!("fsync {syncs}"),
                    "injected fsync failure",
                    e,
                ),
            }
            syncs += 1;
        }
        assert!(failed >= 3, "only {failed} creations failed on a write");
        assert!(syncs >= 1, "the creation made no fsync");
        eprintln!("{failed} creations failed on a write, {syncs} on an fsync");
    }

    /// The existing store in `dir`, opened (and reopened) through
    /// backends failing as `fault` says.
    fn open_faulty(dir: &Path, me: &IdentityKeyPair, fault: &Arc<Fault>) -> Store {
        let path = dir.join(STORE_FILE);
        let (at, fault) = (path.clone(), Arc::clone(fault));
        let opener: Opener = Box::new(move || {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&at)
                .map_err(io_error("open", &at))?;
            let backend =
                FaultBackend::new(file, Arc::clone(&fault)).map_err(io_error("open", &at))?;
            Database::builder()
                .create_with_backend(backend)
                .map_err(open_error(&at))
        });
        let key = Secret32::from_bytes([1; 32]);
        Store::on_database(opener().unwrap(), opener, &path, &key, me.identity_key()).unwrap()
    }

    /// A full disk, then a failing `fsync`, under writes of a store in use:
    /// each write is an error with its cause and stores nothing of itself;
    /// what was written before is kept; once the disk is back, the same
    /// open store writes again, and a reopen finds exactly the writes that
    /// succeeded.
    #[test]
    fn a_full_or_failing_disk_loses_no_earlier_write_and_the_store_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        drop(open(dir.path(), 1, &me).unwrap());
        let fault = Arc::new(Fault::default());
        let store = open_faulty(dir.path(), &me, &fault);
        let bob = user("bob");
        let append = |store: &Store, text: &str, n: usize| {
            store.write(|tx| {
                for _ in 0..n {
                    tx.append_history(&bob, &entry(text))?;
                }
                Ok::<_, StoreError>(())
            })
        };
        append(&store, "before", 10).unwrap();

        fault.arm(4096);
        let e = append(&store, &"full".repeat(1000), 100).unwrap_err();
        assert!(format!("{e:?}").contains("StorageFull"), "{e:?}");
        fault.disarm();
        // Reopened (after the full disk) by this write; the next commit's
        // first `fsync` fails: the commit, not the reopen.
        append(&store, "between", 1).unwrap();
        fault.fail_sync(1);
        let e = append(&store, "unsynced", 1).unwrap_err();
        let shown = format!("{e:?}");
        assert!(
            shown.contains("injected fsync failure") && shown.contains("\"commit\""),
            "{e:?}"
        );
        fault.disarm();

        append(&store, "after", 3).unwrap();
        let texts = |store: &Store| -> Vec<String> {
            store
                .read(|tx| tx.history(&bob, 1000))
                .unwrap()
                .into_iter()
                .map(|e| e.text)
                .collect()
        };
        let want: Vec<String> = [vec!["before"; 10], vec!["between"], vec!["after"; 3]]
            .concat()
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(texts(&store), want);
        drop(store);
        assert_eq!(texts(&open(dir.path(), 1, &me).unwrap()), want);
    }

    /// The reopen after an I/O error never makes a new file: a store file
    /// that vanished meanwhile is an error, not a fresh empty store.
    #[test]
    fn a_reopen_does_not_create_a_vanished_store() {
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        drop(open(dir.path(), 1, &me).unwrap());
        let path = dir.path().join(STORE_FILE);
        assert!(reopener(&path)().is_ok(), "the existing store reopens");
        fs::remove_file(&path).unwrap();
        let e = reopener(&path)().unwrap_err();
        assert!(matches!(e, StoreError::Database { .. }), "{e:?}");
        assert!(!path.exists(), "the reopen created {}", path.display());
    }

    #[test]
    fn creation_leftovers_are_removed_once_stale_and_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        let stale = format!("{STORE_FILE}{CREATING_MARK}0000000000000001");
        let young = format!("{STORE_FILE}{CREATING_MARK}00000000000000ff");
        for name in [&stale, &young] {
            // A creation cut short: not a redb file.
            fs::write(dir.path().join(name), b"half a database").unwrap();
        }
        let old =
            std::time::SystemTime::now() - STALE_CREATION - std::time::Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(dir.path().join(&stale))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let store = open(dir.path(), 1, &me).unwrap();
        store
            .write(|tx| {
                tx.put_meta(&MetaRecord {
                    format: STORE_FORMAT,
                    owner: me.identity_key().to_bytes(),
                    next_prekey_id: 7,
                    current_signed_prekey: 0,
                    signed_prekey_published: false,
                })
            })
            .unwrap();
        drop(store);
        // The stale one is gone, the young one (maybe another process's
        // creation in progress) is left, and the store itself works.
        assert_eq!(names_in(dir.path()), [STORE_FILE.to_owned(), young]);
        let store = open(dir.path(), 1, &me).unwrap();
        assert_eq!(store.read(|tx| tx.meta()).unwrap().next_prekey_id, 7);
    }

    #[cfg(unix)]
    #[test]
    fn file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        let store = open(dir.path(), 1, &me).unwrap();
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn blind_index_depends_on_key_and_name() {
        let a = blind_index(&[1; 32], &user("alice"));
        assert_eq!(a, blind_index(&[1; 32], &user("ALICE")));
        assert_ne!(a, blind_index(&[2; 32], &user("alice")));
        assert_ne!(a, blind_index(&[1; 32], &user("alicf")));
    }

    #[test]
    fn history_seqs_are_per_contact_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        let store = open(dir.path(), 1, &me).unwrap();
        let (a, b) = (user("alice"), user("bob"));
        store
            .write(|tx| {
                for i in 0..300 {
                    let seq = tx.append_history(&a, &entry(&format!("a{i}")))?;
                    assert_eq!(seq, i + 1);
                }
                assert_eq!(tx.append_history(&b, &entry("b0"))?, 1);
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let last = store.read(|tx| tx.history(&a, 3)).unwrap();
        let texts: Vec<&str> = last.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(texts, ["a297", "a298", "a299"]);
        assert_eq!(last[2].seq, 300);
        assert_eq!(store.read(|tx| tx.history(&b, 10)).unwrap().len(), 1);
    }

    #[test]
    fn failed_write_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        let store = open(dir.path(), 1, &me).unwrap();
        let a = user("alice");
        let result: Result<(), StoreError> = store.write(|tx| {
            tx.append_history(&a, &entry("never"))?;
            Err(StoreError::WrongKey)
        });
        assert!(result.is_err());
        assert!(store.read(|tx| tx.history(&a, 10)).unwrap().is_empty());
    }

    /// A sealed value copied to another row, or another table, does not open.
    #[test]
    fn records_cannot_be_moved() {
        let dir = tempfile::tempdir().unwrap();
        let me = IdentityKeyPair::generate(&mut rand::rng());
        let store = open(dir.path(), 1, &me).unwrap();
        let a = user("alice");
        store
            .write(|tx| {
                tx.append_history(&a, &entry("one"))?;
                tx.append_history(&a, &entry("two"))
            })
            .unwrap();
        let blind = store.blind_index(&a);
        let (k1, k2) = (history_key(&blind, 1), history_key(&blind, 2));
        let sealed = store
            .read(|tx| tx.get_raw(Table::History, &k1))
            .unwrap()
            .unwrap();
        // Reading it back in place works; as row 2 or in outbox it does not.
        assert!(store.unseal(Table::History, &k1, &sealed).is_ok());
        assert!(store.unseal(Table::History, &k2, &sealed).is_err());
        assert!(store.unseal(Table::Outbox, &k1, &sealed).is_err());
        store
            .write(|tx| {
                let mut t = tx.tx.open_table(Table::History.def()).unwrap();
                t.insert(k2.as_slice(), sealed.as_slice()).unwrap();
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let err = store.read(|tx| tx.history(&a, 10)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }
}

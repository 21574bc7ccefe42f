//! # messenger-client
//!
//! The messenger's client library: everything the `messenger` command does,
//! without printing.
//!
//! - [`home`]: the profile directory: the passphrase-sealed identity key
//!   file, `profile.toml` (name, registered server and its pinned
//!   certificate fingerprint).
//! - [`store`]: the local redb store, every record sealed under the storage
//!   key from the key file (`docs/client-storage.md`).
//! - [`engine`]: the messaging core over the store, with no network and no
//!   clock: prekeys, contacts and key changes, X3DH and the Double Ratchet,
//!   the outbox and history, each change in one transaction.
//! - [`conn`]: one QUIC connection to a rendezvous server: pinning (or trust
//!   on first use), the preface and hello, channel-bound login, requests
//!   and pushes.
//! - [`client`]: the two together, one method per command: register, send,
//!   pull, history, users, friends, safety numbers, verification, and the
//!   push stream for `chat`.
//!
//! ## What it does not do
//!
//! It never prints, never prompts and never reads the environment: the
//! caller decides where a home is and supplies passphrases through a
//! [`PassphraseSource`]. Errors are typed ([`HomeError`],
//! [`client::ClientError`], ...) and never carry a passphrase, key bytes or
//! message text. Groups, the lobby and file transfer are not built in the
//! client yet (the server and the crypto crate have them).
//!
//! ## Example
//!
//! ```
//! use messenger_client::{Home, KdfParams, Passphrase};
//!
//! let dir = tempfile::tempdir()?;
//! let home = Home::at(dir.path().join("alice"));
//! // Real homes use `KdfParams::DEFAULT`; this example uses a cheap setting.
//! let cheap = KdfParams::new(8, 1, 1)?;
//! let created = home.init("alice", &mut Passphrase::new("hunter2".into()), cheap, false)?;
//!
//! // Who it is, without the passphrase.
//! assert_eq!(home.profile()?.fingerprint(), created.fingerprint());
//! // The identity, with it.
//! let unlocked = home.unlock(&mut Passphrase::new("hunter2".into()))?;
//! assert_eq!(unlocked.identity().public(), created.public_identity());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod client;
pub mod conn;
pub mod engine;
pub mod home;
pub mod passphrase;
pub mod store;

pub use home::{Home, HomeError, Profile, ServerInfo, Unlocked};
pub use messenger_crypto::identity::Username;
pub use messenger_crypto::keyfile::{KdfParams, KeyFileError};
pub use passphrase::{Passphrase, PassphraseError, PassphrasePurpose, PassphraseSource};

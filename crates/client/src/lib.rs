//! # messenger-client
//!
//! The messenger's client library. Today it owns the profile directory (the
//! "home"): a passphrase-sealed identity key file and a small profile with
//! the username. The connection to a rendezvous server, sessions and the
//! local store will live here too.
//!
//! ## What it does not do
//!
//! It never prints, never prompts and never reads the environment: the
//! caller decides where a home is and supplies passphrases through a
//! [`PassphraseSource`]. Errors are typed ([`HomeError`]) and never carry a
//! passphrase or key bytes.
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

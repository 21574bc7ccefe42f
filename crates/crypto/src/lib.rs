//! # messenger-crypto
//!
//! The cryptographic core of the messenger: long-term identities, fingerprints
//! and safety numbers, signed and one-time prekeys, X3DH key agreement, the
//! Double Ratchet for 1:1 sessions, sender keys for groups, STREAM chunked
//! encryption for files, and passphrase-encrypted key files.
//!
//! ## What it does not do
//!
//! It performs no IO, spawns no tasks and never reads a clock: randomness is a
//! `CryptoRng` argument and time is a `u64` of seconds passed in. It never
//! prints. Persisting state is the caller's job, through explicit pickle
//! types whose bytes the caller seals before they reach a disk.
//!
//! ## Rules it keeps
//!
//! * Constructions follow Signal's published X3DH and Double Ratchet
//!   specifications; `docs/crypto.md` lists every parameter and each place we
//!   depart from them.
//! * Every X25519 agreement must be contributory; every Ed25519 signature is
//!   checked with `verify_strict` over a context label.
//! * Secrets zeroize on drop and print as `TypeName(..)`.
//! * A failed decryption leaves the state exactly as it was.
//!
//! ## Example
//!
//! ```
//! use messenger_crypto::identity::IdentityKeyPair;
//! use messenger_crypto::fingerprint::SafetyNumber;
//! use messenger_crypto::identity::Username;
//!
//! let mut rng = rand::rng();
//! let alice = IdentityKeyPair::generate(&mut rng);
//! let bob = IdentityKeyPair::generate(&mut rng);
//! let (a, b) = (Username::parse("alice")?, Username::parse("bob")?);
//! let on_alices_phone = SafetyNumber::compute(&a, alice.identity_key(), &b, bob.identity_key());
//! let on_bobs_phone = SafetyNumber::compute(&b, bob.identity_key(), &a, alice.identity_key());
//! assert_eq!(on_alices_phone, on_bobs_phone);
//! # Ok::<(), messenger_crypto::identity::KeyError>(())
//! ```

#![forbid(unsafe_code)]

pub mod codec;
pub mod dh;
pub mod fingerprint;
pub mod identity;
mod kdf;
pub mod keyfile;
pub mod padding;
pub mod prekey;
pub mod ratchet;
pub mod secret;
pub mod sender_key;
pub mod stream;
pub mod x3dh;

pub use codec::DecodeError;
pub use dh::{DhKeyPair, DhPublicKey};
pub use fingerprint::SafetyNumber;
pub use identity::{
    IdentityKey, IdentityKeyPair, KeyError, PublicIdentity, SigningContext, Username,
};

//! # messenger-rendezvous
//!
//! The messenger's self-hosted server as a library; the `rendezvous` binary
//! is a thin `main` around it. The server will keep presence, the key
//! directory, friend and group rosters and store-and-forward mailboxes of
//! ciphertext, behind QUIC (quinn) with TLS 1.3 (rustls, ring provider only).
//!
//! It holds the server's TLS identity, its storage, its service logic and its
//! network layer: [`tls::ServerIdentity`] makes a self-signed certificate in
//! the data directory on first start, reuses it afterwards, and gives the
//! `SHA256:` fingerprint clients pin; [`store::Store`] is the storage layer
//! (redb: accounts and the key directory, mailboxes with group commit,
//! friends, groups, announcements; `docs/storage.md`); [`service::Service`]
//! turns each request into a reply over the store; [`server::Server::spawn`]
//! runs the QUIC accept loop ([`net`]) within the [`limits`], handing each
//! request of a connection to a [`handler::Handler`]; [`pin`] (from
//! messenger-transport) is the client-side pinning verifier, used for admin
//! connections.
//!
//! ## What it does not do
//!
//! It never sees a plaintext message and holds no user secrets: every body
//! it stores or relays is ciphertext made on a client. It does not print;
//! the binary decides what to show (e.g. the fingerprint at start-up).
//!
//! ## Example
//!
//! ```
//! use messenger_rendezvous::tls::ServerIdentity;
//!
//! let dir = tempfile::tempdir()?;
//! let identity = ServerIdentity::load_or_create(dir.path())?;
//! assert!(identity.was_created());
//! assert!(identity.fingerprint().starts_with("SHA256:"));
//!
//! // The next start reuses the same certificate.
//! let again = ServerIdentity::load_or_create(dir.path())?;
//! assert_eq!(again.fingerprint(), identity.fingerprint());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod handler;
pub mod invite;
pub mod limits;
pub mod net;
pub use messenger_transport::pin;
pub mod rate;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;

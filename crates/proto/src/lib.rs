//! # messenger-proto
//!
//! The wire format shared by the messenger client and the rendezvous server:
//! protocol constants (ALPN, version), framing of serde messages into
//! length-prefixed [postcard] bodies, and the stable error codes a server
//! answers with.
//!
//! ## What it does not do
//!
//! It performs no IO. It never touches a socket, a file, a clock or an async
//! runtime, and it must never depend on tokio, quinn, rustls or redb (CI checks
//! `cargo tree -p messenger-proto -e normal`). Callers read bytes from a QUIC
//! stream themselves and push them into a [`FrameDecoder`]; they write the
//! bytes [`encode`] returns. That keeps every parser here testable and
//! fuzzable without a network.
//!
//! It does no cryptography either: message bodies that must stay secret are
//! already ciphertext (made by `messenger-crypto` on a client) by the time
//! they are framed here.
//!
//! ## Rules it keeps
//!
//! * A frame is `u32` big-endian body length ‖ postcard body; the length is
//!   checked against [`MAX_FRAME_LEN`] as soon as its four bytes arrive, before
//!   any memory is set aside for the body.
//! * Decoding is strict: a body must be consumed exactly; trailing bytes are an
//!   error, never ignored.
//! * postcard is not self-describing, so enum variants and struct fields of
//!   wire types are never reordered or removed; [`ErrorCode`] values are pinned
//!   by a test.
//!
//! ## Example
//!
//! ```
//! use messenger_proto::{FrameDecoder, decode, encode};
//!
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Hello {
//!     version: u16,
//!     user: String,
//! }
//!
//! let hello = Hello { version: messenger_proto::PROTOCOL_VERSION, user: "alice".into() };
//! let bytes = encode(&hello)?;
//!
//! // Bytes may arrive in any number of pieces.
//! let mut decoder = FrameDecoder::new();
//! let (first, rest) = bytes.split_at(3);
//! decoder.push(first)?;
//! assert!(decoder.next_frame().is_none());
//! decoder.push(rest)?;
//! let body = decoder.next_frame().expect("the whole frame has arrived");
//! assert_eq!(decode::<Hello>(&body)?, hello);
//! # Ok::<(), messenger_proto::FrameError>(())
//! ```

#![forbid(unsafe_code)]

pub mod error;
pub mod frame;
pub mod msg;
mod wire_bytes;

pub use error::ErrorCode;
pub use frame::{
    ALPN, FrameDecoder, FrameError, LEN_PREFIX, MAX_FRAME_LEN, PROTOCOL_VERSION, decode, encode,
    encode_into,
};

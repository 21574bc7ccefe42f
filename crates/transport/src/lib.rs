//! # messenger-transport
//!
//! The few things the messenger's client and server must agree on below the
//! wire protocol, kept in one place so both sides use the same code:
//!
//! - [`certificate_fingerprint`]: the `SHA256:` fingerprint of a server
//!   certificate, which the server prints and clients pin;
//! - [`pin`]: the client-side rustls verifier that accepts exactly the
//!   pinned certificate (or, on first use, any certificate, reporting its
//!   fingerprint), and only from a server that proves it holds the
//!   certificate's key;
//! - [`CHANNEL_BINDING_LABEL`]: the TLS exporter label whose output a login
//!   signature covers, so a signature is bound to one connection.
//!
//! ## What it does not do
//!
//! No sockets and no async: it configures rustls and leaves QUIC to the
//! crates that run connections (the server library and the client library).
//!
//! ## Example
//!
//! ```
//! use messenger_transport::{certificate_fingerprint, pin::pinned_client_config};
//!
//! let fingerprint = certificate_fingerprint(b"not really a certificate");
//! assert!(fingerprint.starts_with("SHA256:"));
//! let config = pinned_client_config(&fingerprint)?;
//! assert_eq!(config.alpn_protocols, vec![messenger_proto::ALPN.to_vec()]);
//! # Ok::<(), messenger_transport::pin::PinError>(())
//! ```

#![forbid(unsafe_code)]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use sha2::{Digest, Sha256};

pub mod pin;

/// Prefix of a certificate fingerprint, as in OpenSSH's `SHA256:` form.
pub const FINGERPRINT_PREFIX: &str = "SHA256:";

/// TLS exporter label for channel binding, RFC 9266 §2 (`tls-exporter`);
/// the context is empty and the output 32 bytes.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";

/// The fingerprint of a DER certificate: `SHA256:` + standard base64
/// without padding (43 characters) of its SHA-256 digest.
pub fn certificate_fingerprint(cert_der: &[u8]) -> String {
    let digest = Sha256::digest(cert_der);
    format!("{FINGERPRINT_PREFIX}{}", STANDARD_NO_PAD.encode(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_of_nothing_is_the_empty_sha256() {
        // SHA-256("") = e3b0c442…, whose unpadded base64 is below.
        assert_eq!(
            certificate_fingerprint(b""),
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }
}

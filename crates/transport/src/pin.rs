//! Certificate pinning for clients: a rustls [`ServerCertVerifier`] that
//! accepts exactly one certificate, named by its `SHA256:` fingerprint, and
//! still checks that the server proved possession of that certificate's key.
//!
//! A pin replaces the web PKI: the server's certificate is self-signed, and
//! clients learn its fingerprint on first use or from the command line
//! (DESIGN.md, Transport). Matching the certificate alone is not enough:
//! anyone can replay a certificate, so the TLS 1.3 `CertificateVerify`
//! signature is verified with the ring provider's algorithms
//! (security.md §1.8; T-44).
//!
//! The client library uses it for every connection; the server library uses
//! it for its own admin connections and its network tests.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::{FINGERPRINT_PREFIX, certificate_fingerprint};

/// Why a pin could not be used, or why a server failed it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// The pin is not `SHA256:` followed by 43 base64 characters.
    #[error("certificate fingerprint {0:?} is not of the form SHA256:<43 base64 characters>")]
    BadFingerprint(String),
    /// The server presented a different certificate than the pinned one.
    #[error(
        "the server's certificate {actual} is not the pinned {expected}; if the server's operator changed it on purpose, pin the new fingerprint"
    )]
    Mismatch {
        /// The pinned fingerprint.
        expected: String,
        /// The fingerprint the server presented.
        actual: String,
    },
    /// The server presented the pinned certificate but could not sign with
    /// its key: someone replayed the certificate.
    #[error(
        "the server presented the pinned certificate {expected} but did not prove it holds its key; someone may be impersonating the server"
    )]
    NotProven {
        /// The pinned fingerprint.
        expected: String,
    },
    /// The server tried a TLS version other than 1.3.
    #[error("the server does not speak TLS 1.3")]
    NotTls13,
}

/// A [`ServerCertVerifier`] that accepts only the pinned certificate, and
/// only from a server that signs the handshake with its key.
pub struct PinnedCertVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCertVerifier {
    /// A verifier for the certificate with `fingerprint` (`SHA256:` + 43
    /// characters of unpadded base64), using the ring provider.
    ///
    /// # Errors
    ///
    /// [`PinError::BadFingerprint`] if `fingerprint` is not of that form.
    pub fn new(fingerprint: &str) -> Result<Self, PinError> {
        let well_formed = fingerprint
            .strip_prefix(FINGERPRINT_PREFIX)
            .is_some_and(|b64| {
                b64.len() == 43
                    && b64
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
            });
        if !well_formed {
            return Err(PinError::BadFingerprint(fingerprint.to_owned()));
        }
        Ok(Self {
            fingerprint: fingerprint.to_owned(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// The pinned fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn check_pin(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let actual = certificate_fingerprint(cert);
        if actual == self.fingerprint {
            return Ok(());
        }
        Err(to_rustls(PinError::Mismatch {
            expected: self.fingerprint.clone(),
            actual,
        }))
    }
}

impl fmt::Debug for PinnedCertVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCertVerifier")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin is the whole trust decision: names, dates and chains of a
        // self-signed certificate carry no information a pin does not.
        self.check_pin(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(to_rustls(PinError::NotTls13))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_pin(cert)?;
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
        .map_err(|_| {
            to_rustls(PinError::NotProven {
                expected: self.fingerprint.clone(),
            })
        })
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client configuration for the messenger: ring provider, TLS 1.3
/// only, ALPN [`messenger_proto::ALPN`], the certificate pinned to
/// `fingerprint`, no client certificate, no early data.
///
/// # Errors
///
/// [`PinError::BadFingerprint`] for a malformed pin.
pub fn pinned_client_config(fingerprint: &str) -> Result<rustls::ClientConfig, PinError> {
    let verifier = Arc::new(PinnedCertVerifier::new(fingerprint)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|_| PinError::NotTls13)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![messenger_proto::ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// rustls shows a certificate error's inner error with `Debug`, and quinn
/// passes on only the text; a general error keeps the message readable.
fn to_rustls(error: PinError) -> rustls::Error {
    rustls::Error::General(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

    #[test]
    fn accepts_only_well_formed_pins() {
        assert_eq!(PinnedCertVerifier::new(GOOD).unwrap().fingerprint(), GOOD);
        for bad in [
            "",
            "SHA256:",
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuF!",
        ] {
            assert!(
                matches!(
                    PinnedCertVerifier::new(bad),
                    Err(PinError::BadFingerprint(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_another_certificate_with_a_pin_error() {
        let verifier = PinnedCertVerifier::new(GOOD).unwrap();
        let other = CertificateDer::from(vec![0x30, 0x00]);
        let name = ServerName::try_from("localhost").unwrap();
        let error = verifier
            .verify_server_cert(&other, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("is not the pinned"), "{text}");
        assert!(text.contains(GOOD), "{text}");
    }
}

//! Certificate pinning for clients: a rustls [`ServerCertVerifier`] that
//! accepts exactly one certificate, named by its `SHA256:` fingerprint (or,
//! on first use, any certificate), and always checks that the server proved
//! possession of that certificate's key.
//!
//! A pin replaces the web PKI: the server's certificate is self-signed, and
//! clients learn its fingerprint on first use or from the command line
//! (DESIGN.md, Transport). Matching the certificate alone is not enough:
//! anyone can replay a certificate, so the TLS 1.3 `CertificateVerify`
//! signature is verified with the ring provider's algorithms
//! (security.md §1.8; T-44).
//!
//! ## Learning what the server presented
//!
//! rustls hands a verifier's error to its caller only as text, and quinn
//! only as a TLS alert. So every verifier writes what it saw into a
//! [`HandshakeRecord`] (the presented fingerprint, and the refusal if it
//! refused), which the code that started the handshake reads afterwards:
//! that is how a client reports a mismatch with both fingerprints, or
//! learns the fingerprint to pin after a first use. A record describes the
//! last handshake of its configuration, so a client that reads it builds
//! one configuration per connection ([`client_config`]).
//!
//! The client library uses it for every connection; the server library uses
//! it for its own admin connections and its network tests.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

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
    /// The server presented a certificate (the pinned one, or on first use
    /// any) but could not sign with its key: someone replayed the
    /// certificate.
    #[error(
        "the server presented the certificate {fingerprint} but did not prove it holds its key; someone may be impersonating the server"
    )]
    NotProven {
        /// The fingerprint of the certificate presented.
        fingerprint: String,
    },
    /// The server tried a TLS version other than 1.3.
    #[error("the server does not speak TLS 1.3")]
    NotTls13,
}

/// Which server certificates a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PinPolicy {
    /// Exactly the certificate with this `SHA256:` fingerprint.
    Pinned(String),
    /// Trust on first use (as ssh does for an unknown host): any
    /// certificate whose key signs the handshake. The caller reads the
    /// fingerprint from the [`HandshakeRecord`] and pins it from then on.
    TrustOnFirstUse,
}

/// What a verifier saw during the last handshake of its configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Seen {
    /// Fingerprint of the certificate the server presented, if it got that
    /// far.
    pub presented: Option<String>,
    /// Why the verifier refused the server, if it did.
    pub refusal: Option<PinError>,
}

/// A shared slot a verifier writes what it saw into; cloning shares the
/// slot.
#[derive(Clone, Debug, Default)]
pub struct HandshakeRecord(Arc<Mutex<Seen>>);

impl HandshakeRecord {
    /// What the verifier saw so far.
    pub fn seen(&self) -> Seen {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn presented(&self, fingerprint: &str) {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.presented = Some(fingerprint.to_owned());
        seen.refusal = None;
    }

    fn refused(&self, error: PinError) -> rustls::Error {
        let text = error.to_string();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .refusal = Some(error);
        // rustls shows a certificate error's inner error with `Debug`, and
        // quinn passes on only the text; a general error keeps the message
        // readable.
        rustls::Error::General(text)
    }
}

/// A [`ServerCertVerifier`] that accepts only the pinned certificate (or,
/// on first use, any), and only from a server that signs the handshake
/// with its key.
pub struct PinnedCertVerifier {
    /// `None` on first use.
    fingerprint: Option<String>,
    provider: Arc<CryptoProvider>,
    record: HandshakeRecord,
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
        Ok(Self::with(Some(fingerprint.to_owned())))
    }

    /// A trust-on-first-use verifier: any certificate, as long as the
    /// server proves it holds the certificate's key. Read the fingerprint
    /// from [`record`](Self::record) after the handshake.
    pub fn trust_on_first_use() -> Self {
        Self::with(None)
    }

    /// A verifier for `policy`.
    ///
    /// # Errors
    ///
    /// [`PinError::BadFingerprint`] for a malformed pin.
    pub fn for_policy(policy: &PinPolicy) -> Result<Self, PinError> {
        match policy {
            PinPolicy::Pinned(fingerprint) => Self::new(fingerprint),
            PinPolicy::TrustOnFirstUse => Ok(Self::trust_on_first_use()),
        }
    }

    fn with(fingerprint: Option<String>) -> Self {
        Self {
            fingerprint,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            record: HandshakeRecord::default(),
        }
    }

    /// The pinned fingerprint; `None` on first use.
    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    /// The slot this verifier writes what it saw into.
    pub fn record(&self) -> HandshakeRecord {
        self.record.clone()
    }

    /// Checks the certificate against the pin and returns its fingerprint.
    fn check_pin(&self, cert: &CertificateDer<'_>) -> Result<String, rustls::Error> {
        let actual = certificate_fingerprint(cert);
        match &self.fingerprint {
            Some(expected) if *expected != actual => Err(self.record.refused(PinError::Mismatch {
                expected: expected.clone(),
                actual,
            })),
            _ => Ok(actual),
        }
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
        self.record.presented(&certificate_fingerprint(end_entity));
        self.check_pin(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(self.record.refused(PinError::NotTls13))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let fingerprint = self.check_pin(cert)?;
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
        .map_err(|_| self.record.refused(PinError::NotProven { fingerprint }))
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
    config_with(PinnedCertVerifier::new(fingerprint)?)
}

/// As [`pinned_client_config`], for any [`PinPolicy`], with the
/// [`HandshakeRecord`] its verifier writes into. Build one configuration
/// per connection when the record is read.
///
/// # Errors
///
/// [`PinError::BadFingerprint`] for a malformed pin.
pub fn client_config(
    policy: &PinPolicy,
) -> Result<(rustls::ClientConfig, HandshakeRecord), PinError> {
    let verifier = PinnedCertVerifier::for_policy(policy)?;
    let record = verifier.record();
    Ok((config_with(verifier)?, record))
}

fn config_with(verifier: PinnedCertVerifier) -> Result<rustls::ClientConfig, PinError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|_| PinError::NotTls13)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![messenger_proto::ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

    #[test]
    fn accepts_only_well_formed_pins() {
        assert_eq!(
            PinnedCertVerifier::new(GOOD).unwrap().fingerprint(),
            Some(GOOD)
        );
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
            assert!(
                client_config(&PinPolicy::Pinned(bad.to_owned())).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_another_certificate_with_a_pin_error() {
        let verifier = PinnedCertVerifier::new(GOOD).unwrap();
        let record = verifier.record();
        let other = CertificateDer::from(vec![0x30, 0x00]);
        let name = ServerName::try_from("localhost").unwrap();
        let error = verifier
            .verify_server_cert(&other, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("is not the pinned"), "{text}");
        assert!(text.contains(GOOD), "{text}");
        let actual = certificate_fingerprint(&other);
        assert_eq!(
            record.seen(),
            Seen {
                presented: Some(actual.clone()),
                refusal: Some(PinError::Mismatch {
                    expected: GOOD.to_owned(),
                    actual,
                }),
            }
        );
    }

    #[test]
    fn first_use_accepts_any_certificate_and_records_it() {
        let verifier = PinnedCertVerifier::trust_on_first_use();
        assert_eq!(verifier.fingerprint(), None);
        let record = verifier.record();
        let name = ServerName::try_from("localhost").unwrap();
        for cert in [vec![0x30, 0x00], vec![0x30, 0x01, 0x00]] {
            let cert = CertificateDer::from(cert);
            verifier
                .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
                .unwrap();
            let seen = record.seen();
            assert_eq!(seen.presented, Some(certificate_fingerprint(&cert)));
            assert_eq!(seen.refusal, None);
        }
    }
}

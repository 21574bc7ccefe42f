//! The server's TLS identity: a self-signed certificate kept in the data
//! directory, and its fingerprint.
//!
//! On first start [`ServerIdentity::load_or_create`] makes an ECDSA P-256 key
//! and a self-signed certificate (rcgen, ring) for the names `localhost`,
//! `rendezvous` and any extra names, and writes `key.pem` then `cert.pem`.
//! Each file is written to a temporary file in the same directory, synced,
//! and renamed into place without replacing an existing file; the directory
//! is synced after each rename. The key file is mode 0600 on Unix.
//!
//! Later starts load both files and check that the key belongs to the
//! certificate. Clients pin the certificate's fingerprint (like ssh
//! `known_hosts`), so the certificate is never replaced silently: a damaged
//! or mismatched file is an error that says what to do.

use core::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

/// File name of the certificate (PEM) in the data directory.
pub const CERT_FILE: &str = "cert.pem";

/// File name of the private key (PKCS#8 PEM) in the data directory.
pub const KEY_FILE: &str = "key.pem";

/// Subject alternative names every generated certificate carries: clients
/// connect to `localhost` in tests and to `rendezvous` as the default server
/// name; pinning, not the name, is what authenticates the server.
pub const DEFAULT_NAMES: [&str; 2] = ["localhost", "rendezvous"];

pub use messenger_transport::{FINGERPRINT_PREFIX, certificate_fingerprint};

/// Subject common name of generated certificates.
const COMMON_NAME: &str = "messenger rendezvous";

/// What to tell an operator whose certificate cannot be used.
const REMAKE_HINT: &str = "remove it to make a new certificate; clients that pinned the old \
                           fingerprint will refuse the server until they pin the new one";

/// Why the server's TLS identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading, writing or syncing a file or directory failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done, e.g. "read".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// `cert.pem` is not a readable PEM certificate.
    #[error("certificate file {path} is damaged ({reason}); restore it from a backup, or {hint}", hint = REMAKE_HINT)]
    DamagedCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `key.pem` is not a readable PKCS#8 private key.
    #[error(
        "key file {path} is damaged ({reason}); restore it from a backup, or remove it and the certificate beside it to make a new certificate; clients that pinned the old fingerprint will refuse the server until they pin the new one"
    )]
    DamagedKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it (never key material).
        reason: &'static str,
    },
    /// `cert.pem` exists but `key.pem` does not.
    #[error("certificate {cert} exists but its key {key} is missing; restore the key, or {hint}", hint = REMAKE_HINT)]
    MissingKey {
        /// The certificate file.
        cert: PathBuf,
        /// The missing key file.
        key: PathBuf,
    },
    /// The key in `key.pem` is not the one `cert.pem` was made for.
    #[error(
        "key {key} does not belong to certificate {cert}; restore the matching pair, or remove both files to make a new certificate; clients that pinned the old fingerprint will refuse the server until they pin the new one"
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rcgen could not make the key or certificate (e.g. an extra name is
    /// not a valid DNS name or IP address).
    #[error("cannot generate the server certificate")]
    Generate(#[source] rcgen::Error),
}

/// The server's certificate and private key, loaded or freshly made.
#[derive(Debug)]
pub struct ServerIdentity {
    cert: CertificateDer<'static>,
    key: ServerKey,
    fingerprint: String,
    created: bool,
}

impl ServerIdentity {
    /// Loads `cert.pem` and `key.pem` from `data_dir`, or creates them (and
    /// the directory) on first start, for the [`DEFAULT_NAMES`].
    ///
    /// # Errors
    ///
    /// See [`load_or_create_with_names`](Self::load_or_create_with_names).
    pub fn load_or_create(data_dir: &Path) -> Result<Self, TlsError> {
        Self::load_or_create_with_names(data_dir, &[])
    }

    /// As [`load_or_create`](Self::load_or_create), adding `extra_names`
    /// (DNS names or IP addresses) to the [`DEFAULT_NAMES`] of a new
    /// certificate. An existing certificate is reused as it is; to change its
    /// names, remove both files.
    ///
    /// If only `key.pem` exists (a first start was interrupted between the
    /// two writes), a certificate is made for that key.
    ///
    /// # Errors
    ///
    /// [`TlsError::DamagedCertificate`], [`TlsError::DamagedKey`],
    /// [`TlsError::MissingKey`] or [`TlsError::KeyMismatch`] for unusable
    /// files, [`TlsError::Io`] for filesystem failures,
    /// [`TlsError::Generate`] if generation fails.
    pub fn load_or_create_with_names(
        data_dir: &Path,
        extra_names: &[String],
    ) -> Result<Self, TlsError> {
        fs::create_dir_all(data_dir).map_err(io_error("create", data_dir))?;
        let cert_path = data_dir.join(CERT_FILE);
        let key_path = data_dir.join(KEY_FILE);

        let key_pem = read_if_exists(&key_path)?.map(Zeroizing::new);
        let cert_pem = read_if_exists(&cert_path)?;
        match (cert_pem, key_pem) {
            (Some(cert_pem), Some(key_pem)) => {
                let key = parse_key(&key_path, &key_pem)?;
                let cert = parse_cert(&cert_path, &cert_pem)?;
                if !contains(&cert, &key.subject_public_key_info()) {
                    return Err(TlsError::KeyMismatch {
                        cert: cert_path,
                        key: key_path,
                    });
                }
                Ok(Self::new(cert, &key, false))
            }
            (Some(_), None) => Err(TlsError::MissingKey {
                cert: cert_path,
                key: key_path,
            }),
            (None, Some(key_pem)) => {
                let key = parse_key(&key_path, &key_pem)?;
                let cert = make_cert(&key, extra_names)?;
                write_new_file(data_dir, &cert_path, cert.pem().as_bytes(), 0o644)?;
                Ok(Self::new(cert.der().clone(), &key, true))
            }
            (None, None) => {
                let key = KeyPair::generate().map_err(TlsError::Generate)?;
                let cert = make_cert(&key, extra_names)?;
                let key_pem = Zeroizing::new(key.serialize_pem());
                write_new_file(data_dir, &key_path, key_pem.as_bytes(), 0o600)?;
                write_new_file(data_dir, &cert_path, cert.pem().as_bytes(), 0o644)?;
                Ok(Self::new(cert.der().clone(), &key, true))
            }
        }
    }

    /// The certificate, DER-encoded, for rustls.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key (PKCS#8), wrapped so it never prints.
    pub fn key_der(&self) -> &ServerKey {
        &self.key
    }

    /// `SHA256:` + unpadded standard base64 of SHA-256 over the certificate
    /// DER: what the server prints at start-up and clients pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether this call made a new certificate (first start), rather than
    /// loading one.
    pub fn was_created(&self) -> bool {
        self.created
    }

    fn new(cert: CertificateDer<'static>, key: &KeyPair, created: bool) -> Self {
        let fingerprint = certificate_fingerprint(&cert);
        Self {
            cert,
            key: ServerKey(Zeroizing::new(key.serialize_der())),
            fingerprint,
            created,
        }
    }
}

/// The server's private key as PKCS#8 DER.
///
/// Zeroized on drop; prints as `ServerKey(..)`.
pub struct ServerKey(Zeroizing<Vec<u8>>);

impl ServerKey {
    /// The PKCS#8 DER bytes. Callers must not copy them out except into a
    /// TLS configuration.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.0
    }

    /// A copy for a rustls server configuration.
    pub fn to_rustls(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.to_vec()))
    }
}

impl fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerKey(..)")
    }
}

fn make_cert(key: &KeyPair, extra_names: &[String]) -> Result<rcgen::Certificate, TlsError> {
    let mut names: Vec<String> = DEFAULT_NAMES.iter().map(|n| (*n).to_owned()).collect();
    for name in extra_names {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let mut params = CertificateParams::new(names).map_err(TlsError::Generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, COMMON_NAME);
    params.self_signed(key).map_err(TlsError::Generate)
}

fn parse_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, TlsError> {
    let damaged = |reason: String| TlsError::DamagedCertificate {
        path: path.to_path_buf(),
        reason,
    };
    let cert = CertificateDer::from_pem_slice(pem).map_err(|e| damaged(e.to_string()))?;
    // A DER certificate is a SEQUENCE; anything else is not one.
    if cert.first() != Some(&0x30) {
        return Err(damaged("not a DER certificate".to_owned()));
    }
    Ok(cert)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<KeyPair, TlsError> {
    let damaged = |reason| TlsError::DamagedKey {
        path: path.to_path_buf(),
        reason,
    };
    // Error texts from the parsers are not used: they could quote the file.
    let key = PrivatePkcs8KeyDer::from_pem_slice(pem)
        .map_err(|_| damaged("no readable PKCS#8 private key in it"))?;
    KeyPair::try_from(&key).map_err(|_| damaged("the private key is not usable"))
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, TlsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path)(e)),
    }
}

/// Writes `contents` to `path`, which must not exist, so that `path` holds
/// either nothing or the complete, synced contents.
pub(crate) fn write_new_file(
    dir: &Path,
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), TlsError> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_error("set permissions on", tmp.path()))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    tmp.write_all(contents)
        .map_err(io_error("write", tmp.path()))?;
    tmp.as_file()
        .sync_all()
        .map_err(io_error("sync", tmp.path()))?;
    tmp.persist_noclobber(path)
        .map_err(|e| io_error("create", path)(e.error))?;
    sync_dir(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), TlsError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync", dir))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), TlsError> {
    Ok(())
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> TlsError + 'a {
    move |source| TlsError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn first_start_creates_both_files_key_private() {
        let dir = dir();
        let data = dir.path().join("data");
        let identity = ServerIdentity::load_or_create(&data).unwrap();
        assert!(identity.was_created());
        let cert_pem = fs::read_to_string(data.join(CERT_FILE)).unwrap();
        let key_pem = fs::read_to_string(data.join(KEY_FILE)).unwrap();
        assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        // Only the two files, no temporary leftovers.
        let mut names: Vec<String> = fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [CERT_FILE, KEY_FILE]);
        // The PEM on disk is the DER we serve.
        let from_disk = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        assert_eq!(&from_disk, identity.cert_der());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |f| fs::metadata(data.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(KEY_FILE), 0o600);
            assert_eq!(mode(CERT_FILE), 0o644);
        }
    }

    #[test]
    fn second_start_reuses_the_certificate() {
        let dir = dir();
        let first = ServerIdentity::load_or_create(dir.path()).unwrap();
        let second = ServerIdentity::load_or_create(dir.path()).unwrap();
        assert!(!second.was_created());
        assert_eq!(first.fingerprint(), second.fingerprint());
        assert_eq!(first.cert_der(), second.cert_der());
        assert_eq!(first.key_der().pkcs8_der(), second.key_der().pkcs8_der());
    }

    #[test]
    fn fingerprint_format() {
        let dir = dir();
        let identity = ServerIdentity::load_or_create(dir.path()).unwrap();
        let fp = identity.fingerprint();
        let b64 = fp.strip_prefix("SHA256:").unwrap();
        assert_eq!(b64.len(), 43);
        assert!(!fp.contains('='));
        assert!(
            b64.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        );
        assert_eq!(fp, certificate_fingerprint(identity.cert_der()));
        // Known answer: SHA-256 of the empty string.
        assert_eq!(
            certificate_fingerprint(b""),
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        );
    }

    #[test]
    fn damaged_certificate_names_the_path() {
        let dir = dir();
        ServerIdentity::load_or_create(dir.path()).unwrap();
        let cert_path = dir.path().join(CERT_FILE);
        let pem = fs::read_to_string(&cert_path).unwrap();
        // Break the base64 inside the armor.
        fs::write(&cert_path, pem.replacen("MII", "!!!", 1)).unwrap();
        let err = ServerIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, TlsError::DamagedCertificate { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&cert_path.display().to_string()),
            "{message}"
        );
        assert!(message.contains("remove it"), "{message}");

        fs::write(&cert_path, "not a pem file\n").unwrap();
        let err = ServerIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(err, TlsError::DamagedCertificate { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn damaged_key_names_the_path_and_quotes_nothing() {
        let dir = dir();
        ServerIdentity::load_or_create(dir.path()).unwrap();
        let key_path = dir.path().join(KEY_FILE);
        let pem = fs::read_to_string(&key_path).unwrap();
        let lines: Vec<&str> = pem.lines().collect();
        // Keep the armor and the first body line, drop the rest of the body.
        let damaged = format!("{}\n{}\n{}\n", lines[0], lines[1], lines[lines.len() - 1]);
        fs::write(&key_path, &damaged).unwrap();
        let err = ServerIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::DamagedKey { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&key_path.display().to_string()),
            "{message}"
        );
        assert!(!message.contains(lines[1]), "{message}");
    }

    #[test]
    fn missing_key_is_an_error_and_nothing_is_overwritten() {
        let dir = dir();
        let first = ServerIdentity::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
        let err = ServerIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, TlsError::MissingKey { .. }), "{err:?}");
        assert!(err.to_string().contains(KEY_FILE));
        let on_disk = fs::read(dir.path().join(CERT_FILE)).unwrap();
        let der = CertificateDer::from_pem_slice(&on_disk).unwrap();
        assert_eq!(&der, first.cert_der());
    }

    #[test]
    fn key_without_certificate_gets_a_certificate_for_that_key() {
        let dir = dir();
        let first = ServerIdentity::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let second = ServerIdentity::load_or_create(dir.path()).unwrap();
        assert!(second.was_created());
        assert_eq!(first.key_der().pkcs8_der(), second.key_der().pkcs8_der());
        assert_ne!(first.fingerprint(), second.fingerprint());
        let third = ServerIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(third.fingerprint(), second.fingerprint());
    }

    #[test]
    fn key_from_another_server_is_refused() {
        let (a, b) = (dir(), dir());
        ServerIdentity::load_or_create(a.path()).unwrap();
        ServerIdentity::load_or_create(b.path()).unwrap();
        fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE)).unwrap();
        let err = ServerIdentity::load_or_create(a.path()).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn extra_names_are_in_a_new_certificate() {
        let dir = dir();
        let extra = ["chat.example.org".to_owned(), "192.0.2.7".to_owned()];
        let identity = ServerIdentity::load_or_create_with_names(dir.path(), &extra).unwrap();
        let der: &[u8] = identity.cert_der();
        for name in ["localhost", "rendezvous", "chat.example.org"] {
            assert!(contains(der, name.as_bytes()), "{name} missing");
        }
        assert!(contains(der, &[192, 0, 2, 7]), "ip SAN missing");

        let bad = ["bad\u{e9}name".to_owned()];
        let other = tempfile::tempdir().unwrap();
        let err = ServerIdentity::load_or_create_with_names(other.path(), &bad).unwrap_err();
        assert!(matches!(err, TlsError::Generate(_)), "{err:?}");
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let dir = dir();
        let identity = ServerIdentity::load_or_create(dir.path()).unwrap();
        let key = identity.key_der();
        assert_eq!(format!("{key:?}"), "ServerKey(..)");
        let shown = format!("{identity:?}");
        assert!(shown.contains("ServerKey(..)"), "{shown}");

        // The P-256 private scalar inside the PKCS#8 ECPrivateKey follows
        // `version 1, OCTET STRING (32)`. The public key and OIDs also appear
        // in the certificate, so only the scalar is searched for.
        let der = key.pkcs8_der();
        let at = der
            .windows(5)
            .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
            .unwrap()
            + 5;
        let scalar = &der[at..at + 32];
        let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
        let hex_upper = hex.to_uppercase();
        for window in (0..hex.len() - 16).step_by(2) {
            assert!(!shown.contains(&hex[window..window + 16]));
            assert!(!shown.contains(&hex_upper[window..window + 16]));
        }
        for chunk in scalar.windows(6) {
            let listed = format!("{chunk:?}");
            assert!(!shown.contains(&listed[1..listed.len() - 1]));
        }
        // Base64 characters that encode only scalar bytes, in the whole DER.
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
        let (from, to) = (at.div_ceil(3) * 4, (at + 32) / 3 * 4);
        for window in (from..to - 12).step_by(4) {
            assert!(!shown.contains(&b64[window..window + 12]));
        }
    }
}

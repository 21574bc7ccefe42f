//! The profile directory ("home"): the sealed identity and the profile.
//!
//! ```text
//! HOME/                 mode 0700 when created here
//!   identity.key        MSGR-IDK key file (keys/README.md), mode 0600
//!   profile.toml        format, username, identity key (hex), and once
//!                       registered the server's address and pinned
//!                       certificate fingerprint; mode 0600
//!   store.redb          the local store (sealed records; docs/client-storage.md)
//! ```
//!
//! `identity.key` is what makes a home initialised: `profile.toml` is
//! written first and the key file last, so an interrupted first `init`
//! leaves a home that is still uninitialised and can simply be initialised
//! again. `profile.toml` names the identity key it belongs with, so a
//! profile and key file that do not belong together (an interrupted
//! `init --force`, files copied between homes) are reported, not mixed.
//!
//! Every file is replaced atomically: written to a temporary file in the
//! same directory, synced, renamed over the old one, and the directory
//! synced, so a crash leaves either the old file or the new one.
//!
//! One process at a time: two concurrent `init`s of the same home are not
//! guarded against.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use messenger_crypto::identity::{IdentityKey, IdentityKeyPair, PublicIdentity, Username};
use messenger_crypto::keyfile::{self, KdfParams, KeyFileError};
use messenger_crypto::secret::Secret32;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::passphrase::{Passphrase, PassphraseError, PassphrasePurpose, PassphraseSource};

/// File name of the sealed identity inside a home.
pub const KEY_FILE: &str = "identity.key";
/// File name of the profile inside a home.
pub const PROFILE_FILE: &str = "profile.toml";
/// File name of the local store inside a home.
pub const STORE_FILE: &str = "store.redb";
/// The `format` this build writes and reads in `profile.toml`.
pub const PROFILE_FORMAT: u32 = 1;
/// Largest `profile.toml` read. A profile is a few lines; the cap keeps a
/// stray large file (a misplaced log, a wrong `--home`) from being read into
/// memory whole.
pub const MAX_PROFILE_LEN: u64 = 64 * 1024;

/// Why an operation on a home failed. No variant carries a passphrase or
/// key bytes.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HomeError {
    /// The home has no identity yet.
    #[error("no identity in {}", home.display())]
    NotInitialized {
        /// The home directory.
        home: PathBuf,
    },
    /// `init` without `force` on a home that already has an identity.
    #[error("an identity already exists in {}", home.display())]
    AlreadyInitialized {
        /// The home directory.
        home: PathBuf,
    },
    /// The key file did not open with this passphrase. A wrong passphrase
    /// and a changed file cannot be told apart, by design.
    #[error("wrong passphrase, or the key file is damaged")]
    WrongPassphrase,
    /// A new passphrase was empty.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// A username outside the allowed alphabet or length.
    #[error("invalid username {name:?}: use 1-32 characters of a-z, 0-9, '_', '.', '-'")]
    InvalidUsername {
        /// The name as given.
        name: String,
    },
    /// The passphrase source failed.
    #[error(transparent)]
    Passphrase(#[from] PassphraseError),
    /// The key file is not a readable key file (beyond a wrong passphrase).
    #[error("damaged key file {}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: KeyFileError,
    },
    /// Sealing a new key file failed (Argon2 could not allocate).
    #[error("could not seal the identity")]
    Seal(#[source] KeyFileError),
    /// `profile.toml` is missing, unreadable as a profile, or belongs with
    /// another key file.
    #[error("damaged profile {}: {reason}", path.display())]
    CorruptProfile {
        /// The profile file.
        path: PathBuf,
        /// What is wrong, in a few words.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("could not {action} {}", path.display())]
    Io {
        /// What was being done: `read`, `create`, `sync`, ...
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
}

/// A profile directory. Creating a `Home` touches nothing on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    dir: PathBuf,
}

/// Who a home belongs to: the name and the public identity, read without
/// the passphrase. The public identity is the key file's header, checked as
/// the key file checks it but not authenticated until an unlock succeeds:
/// show it, do not trust it for anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    name: Username,
    identity: PublicIdentity,
    server: Option<ServerInfo>,
}

/// The server a home is registered with: where it is and the certificate
/// fingerprint pinned for it (like an ssh `known_hosts` line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// `HOST:PORT` as given to `register`.
    pub address: String,
    /// The pinned certificate fingerprint, `SHA256:` + 43 base64 characters.
    pub fingerprint: String,
}

/// An unlocked home: the profile, the identity and the local-storage key.
/// Secrets are wiped on drop; `Debug` shows only the public fingerprint.
#[derive(Debug)]
pub struct Unlocked {
    profile: Profile,
    identity: IdentityKeyPair,
    storage_key: Secret32,
}

impl Home {
    /// The home at `dir` (which need not exist yet).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The platform's data directory for the messenger (on Linux
    /// `$XDG_DATA_HOME/messenger`, usually `~/.local/share/messenger`), or
    /// `None` when the platform gives no home directory.
    pub fn default_dir() -> Option<PathBuf> {
        directories::ProjectDirs::from("", "", "messenger").map(|d| d.data_dir().to_path_buf())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Path of the sealed identity.
    pub fn key_file_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// Path of the profile.
    pub fn profile_path(&self) -> PathBuf {
        self.dir.join(PROFILE_FILE)
    }

    /// Path of the local store.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// Records the server this home is registered with, keeping the rest of
    /// the profile, and returns the updated profile.
    pub fn set_server(&self, server: ServerInfo) -> Result<Profile, HomeError> {
        let mut profile = self.profile()?;
        profile.server = Some(server);
        self.write_profile(&profile)?;
        Ok(profile)
    }

    /// Whether the home holds an identity (whether [`KEY_FILE`] exists).
    pub fn is_initialized(&self) -> Result<bool, HomeError> {
        let path = self.key_file_path();
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("inspect", &path)(e)),
        }
    }

    /// Generates a new identity called `name` and seals it under a
    /// passphrase from `passphrases` ([`PassphrasePurpose::Create`]) at cost
    /// `params`. Refuses to replace an existing identity unless `force`,
    /// checking before the passphrase is asked for. Creates the directory
    /// (mode 0700) if needed.
    pub fn init(
        &self,
        name: &str,
        passphrases: &mut dyn PassphraseSource,
        params: KdfParams,
        force: bool,
    ) -> Result<Profile, HomeError> {
        let name = Username::parse(name).map_err(|_| HomeError::InvalidUsername {
            name: name.to_owned(),
        })?;
        if !force && self.is_initialized()? {
            return Err(HomeError::AlreadyInitialized {
                home: self.dir.clone(),
            });
        }
        let passphrase = passphrases.passphrase(PassphrasePurpose::Create, &name)?;
        if passphrase.is_empty() {
            return Err(HomeError::EmptyPassphrase);
        }
        create_private_dir(&self.dir)?;

        let mut rng = rand::rng();
        let identity = IdentityKeyPair::generate(&mut rng);
        let storage_key = keyfile::new_storage_key(&mut rng);
        let sealed = keyfile::seal(
            &identity,
            &storage_key,
            passphrase.expose().as_bytes(),
            params,
            &mut rng,
        )
        .map_err(HomeError::Seal)?;

        let profile = Profile {
            name,
            identity: identity.public().clone(),
            server: None,
        };
        self.write_profile(&profile)?;
        // A new identity starts a new local store: sessions and contacts of
        // an identity replaced with --force belong to the old key.
        remove_if_exists(&self.store_path())?;
        write_atomically(&self.dir, &self.key_file_path(), &sealed)?;
        Ok(profile)
    }

    /// The name and public identity, without the passphrase.
    pub fn profile(&self) -> Result<Profile, HomeError> {
        let bytes = self.read_key_file()?;
        self.profile_for(&bytes)
    }

    /// Unlocks the identity with a passphrase from `passphrases`
    /// ([`PassphrasePurpose::Unlock`]), asked for only once the home is
    /// known to be initialised.
    pub fn unlock(&self, passphrases: &mut dyn PassphraseSource) -> Result<Unlocked, HomeError> {
        let bytes = self.read_key_file()?;
        let profile = self.profile_for(&bytes)?;
        let passphrase = passphrases.passphrase(PassphrasePurpose::Unlock, &profile.name)?;
        let (identity, storage_key) = self.open(&bytes, &passphrase)?.into_parts();
        Ok(Unlocked {
            profile,
            identity,
            storage_key,
        })
    }

    /// Changes the passphrase: unlocks with the current one
    /// ([`PassphrasePurpose::Unlock`]), then re-seals the same identity and
    /// storage key under a new one ([`PassphrasePurpose::Change`]) with a
    /// fresh salt, at cost `params` or, if `None`, the file's current cost,
    /// and replaces the key file atomically.
    pub fn change_passphrase(
        &self,
        passphrases: &mut dyn PassphraseSource,
        params: Option<KdfParams>,
    ) -> Result<Profile, HomeError> {
        let bytes = self.read_key_file()?;
        let profile = self.profile_for(&bytes)?;
        let old = passphrases.passphrase(PassphrasePurpose::Unlock, &profile.name)?;
        let opened = self.open(&bytes, &old)?;
        let new = passphrases.passphrase(PassphrasePurpose::Change, &profile.name)?;
        if new.is_empty() {
            return Err(HomeError::EmptyPassphrase);
        }
        let params = match params {
            Some(params) => params,
            None => keyfile::peek_params(&bytes).map_err(|source| HomeError::KeyFile {
                path: self.key_file_path(),
                source,
            })?,
        };
        let sealed = keyfile::seal(
            opened.identity(),
            opened.storage_key(),
            new.expose().as_bytes(),
            params,
            &mut rand::rng(),
        )
        .map_err(HomeError::Seal)?;
        write_atomically(&self.dir, &self.key_file_path(), &sealed)?;
        Ok(profile)
    }

    fn read_key_file(&self) -> Result<Vec<u8>, HomeError> {
        let path = self.key_file_path();
        // One byte more than a key file may have, so a longer file is
        // reported as such without being read whole.
        let cap = keyfile::FILE_LEN as u64 + 1;
        match read_capped(&path, cap) {
            Ok(Some(bytes)) if bytes.len() > keyfile::FILE_LEN => {
                // Report the real length, not the capped one.
                let found = fs::metadata(&path)
                    .map(|m| usize::try_from(m.len()).unwrap_or(usize::MAX))
                    .unwrap_or(bytes.len());
                Err(HomeError::KeyFile {
                    path,
                    source: KeyFileError::WrongLength {
                        expected: keyfile::FILE_LEN,
                        found,
                    },
                })
            }
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(HomeError::NotInitialized {
                home: self.dir.clone(),
            }),
            Err(e) => Err(io_error("read", &path)(e)),
        }
    }

    fn open(
        &self,
        bytes: &[u8],
        passphrase: &Passphrase,
    ) -> Result<keyfile::OpenedKeyFile, HomeError> {
        keyfile::open(bytes, passphrase.expose().as_bytes()).map_err(|e| match e {
            KeyFileError::WrongPassphraseOrCorrupt => HomeError::WrongPassphrase,
            source => HomeError::KeyFile {
                path: self.key_file_path(),
                source,
            },
        })
    }

    /// The profile that goes with the key file `bytes`.
    fn profile_for(&self, key_file: &[u8]) -> Result<Profile, HomeError> {
        let identity = keyfile::peek_public(key_file).map_err(|source| HomeError::KeyFile {
            path: self.key_file_path(),
            source,
        })?;
        let path = self.profile_path();
        let corrupt = |reason: String| HomeError::CorruptProfile {
            path: path.clone(),
            reason,
        };
        let bytes = read_capped(&path, MAX_PROFILE_LEN + 1)
            .map_err(io_error("read", &path))?
            .ok_or_else(|| corrupt(format!("it is missing, but {KEY_FILE} exists")))?;
        if bytes.len() as u64 > MAX_PROFILE_LEN {
            return Err(corrupt(format!("larger than {MAX_PROFILE_LEN} bytes")));
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| corrupt("not UTF-8".to_owned()))?;
        let file: ProfileFile =
            toml::from_str(text).map_err(|e| corrupt(e.message().to_owned()))?;
        if file.format != PROFILE_FORMAT {
            return Err(corrupt(format!(
                "unsupported format {}; a newer messenger may read it",
                file.format
            )));
        }
        let name = Username::parse(&file.name)
            .map_err(|_| corrupt(format!("invalid username {:?}", file.name)))?;
        if file.identity_key != to_hex(&identity.identity_key().to_bytes()) {
            return Err(corrupt(format!(
                "it belongs with another identity than {KEY_FILE}"
            )));
        }
        Ok(Profile {
            name,
            identity,
            server: file.server,
        })
    }

    fn write_profile(&self, profile: &Profile) -> Result<(), HomeError> {
        let path = self.profile_path();
        let file = ProfileFile {
            format: PROFILE_FORMAT,
            name: profile.name.as_str().to_owned(),
            identity_key: profile.identity_key_hex(),
            server: profile.server.clone(),
        };
        let body = toml::to_string(&file).map_err(|e| HomeError::CorruptProfile {
            path: path.clone(),
            reason: format!("could not encode: {}", e),
        })?;
        let text = format!(
            "# messenger profile. The identity's secrets are in {KEY_FILE}, sealed under the passphrase.\n{body}"
        );
        write_atomically(&self.dir, &path, text.as_bytes())
    }
}

impl Profile {
    /// The username.
    pub fn name(&self) -> &Username {
        &self.name
    }

    /// The public identity (Ed25519 and X25519 identity keys, bound).
    pub fn public_identity(&self) -> &PublicIdentity {
        &self.identity
    }

    /// The Ed25519 identity key.
    pub fn identity_key(&self) -> &IdentityKey {
        self.identity.identity_key()
    }

    /// The `SHA256:` fingerprint of the identity key.
    pub fn fingerprint(&self) -> String {
        self.identity.fingerprint()
    }

    /// The 32-byte Ed25519 identity key as 64 lowercase hex digits.
    pub fn identity_key_hex(&self) -> String {
        to_hex(&self.identity_key().to_bytes())
    }

    /// The server this home is registered with, if any.
    pub fn server(&self) -> Option<&ServerInfo> {
        self.server.as_ref()
    }
}

impl Unlocked {
    /// The profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The identity key pair.
    pub fn identity(&self) -> &IdentityKeyPair {
        &self.identity
    }

    /// The key the local store is encrypted under.
    pub fn storage_key(&self) -> &Secret32 {
        &self.storage_key
    }
}

/// The on-disk shape of `profile.toml`. Unknown keys are ignored so that a
/// later build can add fields without a new format number.
#[derive(Serialize, Deserialize)]
struct ProfileFile {
    format: u32,
    name: String,
    identity_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server: Option<ServerInfo>,
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Reads at most `cap` bytes of `path`; `None` if it does not exist.
fn read_capped(path: &Path, cap: u64) -> io::Result<Option<Vec<u8>>> {
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(cap).read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// Removes `path` if it exists.
fn remove_if_exists(path: &Path) -> Result<(), HomeError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("remove", path)(e)),
    }
}

/// Creates `dir` and any missing parents, mode 0700 on Unix. An existing
/// directory is left as it is.
fn create_private_dir(dir: &Path) -> Result<(), HomeError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_error("create", dir))
}

/// Replaces `path` (in `dir`) with `contents` so that it holds either the
/// old or the complete new contents, synced: temporary file in `dir`, mode
/// 0600 on Unix, `fsync`, rename over `path`, `fsync` of `dir`.
fn write_atomically(dir: &Path, path: &Path, contents: &[u8]) -> Result<(), HomeError> {
    // tempfile creates the file with mode 0600 on Unix, before any byte is
    // written.
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_error("set permissions on", tmp.path()))?;
    }
    tmp.write_all(contents)
        .map_err(io_error("write", tmp.path()))?;
    tmp.as_file()
        .sync_all()
        .map_err(io_error("sync", tmp.path()))?;
    tmp.persist(path)
        .map_err(|e| io_error("replace", path)(e.error))?;
    sync_dir(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), HomeError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync", dir))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), HomeError> {
    Ok(())
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HomeError + 'a {
    move |source| HomeError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// The cheapest Argon2 setting, so tests do not wait on the KDF.
    fn cheap() -> KdfParams {
        KdfParams::new(8, 1, 1).unwrap()
    }

    fn pw(s: &str) -> Passphrase {
        Passphrase::new(s.to_owned())
    }

    /// Answers requests from a queue and records what was asked.
    #[derive(Debug, Default)]
    struct Script {
        answers: VecDeque<Passphrase>,
        asked: Vec<PassphrasePurpose>,
    }

    impl Script {
        fn new(answers: &[&str]) -> Self {
            Self {
                answers: answers.iter().map(|a| pw(a)).collect(),
                asked: Vec::new(),
            }
        }
    }

    impl PassphraseSource for Script {
        fn passphrase(
            &mut self,
            purpose: PassphrasePurpose,
            _name: &Username,
        ) -> Result<Passphrase, PassphraseError> {
            self.asked.push(purpose);
            self.answers
                .pop_front()
                .ok_or_else(|| PassphraseError::Unavailable("script ran out".to_owned()))
        }
    }

    fn temp_home() -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().join("home"));
        (dir, home)
    }

    fn init(home: &Home, name: &str, passphrase: &str) -> Profile {
        home.init(name, &mut pw(passphrase), cheap(), false)
            .unwrap()
    }

    #[test]
    fn init_profile_unlock_round_trip() {
        let (_dir, home) = temp_home();
        assert!(!home.is_initialized().unwrap());
        let created = init(&home, "Alice", "correct horse");
        assert_eq!(created.name().as_str(), "alice");
        assert!(home.is_initialized().unwrap());
        assert!(created.fingerprint().starts_with("SHA256:"));
        assert_eq!(created.identity_key_hex().len(), 64);
        assert_eq!(
            created.identity_key_hex(),
            hex::encode(created.identity_key().to_bytes())
        );

        let read = home.profile().unwrap();
        assert_eq!(read, created);

        let mut script = Script::new(&["correct horse"]);
        let unlocked = home.unlock(&mut script).unwrap();
        assert_eq!(script.asked, [PassphrasePurpose::Unlock]);
        assert_eq!(unlocked.profile(), &created);
        assert_eq!(unlocked.identity().public(), created.public_identity());
        // The same storage key comes back every time.
        let again = home.unlock(&mut pw("correct horse")).unwrap();
        assert_eq!(again.storage_key(), unlocked.storage_key());
    }

    #[test]
    fn init_asks_for_a_new_passphrase() {
        let (_dir, home) = temp_home();
        let mut script = Script::new(&["pw"]);
        home.init("bob", &mut script, cheap(), false).unwrap();
        assert_eq!(script.asked, [PassphrasePurpose::Create]);
    }

    #[test]
    fn init_refuses_to_overwrite_before_asking() {
        let (_dir, home) = temp_home();
        let first = init(&home, "alice", "pw");
        let mut script = Script::new(&["other"]);
        let err = home
            .init("mallory", &mut script, cheap(), false)
            .unwrap_err();
        assert!(
            matches!(&err, HomeError::AlreadyInitialized { home: h } if h == home.path()),
            "{err:?}"
        );
        assert!(script.asked.is_empty(), "asked for a passphrase first");
        assert_eq!(home.profile().unwrap(), first);
        home.unlock(&mut pw("pw")).unwrap();
    }

    #[test]
    fn force_replaces_the_identity() {
        let (_dir, home) = temp_home();
        let first = init(&home, "alice", "pw");
        let second = home.init("alice2", &mut pw("new"), cheap(), true).unwrap();
        assert_ne!(first.fingerprint(), second.fingerprint());
        assert_eq!(home.profile().unwrap(), second);
        assert!(matches!(
            home.unlock(&mut pw("pw")),
            Err(HomeError::WrongPassphrase)
        ));
        home.unlock(&mut pw("new")).unwrap();
    }

    #[test]
    fn wrong_passphrase_is_typed() {
        let (_dir, home) = temp_home();
        init(&home, "alice", "right");
        let err = home.unlock(&mut pw("wrong")).unwrap_err();
        assert!(matches!(err, HomeError::WrongPassphrase), "{err:?}");
        assert_eq!(
            err.to_string(),
            "wrong passphrase, or the key file is damaged"
        );
    }

    #[test]
    fn invalid_username_and_empty_passphrase_are_refused() {
        let (_dir, home) = temp_home();
        for name in ["", "has space", "ünicode", &"x".repeat(33)] {
            let err = home.init(name, &mut pw("pw"), cheap(), false).unwrap_err();
            assert!(matches!(err, HomeError::InvalidUsername { .. }), "{err:?}");
        }
        let err = home.init("alice", &mut pw(""), cheap(), false).unwrap_err();
        assert!(matches!(err, HomeError::EmptyPassphrase), "{err:?}");
        assert!(!home.is_initialized().unwrap());
        assert!(
            !home.path().exists(),
            "nothing is created for a refused init"
        );
    }

    #[test]
    fn passphrase_source_errors_pass_through() {
        let (_dir, home) = temp_home();
        let err = home
            .init("alice", &mut Script::new(&[]), cheap(), false)
            .unwrap_err();
        assert!(
            matches!(err, HomeError::Passphrase(PassphraseError::Unavailable(_))),
            "{err:?}"
        );
    }

    #[test]
    fn uninitialized_home() {
        let (_dir, home) = temp_home();
        let mut script = Script::new(&["pw", "pw2"]);
        for err in [
            home.profile().unwrap_err(),
            home.unlock(&mut script).unwrap_err(),
            home.change_passphrase(&mut script, None).unwrap_err(),
        ] {
            assert!(
                matches!(&err, HomeError::NotInitialized { home: h } if h == home.path()),
                "{err:?}"
            );
        }
        assert!(script.asked.is_empty());

        // A profile without a key file is still not initialised.
        init(&home, "alice", "pw");
        fs::remove_file(home.key_file_path()).unwrap();
        assert!(matches!(
            home.profile(),
            Err(HomeError::NotInitialized { .. })
        ));
        // And init may proceed without --force.
        init(&home, "alice", "pw");
    }

    #[test]
    fn change_passphrase_keeps_identity_and_cost() {
        let (_dir, home) = temp_home();
        let params = KdfParams::new(16, 1, 2).unwrap();
        let profile = home.init("alice", &mut pw("old"), params, false).unwrap();
        let storage = home.unlock(&mut pw("old")).unwrap().storage_key().clone();

        let mut script = Script::new(&["old", "new"]);
        let changed = home.change_passphrase(&mut script, None).unwrap();
        assert_eq!(
            script.asked,
            [PassphrasePurpose::Unlock, PassphrasePurpose::Change]
        );
        assert_eq!(changed, profile);
        let bytes = fs::read(home.key_file_path()).unwrap();
        assert_eq!(keyfile::peek_params(&bytes).unwrap(), params);

        assert!(matches!(
            home.unlock(&mut pw("old")),
            Err(HomeError::WrongPassphrase)
        ));
        let unlocked = home.unlock(&mut pw("new")).unwrap();
        assert_eq!(unlocked.profile(), &profile);
        assert_eq!(unlocked.storage_key(), &storage);

        // A new cost can be given.
        home.change_passphrase(&mut Script::new(&["new", "newer"]), Some(cheap()))
            .unwrap();
        let bytes = fs::read(home.key_file_path()).unwrap();
        assert_eq!(keyfile::peek_params(&bytes).unwrap(), cheap());
    }

    #[test]
    fn change_passphrase_wrong_old_changes_nothing() {
        let (_dir, home) = temp_home();
        init(&home, "alice", "old");
        let before = fs::read(home.key_file_path()).unwrap();
        let mut script = Script::new(&["wrong", "new"]);
        let err = home.change_passphrase(&mut script, None).unwrap_err();
        assert!(matches!(err, HomeError::WrongPassphrase), "{err:?}");
        assert_eq!(script.asked, [PassphrasePurpose::Unlock]);
        assert_eq!(fs::read(home.key_file_path()).unwrap(), before);

        let err = home
            .change_passphrase(&mut Script::new(&["old", ""]), None)
            .unwrap_err();
        assert!(matches!(err, HomeError::EmptyPassphrase), "{err:?}");
        assert_eq!(fs::read(home.key_file_path()).unwrap(), before);
    }

    #[cfg(unix)]
    #[test]
    fn file_modes() {
        use std::os::unix::fs::PermissionsExt;

        let (_dir, home) = temp_home();
        init(&home, "alice", "pw");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(home.path()), 0o700);
        assert_eq!(mode(&home.key_file_path()), 0o600);
        assert_eq!(mode(&home.profile_path()), 0o600);
        home.change_passphrase(&mut Script::new(&["pw", "pw2"]), None)
            .unwrap();
        assert_eq!(mode(&home.key_file_path()), 0o600);
    }

    #[test]
    fn writes_leave_no_temporary_files() {
        let (_dir, home) = temp_home();
        init(&home, "alice", "pw");
        home.init("alice", &mut pw("pw"), cheap(), true).unwrap();
        home.change_passphrase(&mut Script::new(&["pw", "pw2"]), None)
            .unwrap();
        let mut names: Vec<String> = fs::read_dir(home.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [KEY_FILE, PROFILE_FILE]);
    }

    #[test]
    fn damaged_key_file_is_an_error() {
        let (_dir, home) = temp_home();
        init(&home, "alice", "pw");
        let good = fs::read(home.key_file_path()).unwrap();

        // A flipped byte in the body: the AEAD refuses it.
        let mut bad = good.clone();
        bad[keyfile::HEADER_LEN + 3] ^= 1;
        fs::write(home.key_file_path(), &bad).unwrap();
        home.profile().unwrap();
        assert!(matches!(
            home.unlock(&mut pw("pw")),
            Err(HomeError::WrongPassphrase)
        ));

        // An extended file is reported with its real length.
        let mut long = good.clone();
        long.extend_from_slice(&[0; 4096]);
        fs::write(home.key_file_path(), &long).unwrap();
        let err = home.profile().unwrap_err();
        assert!(
            matches!(
                err,
                HomeError::KeyFile {
                    source: KeyFileError::WrongLength { found, .. },
                    ..
                } if found == long.len()
            ),
            "{err:?}"
        );

        // Truncated, extended, garbage, empty: a typed key-file error naming
        // the path, from profile() and unlock() alike.
        for bytes in [&good[..100], &long[..], b"garbage".as_slice(), b""] {
            fs::write(home.key_file_path(), bytes).unwrap();
            for err in [
                home.profile().unwrap_err(),
                home.unlock(&mut pw("pw")).unwrap_err(),
            ] {
                match &err {
                    HomeError::KeyFile { path, .. } => assert_eq!(path, &home.key_file_path()),
                    other => panic!("{other:?}"),
                }
                assert!(err.to_string().contains(KEY_FILE), "{err}");
            }
        }
    }

    #[test]
    fn damaged_profile_is_an_error() {
        let (_dir, home) = temp_home();
        init(&home, "alice", "pw");
        let key = fs::read(home.key_file_path()).unwrap();
        let good = fs::read_to_string(home.profile_path()).unwrap();
        let other_key = "00".repeat(32);
        let cases = [
            "not = [toml".to_owned(),
            "format = 1\nname = \"alice\"\n".to_owned(),
            good.replace("format = 1", "format = 2"),
            good.replace("\"alice\"", "\"not valid!\""),
            good.replace(&home.profile().unwrap().identity_key_hex(), &other_key),
        ];
        for case in &cases {
            fs::write(home.profile_path(), case).unwrap();
            let err = home.profile().unwrap_err();
            assert!(
                matches!(&err, HomeError::CorruptProfile { path, .. } if path == &home.profile_path()),
                "{case}: {err:?}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        fs::write(
            home.profile_path(),
            vec![b'#'; MAX_PROFILE_LEN as usize + 10],
        )
        .unwrap();
        assert!(matches!(
            home.profile(),
            Err(HomeError::CorruptProfile { .. })
        ));
        fs::remove_file(home.profile_path()).unwrap();
        assert!(matches!(
            home.profile(),
            Err(HomeError::CorruptProfile { .. })
        ));
        // The key file was never touched.
        assert_eq!(fs::read(home.key_file_path()).unwrap(), key);
    }

    #[test]
    fn files_hold_no_secret() {
        let (_dir, home) = temp_home();
        let passphrase = "a rather long and distinctive passphrase";
        init(&home, "alice", passphrase);
        let unlocked = home.unlock(&mut pw(passphrase)).unwrap();
        let key = fs::read(home.key_file_path()).unwrap();
        let profile = fs::read(home.profile_path()).unwrap();
        let storage = unlocked.storage_key().expose();
        for file in [&key, &profile] {
            let text = String::from_utf8_lossy(file);
            assert!(!contains(file, passphrase.as_bytes()));
            assert!(!contains(file, storage));
            assert!(!text.contains(&hex::encode(storage)));
        }
        let debug = format!("{unlocked:?}");
        assert!(!debug.contains(&hex::encode(storage)), "{debug}");
        assert!(debug.contains("Secret32(..)"), "{debug}");
    }

    #[test]
    fn default_dir_names_the_messenger() {
        if let Some(dir) = Home::default_dir() {
            assert!(dir.ends_with("messenger"), "{}", dir.display());
        }
    }

    #[test]
    fn the_server_is_remembered_and_forgotten_by_a_forced_init() {
        let (_dir, home) = temp_home();
        home.init("alice", &mut Script::new(&["pw"]), cheap(), false)
            .unwrap();
        assert_eq!(home.profile().unwrap().server(), None);
        let server = ServerInfo {
            address: "127.0.0.1:4433".to_owned(),
            fingerprint: "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".to_owned(),
        };
        let updated = home.set_server(server.clone()).unwrap();
        assert_eq!(updated.server(), Some(&server));
        assert_eq!(home.profile().unwrap().server(), Some(&server));
        // Unlocking and changing the passphrase keep it.
        home.change_passphrase(&mut Script::new(&["pw", "pw2"]), None)
            .unwrap();
        assert_eq!(home.profile().unwrap().server(), Some(&server));
        // A new identity is not registered anywhere; its old store is gone.
        fs::write(home.store_path(), b"old store").unwrap();
        home.init("alice", &mut Script::new(&["pw3"]), cheap(), true)
            .unwrap();
        assert_eq!(home.profile().unwrap().server(), None);
        assert!(!home.store_path().exists());
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }
}

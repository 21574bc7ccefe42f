//! Black-box tests of the real `messenger` binary: temporary homes,
//! passphrases from the environment or a file, never a terminal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

/// Cheap Argon2 for tests; the default (64 MiB) would make each unlock slow.
const KDF_MIB: &str = "8";
/// A command that takes longer than this has hung.
const TIMEOUT: Duration = Duration::from_secs(60);

/// `messenger` with none of the caller's messenger variables.
fn messenger() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_messenger"));
    cmd.env_remove("MESSENGER_HOME")
        .env_remove("MESSENGER_PASSPHRASE")
        .env_remove("MESSENGER_NEW_PASSPHRASE")
        .env("RUST_BACKTRACE", "1")
        .timeout(TIMEOUT);
    cmd
}

struct Temp {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Temp {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Self { _dir: dir, root }
    }

    fn home(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.root.join(name);
        fs::write(&path, contents).unwrap();
        path
    }
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.assert().success().get_output().stdout.clone();
    String::from_utf8(out).unwrap()
}

/// Runs `messenger --home HOME init NAME` with `passphrase` in the
/// environment and returns the printed fingerprint.
fn init(home: &Path, name: &str, passphrase: &str) -> String {
    let out = stdout_of(
        messenger()
            .arg("--home")
            .arg(home)
            .args(["init", name, "--kdf-memory-mib", KDF_MIB])
            .env("MESSENGER_PASSPHRASE", passphrase),
    );
    fingerprint_line(&out)
}

fn fingerprint_line(out: &str) -> String {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint "))
        .unwrap_or_else(|| panic!("no fingerprint line in {out:?}"));
    assert_fingerprint_format(line);
    line.to_owned()
}

fn assert_fingerprint_format(fp: &str) {
    let b64 = fp
        .strip_prefix("SHA256:")
        .unwrap_or_else(|| panic!("{fp:?}"));
    // 32 bytes of SHA-256 in unpadded base64.
    assert_eq!(b64.len(), 43, "{fp:?}");
    assert!(
        b64.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'),
        "{fp:?}"
    );
}

fn whoami_json(home: &Path) -> Value {
    let out = stdout_of(
        messenger()
            .arg("whoami")
            .arg("--json")
            .arg("--home")
            .arg(home),
    );
    assert_eq!(out.lines().count(), 1, "one object on one line: {out:?}");
    serde_json::from_str(&out).unwrap()
}

/// Asserts a clean failure: exit code 1, nothing on stdout, one `error:`
/// line and at most one `hint:` line on stderr, no panic, no backtrace.
/// Returns the error line.
fn assert_clean_failure(cmd: &mut Command) -> String {
    let output = cmd.assert().code(1).get_output().clone();
    assert!(output.stdout.is_empty(), "{:?}", output);
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        (1..=2).contains(&lines.len()),
        "expected one error line and maybe a hint: {stderr:?}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    if let Some(hint) = lines.get(1) {
        assert!(hint.starts_with("hint: "), "{stderr:?}");
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "thread '"] {
        assert!(!stderr.contains(bad), "{stderr:?}");
    }
    lines[0].to_owned()
}

#[test]
fn init_prints_the_fingerprint_that_whoami_reports() {
    let t = Temp::new();
    let home = t.home("alice");
    let out = stdout_of(
        messenger()
            .arg("--home")
            .arg(&home)
            .args(["init", "Alice", "--kdf-memory-mib", KDF_MIB])
            .env("MESSENGER_PASSPHRASE", "correct horse"),
    );
    assert!(out.starts_with("created identity alice"), "{out:?}");
    let fp = fingerprint_line(&out);

    let who = whoami_json(&home);
    assert_eq!(who["name"], "alice");
    assert_eq!(who["fingerprint"], fp.as_str());
    assert!(who["server"].is_null(), "{who}");
    let key = who["identity_key"].as_str().unwrap();
    assert_eq!(key.len(), 64, "{key}");
    assert!(
        key.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{key}"
    );

    let text = stdout_of(messenger().arg("whoami").arg("--home").arg(&home));
    assert!(text.contains("alice"), "{text}");
    assert!(text.contains(&fp), "{text}");
    assert!(text.contains(key), "{text}");

    let plain = stdout_of(messenger().arg("fingerprint").arg("--home").arg(&home));
    assert_eq!(plain, format!("{fp}\n"));
    let json: Value = serde_json::from_str(&stdout_of(
        messenger()
            .args(["fingerprint", "--json", "--home"])
            .arg(&home),
    ))
    .unwrap();
    assert_eq!(json["fingerprint"], fp.as_str());
    assert_eq!(json["name"], "alice");
}

#[test]
fn home_before_or_after_the_subcommand_or_from_the_environment() {
    let t = Temp::new();
    let home = t.home("h");
    let fp = init(&home, "alice", "pw");
    let before = stdout_of(messenger().arg("--home").arg(&home).arg("fingerprint"));
    let after = stdout_of(messenger().arg("fingerprint").arg("--home").arg(&home));
    let env = stdout_of(messenger().arg("fingerprint").env("MESSENGER_HOME", &home));
    for out in [before, after, env] {
        assert_eq!(out.trim_end(), fp);
    }
    // The flag wins over the variable.
    let other = t.home("other");
    assert_clean_failure(
        messenger()
            .arg("whoami")
            .arg("--home")
            .arg(&other)
            .env("MESSENGER_HOME", &home),
    );
}

#[test]
fn whoami_needs_no_passphrase_and_reports_a_missing_identity() {
    let t = Temp::new();
    let home = t.home("empty");
    let line = assert_clean_failure(messenger().arg("whoami").arg("--home").arg(&home));
    assert!(line.contains("no identity in"), "{line}");
    assert!(line.contains(home.to_str().unwrap()), "{line}");
    messenger()
        .arg("whoami")
        .arg("--home")
        .arg(&home)
        .assert()
        .stderr(predicate::str::contains("hint: ").and(predicate::str::contains("messenger init")));
}

#[test]
fn init_twice_refuses_and_force_replaces() {
    let t = Temp::new();
    let home = t.home("h");
    let first = init(&home, "alice", "pw");
    let line = assert_clean_failure(
        messenger()
            .arg("--home")
            .arg(&home)
            .args(["init", "alice", "--kdf-memory-mib", KDF_MIB])
            .env("MESSENGER_PASSPHRASE", "pw"),
    );
    assert!(line.contains("already exists"), "{line}");
    assert_eq!(whoami_json(&home)["fingerprint"], first.as_str());

    let out = stdout_of(
        messenger()
            .arg("--home")
            .arg(&home)
            .args(["init", "bob", "--force", "--kdf-memory-mib", KDF_MIB])
            .env("MESSENGER_PASSPHRASE", "pw2"),
    );
    let second = fingerprint_line(&out);
    assert_ne!(first, second);
    let who = whoami_json(&home);
    assert_eq!(who["fingerprint"], second.as_str());
    assert_eq!(who["name"], "bob");
}

#[test]
fn passwd_wrong_old_fails_cleanly_right_old_changes_it() {
    let t = Temp::new();
    let home = t.home("h");
    let fp = init(&home, "alice", "old");
    let key_before = fs::read(home.join("identity.key")).unwrap();

    let passwd = |old: &str, new: &str| {
        let mut cmd = messenger();
        cmd.arg("passwd")
            .arg("--home")
            .arg(&home)
            .env("MESSENGER_PASSPHRASE", old)
            .env("MESSENGER_NEW_PASSPHRASE", new);
        cmd
    };

    let line = assert_clean_failure(&mut passwd("wrong", "new"));
    assert_eq!(line, "error: wrong passphrase, or the key file is damaged");
    assert_eq!(fs::read(home.join("identity.key")).unwrap(), key_before);

    let out = stdout_of(&mut passwd("old", "new"));
    assert_eq!(out, "changed the passphrase of alice\n");
    assert_ne!(fs::read(home.join("identity.key")).unwrap(), key_before);
    assert_eq!(whoami_json(&home)["fingerprint"], fp.as_str());

    // The old passphrase no longer unlocks; the new one does.
    assert_clean_failure(&mut passwd("old", "newer"));
    stdout_of(&mut passwd("new", "newer"));

    // An empty new passphrase is refused.
    let line = assert_clean_failure(&mut passwd("newer", ""));
    assert!(line.contains("empty"), "{line}");
}

/// A short new passphrase is taken with one warning on stderr (init and
/// passwd); one of 12 characters or more gets none.
#[test]
fn a_short_new_passphrase_is_warned_about() {
    let t = Temp::new();
    let stderr_of = |cmd: &mut Command| {
        let out = cmd.assert().success().get_output().clone();
        String::from_utf8(out.stderr).unwrap()
    };
    let init = |home: &Path, passphrase: &str| {
        let mut cmd = messenger();
        cmd.arg("--home")
            .arg(home)
            .args(["init", "alice", "--kdf-memory-mib", KDF_MIB])
            .env("MESSENGER_PASSPHRASE", passphrase);
        cmd
    };
    let short = t.home("short");
    let err = stderr_of(&mut init(&short, "hunter2 é"));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("warning: a passphrase of 9 characters can be guessed"),
        "{err}"
    );
    assert!(err.contains("12 or more characters"), "{err}");
    assert!(err.contains("messenger passwd"), "{err}");
    let long = t.home("long");
    assert_eq!(stderr_of(&mut init(&long, "twelve chars")), "");

    let mut passwd = messenger();
    passwd
        .arg("passwd")
        .arg("--home")
        .arg(&long)
        .env("MESSENGER_PASSPHRASE", "twelve chars")
        .env("MESSENGER_NEW_PASSPHRASE", "tiny");
    let err = stderr_of(&mut passwd);
    assert!(
        err.starts_with("warning: a passphrase of 4 characters"),
        "{err}"
    );
    assert!(!err.contains("messenger passwd"), "{err}");
    // Unlocking with a short passphrase warns of nothing.
    let mut passwd = messenger();
    passwd
        .arg("passwd")
        .arg("--home")
        .arg(&long)
        .env("MESSENGER_PASSPHRASE", "tiny")
        .env("MESSENGER_NEW_PASSPHRASE", "long enough again");
    assert_eq!(stderr_of(&mut passwd), "");
}

#[test]
fn passphrase_files() {
    let t = Temp::new();
    let home = t.home("h");
    let old = t.file("old.txt", "from a file\n");
    let new = t.file("new.txt", "another one\r\n");
    stdout_of(
        messenger()
            .arg("--home")
            .arg(&home)
            .args([
                "init",
                "carol",
                "--kdf-memory-mib",
                KDF_MIB,
                "--passphrase-file",
            ])
            .arg(&old),
    );
    // The file wins over the variable; its trailing newline is not part of
    // the passphrase.
    stdout_of(
        messenger()
            .args(["passwd", "--home"])
            .arg(&home)
            .arg("--passphrase-file")
            .arg(&old)
            .arg("--new-passphrase-file")
            .arg(&new)
            .env("MESSENGER_PASSPHRASE", "not this")
            .env("MESSENGER_NEW_PASSPHRASE", "nor this"),
    );
    stdout_of(
        messenger()
            .args(["passwd", "--home"])
            .arg(&home)
            .env("MESSENGER_PASSPHRASE", "another one")
            .env("MESSENGER_NEW_PASSPHRASE", "x"),
    );

    let line = assert_clean_failure(
        messenger()
            .args(["passwd", "--home"])
            .arg(&home)
            .arg("--passphrase-file")
            .arg(t.root.join("missing.txt")),
    );
    assert!(line.contains("missing.txt"), "{line}");
}

#[test]
fn no_passphrase_and_no_terminal_fails_at_once() {
    let t = Temp::new();
    let home = t.home("h");
    let mut cmd = messenger();
    cmd.arg("--home")
        .arg(&home)
        .args(["init", "alice", "--kdf-memory-mib", KDF_MIB])
        .env("CI", "true")
        .timeout(Duration::from_secs(20))
        .write_stdin("");
    let line = assert_clean_failure(&mut cmd);
    assert!(line.contains("MESSENGER_PASSPHRASE"), "{line}");
    assert!(line.contains("--passphrase-file"), "{line}");
    assert!(!home.join("identity.key").exists());

    // The same for unlocking, with stdin closed.
    init(&home, "alice", "pw");
    let mut cmd = messenger();
    cmd.args(["passwd", "--home"])
        .arg(&home)
        .timeout(Duration::from_secs(20));
    let line = assert_clean_failure(&mut cmd);
    assert!(line.contains("no passphrase available"), "{line}");
}

#[test]
fn invalid_username_is_refused() {
    let t = Temp::new();
    let home = t.home("h");
    for name in ["has space", "bad/slash", "", &"x".repeat(33)] {
        let line = assert_clean_failure(
            messenger()
                .arg("--home")
                .arg(&home)
                .args(["init", name, "--kdf-memory-mib", KDF_MIB])
                .env("MESSENGER_PASSPHRASE", "pw"),
        );
        assert!(line.contains("invalid username"), "{line}");
    }
    assert!(!home.exists());
}

#[test]
fn usage_errors_exit_2() {
    messenger().arg("init").assert().code(2);
    messenger().arg("frobnicate").assert().code(2);
    messenger()
        .args(["init", "alice", "--kdf-memory-mib", "0"])
        .assert()
        .code(2);
    messenger()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("MESSENGER_PASSPHRASE"));
    messenger()
        .args(["init", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("resist guessing less"));
}

#[test]
fn damaged_key_file_fails_cleanly() {
    let t = Temp::new();
    let home = t.home("h");
    init(&home, "alice", "pw");
    let key = home.join("identity.key");
    let mut bytes = fs::read(&key).unwrap();
    bytes.truncate(100);
    fs::write(&key, &bytes).unwrap();
    let line = assert_clean_failure(messenger().arg("whoami").arg("--home").arg(&home));
    assert!(line.contains("damaged key file"), "{line}");
    let line = assert_clean_failure(
        messenger()
            .args(["passwd", "--home"])
            .arg(&home)
            .env("MESSENGER_PASSPHRASE", "pw")
            .env("MESSENGER_NEW_PASSPHRASE", "pw2"),
    );
    assert!(line.contains("damaged key file"), "{line}");
}

#[test]
fn home_files_hold_no_passphrase_or_storage_key() {
    use base64::Engine as _;

    let t = Temp::new();
    let home = t.home("h");
    let passphrase = "Tr0ub4dor&3 is a rather distinctive passphrase";
    init(&home, "alice", passphrase);
    let unlocked = messenger_client::Home::at(&home)
        .unlock(&mut messenger_client::Passphrase::new(
            passphrase.to_owned(),
        ))
        .unwrap();
    let storage_key = unlocked.storage_key().expose().to_vec();

    let mut needles: Vec<Vec<u8>> = Vec::new();
    for secret in [passphrase.as_bytes(), &storage_key] {
        needles.push(secret.to_vec());
        needles.push(hex::encode(secret).into_bytes());
        needles.push(hex::encode_upper(secret).into_bytes());
        needles.push(
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(secret)
                .into_bytes(),
        );
    }
    // UTF-16 little-endian, as some tools would store text.
    needles.push(
        passphrase
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect(),
    );

    let mut files = 0;
    for entry in fs::read_dir(&home).unwrap() {
        let bytes = fs::read(entry.unwrap().path()).unwrap();
        files += 1;
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                "a secret is stored in the clear"
            );
        }
    }
    assert_eq!(files, 2);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&home), 0o700);
        assert_eq!(mode(&home.join("identity.key")), 0o600);
    }
}

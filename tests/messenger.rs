//! Black-box tests of the `messenger` client: the real `messenger` and
//! `rendezvous` binaries, temporary homes and data directories, 127.0.0.1.
//!
//! Every message carries a random marker; the server's data directory and
//! logs (at trace level) and the clients' homes are searched for every
//! marker at the end of the tests that send them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use messenger_testkit::{Rendezvous, Started, spawn_and_wait_for_line};
use rand::RngExt as _;
use serde_json::Value;

/// Argon2 memory for test identities: 8 MiB keeps each command fast; the
/// cost itself is tested in the crypto crate.
const TEST_KDF_MIB: &str = "8";

/// Bound on one CLI command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on waiting for a line from `chat`.
const CHAT_WAIT: Duration = Duration::from_secs(20);

fn rendezvous_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rendezvous"))
}

fn start_server(data: &Path) -> Rendezvous {
    Rendezvous::start(
        rendezvous_bin(),
        "127.0.0.1:0",
        data,
        &[],
        &[("RUST_LOG", "trace")],
    )
    .unwrap()
}

struct User {
    name: String,
    home: PathBuf,
    passphrase: String,
}

impl User {
    fn new(root: &Path, name: &str) -> Self {
        let user = Self {
            name: name.to_owned(),
            home: root.join(name),
            passphrase: format!("correct horse {name}"),
        };
        let out = user.run(&["init", name, "--kdf-memory-mib", TEST_KDF_MIB]);
        assert!(out.status.success(), "{}", text(&out));
        user
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_messenger"));
        cmd.args(args)
            .arg("--home")
            .arg(&self.home)
            .env("MESSENGER_PASSPHRASE", &self.passphrase)
            .env_remove("MESSENGER_HOME")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        run_bounded(self.cmd(args))
    }

    /// Runs and asserts success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}",
            self.name,
            text(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs, asserts a clean failure (exit 1, `error:` first line on
    /// stderr, no panic), returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{} {args:?}: {}",
            self.name,
            text(&out)
        );
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("error: ")).count(),
            1,
            "{stderr}"
        );
        assert!(
            stderr.lines().all(|l| l.starts_with("error: ")
                || l.starts_with("warning: ")
                || l.starts_with("hint: ")),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
        stderr
    }

    fn register(&self, server: &Rendezvous, pin: bool) {
        let addr = server.addr.to_string();
        let mut args = vec!["register", "--server", &addr];
        if pin {
            args.extend(["--server-fingerprint", &server.fingerprint]);
        }
        let out = self.ok(&args);
        assert!(out.contains(&server.fingerprint), "{out}");
    }

    fn pull_json(&self) -> Vec<Value> {
        self.ok(&["pull", "--json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn safety_number(&self, with: &str) -> String {
        let out = self.ok(&["fingerprint", with, "--json"]);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["user"], with);
        v["safety_number"].as_str().unwrap().to_owned()
    }
}

fn run_bounded(mut cmd: Command) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("a messenger command took longer than {COMMAND_TIMEOUT:?}")
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn marker() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    format!("MARK{}", hex::encode(bytes))
}

/// The forms a marker could leak in: raw, hex, base64 (standard and URL,
/// with and without padding).
fn leak_forms(marker: &str) -> Vec<Vec<u8>> {
    let raw = marker.as_bytes();
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    vec![
        raw.to_vec(),
        hex::encode(raw).into_bytes(),
        b64.trim_end_matches('=').as_bytes().to_vec(),
        b64url.into_bytes(),
    ]
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn assert_no_marker_in(what: &str, bytes: &[u8], markers: &[String]) {
    for m in markers {
        for form in leak_forms(m) {
            assert!(
                !bytes.windows(form.len()).any(|w| w == form.as_slice()),
                "{what} contains a message plaintext ({m})"
            );
        }
    }
}

fn assert_no_marker_in_dir(dir: &Path, markers: &[String]) {
    let files = files_under(dir);
    assert!(!files.is_empty(), "{} is empty", dir.display());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert_no_marker_in(&file.display().to_string(), &bytes, markers);
    }
}

fn texts(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn two_people_talk_and_nothing_readable_reaches_the_server_or_the_disk() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("server");
    let server = start_server(&data);
    let alice = User::new(root.path(), "alice");
    let bob = User::new(root.path(), "bob");
    // alice trusts on first use, bob pins what the operator printed.
    alice.register(&server, false);
    bob.register(&server, true);
    let who: Value = serde_json::from_str(alice.ok(&["whoami", "--json"]).trim()).unwrap();
    assert_eq!(who["server"], server.addr.to_string());
    assert_eq!(who["server_fingerprint"], server.fingerprint.as_str());

    let mut markers = Vec::new();
    // First contact (X3DH), then a reply (the ratchet turns).
    let first = format!("hello bob {}", marker());
    markers.push(first.clone());
    assert!(alice.ok(&["send", "bob", &first]).contains("sent to bob"));
    let got = bob.pull_json();
    assert_eq!(texts(&got), std::slice::from_ref(&first));
    assert_eq!(got[0]["from"], "alice");
    assert_eq!(got[0]["id"].as_str().unwrap().len(), 32);
    assert!(got[0]["sent_at"].as_u64().unwrap() > 1_700_000_000);
    let reply = format!("hi alice {}", marker());
    markers.push(reply.clone());
    bob.ok(&["send", "alice", &reply]);
    assert_eq!(texts(&alice.pull_json()), std::slice::from_ref(&reply));

    // bob is offline (no command runs): three messages wait on the server
    // and arrive in order, exactly once; the third from stdin.
    let offline: Vec<String> = (0..3)
        .map(|i| format!("offline {i} {}", marker()))
        .collect();
    markers.extend(offline.iter().cloned());
    alice.ok(&["send", "bob", &offline[0]]);
    alice.ok(&["send", "bob", &offline[1]]);
    let mut cmd = alice.cmd(&["send", "bob", "-"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", offline[2]).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(texts(&bob.pull_json()), offline);
    assert!(bob.pull_json().is_empty(), "delivered twice");
    assert!(bob.ok(&["pull"]).contains("no new messages"));

    // History on both sides, in order.
    let history: Vec<Value> = bob
        .ok(&["history", "alice", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let all: Vec<String> = [first.clone(), reply.clone()]
        .into_iter()
        .chain(offline.iter().cloned())
        .collect();
    assert_eq!(texts(&history), all);
    assert_eq!(history[1]["direction"], "out");
    let last2 = alice.ok(&["history", "bob", "--limit", "2"]);
    assert_eq!(last2.lines().count(), 2, "{last2}");
    assert!(last2.contains(&offline[2]), "{last2}");

    // Unknown user: one clear line.
    let err = alice.fails(&["send", "nobody", "x"]);
    assert!(err.contains("no user nobody"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1);

    // The server's disk and trace logs, and both homes: no plaintext.
    drop(server);
    assert_no_marker_in_dir(&data, &markers);
    // (The server's stdout/stderr were captured by the testkit; checked in
    // the chat test, which keeps the server until the end.)
    for user in [&alice, &bob] {
        assert_no_marker_in_dir(&user.home, &markers);
        for file in files_under(&user.home) {
            let bytes = std::fs::read(&file).unwrap();
            assert_no_marker_in(
                &file.display().to_string(),
                &bytes,
                std::slice::from_ref(&user.passphrase),
            );
        }
    }
}

#[test]
fn chat_over_piped_stdin_shows_live_messages_and_presence() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("server");
    let server = start_server(&data);
    let alice = User::new(root.path(), "alice");
    let bob = User::new(root.path(), "bob");
    alice.register(&server, true);
    bob.register(&server, true);
    // Presence goes to friends.
    assert!(alice.ok(&["friend", "add", "bob"]).contains("bob"));
    let list: Value = serde_json::from_str(bob.ok(&["friend", "list", "--json"]).trim()).unwrap();
    assert_eq!(list["incoming"][0], "alice");
    bob.ok(&["friend", "accept", "alice"]);
    let list: Value = serde_json::from_str(alice.ok(&["friend", "list", "--json"]).trim()).unwrap();
    assert_eq!(list["friends"][0]["name"], "bob");

    let mut cmd = bob.cmd(&["chat"]);
    cmd.stdin(Stdio::piped());
    let mut chat = spawn_and_wait_for_line(cmd, "connected as bob", CHAT_WAIT).unwrap();
    let mut stdin = chat.child.child_mut().stdin.take().unwrap();

    let live = format!("live {}", marker());
    alice.ok(&["send", "bob", &live]);
    // alice's send logged in and out: bob sees both, and the message.
    chat.stdout
        .wait_for_prefix("* alice is online", CHAT_WAIT)
        .unwrap();
    expect_message(&mut chat, "alice", &live);
    chat.stdout
        .wait_for_prefix("* alice is offline", CHAT_WAIT)
        .unwrap();

    // While the chat holds bob's home, another command of his says why it
    // cannot run and what to do, and sends nothing.
    let stderr = bob.fails(&["send", "alice", "from another terminal"]);
    assert!(stderr.contains("in use by another process"), "{stderr}");
    assert!(
        stderr.contains("hint: ") && stderr.contains("messenger chat"),
        "{stderr}"
    );

    // bob answers from the chat; a bare line goes to the same person.
    let answer = format!("answer {}", marker());
    let again = format!("again {}", marker());
    writeln!(stdin, "users").unwrap();
    writeln!(stdin, "to alice {answer}").unwrap();
    writeln!(stdin, "{again}").unwrap();
    chat.stdout
        .wait_for_prefix("sent to alice", CHAT_WAIT)
        .unwrap();
    chat.stdout
        .wait_for_prefix("sent to alice", CHAT_WAIT)
        .unwrap();
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let status = chat_exit(&mut chat);
    assert!(status.success(), "{}", chat.stdout.transcript());
    // The users listing showed bob himself, numbered.
    assert!(
        chat.stdout.transcript().contains("1. bob"),
        "{}",
        chat.stdout.transcript()
    );
    assert_eq!(texts(&alice.pull_json()), [answer.clone(), again.clone()]);

    // The server's trace log never held a plaintext.
    let markers = vec![live, answer, again];
    let log = format!(
        "{}{}",
        server.started.stdout.transcript(),
        server.started.stdout.stderr_tail()
    );
    assert!(log.contains("TRACE") || log.contains("DEBUG") || log.contains("INFO"));
    assert_no_marker_in("the server's log", log.as_bytes(), &markers);
    drop(server);
    assert_no_marker_in_dir(&data, &markers);
}

/// Waits for the chat's next message line and checks it is `text` from
/// `from`.
fn expect_message(chat: &mut Started, from: &str, text: &str) {
    let line = chat.stdout.wait_for_prefix("[", CHAT_WAIT).unwrap();
    assert!(line.ends_with(&format!("{from}: {text}")), "{line}");
}

/// Waits (at most [`CHAT_WAIT`]) for the chat to exit.
fn chat_exit(chat: &mut Started) -> std::process::ExitStatus {
    let deadline = Instant::now() + CHAT_WAIT;
    loop {
        if let Some(status) = chat.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "chat did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops `server` with SIGTERM (its clients are told it shuts down) and
/// waits for it to exit.
fn stop_gracefully(mut server: Rendezvous) {
    let pid = server.started.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + CHAT_WAIT;
    while server.started.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The chat outlives a server restart: it says the connection went and
/// connects again by itself; a message typed meanwhile waits in the outbox
/// and goes out with the new connection, and live messages show again.
#[test]
fn chat_connects_again_after_the_server_restarts() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("server");
    let server = start_server(&data);
    let listen = server.addr.to_string();
    let alice = User::new(root.path(), "alice");
    let bob = User::new(root.path(), "bob");
    alice.register(&server, true);
    bob.register(&server, true);
    // A session both ways, so bob can write to alice while offline.
    alice.ok(&["send", "bob", "hello"]);
    assert_eq!(texts(&bob.pull_json()), ["hello"]);

    // bob's home copied, as onto a second device: the same identity.
    let bob_elsewhere = User {
        name: "bob".to_owned(),
        home: root.path().join("bob-elsewhere"),
        passphrase: bob.passphrase.clone(),
    };
    copy_dir(&bob.home, &bob_elsewhere.home);

    let mut cmd = bob.cmd(&["chat"]);
    cmd.stdin(Stdio::piped())
        .env("MESSENGER_CONNECT_TIMEOUT_MS", "1500");
    let mut chat = spawn_and_wait_for_line(cmd, "connected as bob", CHAT_WAIT).unwrap();
    let mut stdin = chat.child.child_mut().stdin.take().unwrap();

    stop_gracefully(server);
    let line = chat
        .stdout
        .wait_for_prefix("* disconnected: ", CHAT_WAIT)
        .unwrap();
    assert!(
        line.contains("shutting down") && line.contains("connecting again"),
        "{line}"
    );
    // While not connected, a message goes straight to the outbox, and
    // `users` says why it cannot answer.
    let away = format!("away {}", marker());
    writeln!(stdin, "to alice {away}").unwrap();
    let line = chat
        .stdout
        .wait_for_prefix("* not connected: ", CHAT_WAIT)
        .unwrap();
    assert!(line.contains("to alice waits in the outbox"), "{line}");
    writeln!(stdin, "users").unwrap();
    chat.stdout
        .wait_for_prefix("* not connected; next try in", CHAT_WAIT)
        .unwrap();
    // A try fails while the server is away (the next is 2 s later).
    chat.stdout
        .wait_for_prefix("* still disconnected: ", CHAT_WAIT)
        .unwrap();

    let server = Rendezvous::start(rendezvous_bin(), &listen, &data, &[], &[]).unwrap();
    // Sent before bob is back (unless his next try is quicker): it waits
    // in his mailbox, and the chat fetches it once connected.
    let meanwhile = format!("meanwhile {}", marker());
    alice.ok(&["send", "bob", &meanwhile]);
    chat.stdout
        .wait_for_prefix("* connected again", CHAT_WAIT)
        .unwrap();
    expect_message(&mut chat, "alice", &meanwhile);
    let back = format!("back {}", marker());
    alice.ok(&["send", "bob", &back]);
    expect_message(&mut chat, "alice", &back);
    assert_eq!(texts(&alice.pull_json()), [away]);

    // Replaced by a login of the same user elsewhere, the chat ends instead
    // of connecting again (which would replace that login in turn).
    bob_elsewhere.ok(&["users"]);
    chat.stdout
        .wait_for_prefix("* disconnected: this user logged in elsewhere", CHAT_WAIT)
        .unwrap();
    let status = chat_exit(&mut chat);
    assert_eq!(status.code(), Some(1), "{}", chat.stdout.transcript());
    // Said once, and no try to connect again.
    let transcript = chat.stdout.transcript();
    let told = transcript.matches("* disconnected: ").count();
    assert_eq!(told, 2, "the restart's and the replacement's: {transcript}");
    assert!(
        !transcript.contains("logged in on another connection"),
        "{transcript}"
    );
    drop(stdin);
    drop(server);
}

/// Copies the files of `from` (no subdirectories expected) into a new `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        assert!(entry.file_type().unwrap().is_file(), "{:?}", entry.path());
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn safety_numbers_match_and_a_changed_key_blocks_a_verified_contact() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("server");
    let server = start_server(&data);
    let alice = User::new(root.path(), "alice");
    let bob = User::new(root.path(), "bob");
    alice.register(&server, true);
    bob.register(&server, true);
    alice.ok(&["send", "bob", "hi"]);
    bob.pull_json();

    let number = alice.safety_number("bob");
    assert_eq!(number.len(), 60);
    assert!(number.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(bob.safety_number("alice"), number);
    let text_form = alice.ok(&["fingerprint", "bob"]);
    assert!(text_form.contains(&number[..5]), "{text_form}");

    // A wrong number is refused; the right one (with spaces) verifies.
    let mut wrong = number.clone().into_bytes();
    wrong[59] = if wrong[59] == b'0' { b'1' } else { b'0' };
    let err = alice.fails(&["verify", "bob", std::str::from_utf8(&wrong).unwrap()]);
    assert!(err.contains("safety number"), "{err}");
    let spaced: Vec<String> = number
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let mut args = vec!["verify", "bob"];
    args.extend(spaced.iter().map(String::as_str));
    assert!(alice.ok(&args).contains("bob is verified"));

    // bob loses his key: a new identity, re-registered with the operator's
    // reset token.
    let out = bob.run(&["init", "bob", "--force", "--kdf-memory-mib", TEST_KDF_MIB]);
    assert!(out.status.success(), "{}", text(&out));
    let token = run_bounded({
        let mut c = Command::new(rendezvous_bin());
        c.args(["invite", "--reset", "bob", "--data-dir"])
            .arg(&data);
        c
    });
    assert!(token.status.success(), "{}", text(&token));
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let addr = server.addr.to_string();
    bob.ok(&[
        "register",
        "--server",
        &addr,
        "--server-fingerprint",
        &server.fingerprint,
        "--invite",
        &token,
    ]);

    // alice is warned loudly and sending is refused: nothing leaves.
    let blocked = format!("blocked {}", marker());
    let err = alice.fails(&["send", "bob", &blocked]);
    assert!(err.contains("CHANGED"), "{err}");
    assert!(err.contains("blocked") || err.contains("verify"), "{err}");
    assert!(bob.pull_json().is_empty());
    let history = alice.ok(&["history", "bob"]);
    assert!(!history.contains(&blocked), "{history}");

    // The new number differs; both sides agree on it; verifying it again
    // unblocks.
    let out = alice.run(&["fingerprint", "bob", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CHANGED"));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_number = v["safety_number"].as_str().unwrap().to_owned();
    assert_ne!(new_number, number);
    assert_eq!(bob.safety_number("alice"), new_number);
    alice.ok(&["verify", "bob", &new_number]);
    let after = format!("after {}", marker());
    alice.ok(&["send", "bob", &after]);
    assert_eq!(texts(&bob.pull_json()), [after]);
}

#[test]
fn a_changed_server_certificate_is_refused_with_one_line() {
    let root = tempfile::tempdir().unwrap();
    let server = start_server(&root.path().join("one"));
    let alice = User::new(root.path(), "alice");
    alice.register(&server, false);
    let listen = server.addr.to_string();
    drop(server);
    // Another server (another certificate) on the same address.
    let other = Rendezvous::start(
        rendezvous_bin(),
        &listen,
        &root.path().join("two"),
        &[],
        &[],
    )
    .unwrap();
    let err = alice.fails(&["users"]);
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains(&other.fingerprint), "{err}");
    let error_lines = err.lines().filter(|l| l.starts_with("error:")).count();
    assert_eq!(error_lines, 1, "{err}");
    assert!(err.contains("hint:"), "{err}");
}

#[test]
fn bad_passphrase_unregistered_home_and_unreachable_server_fail_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("server");
    let server = start_server(&data);
    let alice = User::new(root.path(), "alice");
    let bob = User::new(root.path(), "bob");
    // Not registered yet.
    let err = alice.fails(&["pull"]);
    assert!(err.contains("not registered"), "{err}");
    alice.register(&server, true);
    bob.register(&server, true);
    // Wrong passphrase.
    let mut wrong = alice.cmd(&["pull"]);
    wrong.env("MESSENGER_PASSPHRASE", "not it");
    let out = run_bounded(wrong);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: wrong passphrase"));

    // A session exists; the server goes away: the message is kept in the
    // outbox, the exit code says so, and the next run delivers it once.
    alice.ok(&["send", "bob", "first"]);
    let listen = server.addr.to_string();
    drop(server);
    let queued = format!("queued {}", marker());
    let mut cmd = alice.cmd(&["send", "bob", &queued]);
    cmd.env("MESSENGER_CONNECT_TIMEOUT_MS", "1500");
    let out = run_bounded(cmd);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outbox"), "{err}");
    let server = Rendezvous::start(rendezvous_bin(), &listen, &data, &[], &[]).unwrap();
    assert!(alice.ok(&["pull"]).contains("no new messages"));
    assert_eq!(texts(&bob.pull_json()), ["first".to_owned(), queued]);
    assert!(bob.pull_json().is_empty());
    drop(server);
    // No server at all and no session: nothing saved, clear error.
    let mut cmd = bob.cmd(&["send", "carol", "x"]);
    cmd.env("MESSENGER_CONNECT_TIMEOUT_MS", "1500");
    let out = run_bounded(cmd);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach"),
        "{}",
        text(&out)
    );
}

/// T-53: `send` killed at random points. Each message ends either accepted
/// or in the outbox (sent by the next run); none is lost once saved, none
/// arrives twice, and every one decrypts (no key or nonce reused).
#[test]
fn a_send_killed_at_random_points_loses_nothing_and_sends_nothing_twice() {
    let root = tempfile::tempdir().unwrap();
    let server = start_server(&root.path().join("server"));
    let alice = User::new(root.path(), "alice");
    let bob = User::new(root.path(), "bob");
    alice.register(&server, true);
    bob.register(&server, true);
    alice.ok(&["send", "bob", "start"]);
    assert_eq!(texts(&bob.pull_json()), ["start".to_owned()]);
    // Kill points spread over a whole send: time one first.
    let started = Instant::now();
    alice.ok(&["send", "bob", "timed"]);
    let span = u64::try_from(started.elapsed().as_millis())
        .unwrap()
        .max(10)
        * 5
        / 4;
    assert_eq!(texts(&bob.pull_json()), ["timed".to_owned()]);

    let mut rng = rand::rng();
    let mut succeeded = HashSet::new();
    let mut killed = 0;
    // 14 runs: a run killed after its handshake leaves a connection the
    // server keeps until its timeouts, and the server takes at most 16
    // connections per address (limits.rs), which 50 quick kills exceed.
    for i in 0..14 {
        let text = format!("killed {i}");
        let mut cmd = alice.cmd(&["send", "bob", &text]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = messenger_testkit::ChildGuard::new(cmd.spawn().unwrap());
        let delay = Duration::from_millis(rng.random_range(0..span));
        let deadline = Instant::now() + delay;
        let mut exited = None;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        match exited {
            Some(status) if status.success() => {
                succeeded.insert(text);
            }
            Some(status) => panic!("send {i} failed on its own: {status}"),
            None => {
                child.kill().unwrap();
                killed += 1;
            }
        }
    }
    // Most runs are cut short, at points spread over a whole send.
    assert!(killed >= 3, "only {killed} of 14 sends were killed");
    // The next run sends whatever the outbox kept.
    alice.ok(&["send", "bob", "end"]);
    let got = texts(&bob.pull_json());
    let mut seen = HashMap::new();
    for t in &got {
        *seen.entry(t.clone()).or_insert(0) += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "duplicates: {got:?}");
    assert_eq!(got.last().map(String::as_str), Some("end"));
    for t in &succeeded {
        assert!(seen.contains_key(t), "acknowledged {t} lost: {got:?}");
    }
    // Everything alice saved as sent or queued arrived: her history and
    // bob's inbox hold the same messages.
    let history: Vec<Value> = alice
        .ok(&["history", "bob", "--json", "--limit", "100"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let saved: Vec<String> = history
        .iter()
        .filter(|h| h["direction"] == "out" && h["text"] != "start" && h["text"] != "timed")
        .map(|h| h["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(saved, got, "saved vs delivered");
    assert!(
        history.iter().all(|h| h["state"] != "pending"),
        "{history:?}"
    );
}

/// T-70: the operator swaps bob's directory entry for mallory's keys before
/// alice's first contact. alice's safety number then differs from the one
/// the real bob computes, and verifying with bob's number fails.
#[test]
fn a_substituted_key_shows_in_the_safety_number() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("server");
    let server = start_server(&data);
    let alice = User::new(root.path(), "alice");
    let bob = User::new(root.path(), "bob");
    alice.register(&server, true);
    bob.register(&server, true);
    let bob_sees = bob.safety_number("alice");
    // The operator (who holds the data directory) re-keys "bob" to mallory.
    let token = run_bounded({
        let mut c = Command::new(rendezvous_bin());
        c.args(["invite", "--reset", "bob", "--data-dir"])
            .arg(&data);
        c
    });
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let mallory_root = root.path().join("mallory");
    std::fs::create_dir(&mallory_root).unwrap();
    let mallory = User::new(&mallory_root, "bob");
    let addr = server.addr.to_string();
    mallory.ok(&[
        "register",
        "--server",
        &addr,
        "--server-fingerprint",
        &server.fingerprint,
        "--invite",
        &token,
    ]);
    let alice_sees = alice.safety_number("bob");
    assert_ne!(alice_sees, bob_sees);
    let err = alice.fails(&["verify", "bob", &bob_sees]);
    assert!(err.contains("does not match"), "{err}");
    // What alice would send goes to mallory's key, and the real bob cannot
    // read it: his pull shows no such message.
    let secret = format!("for bob only {}", marker());
    alice.ok(&["send", "bob", &secret]);
    let out = bob.run(&["pull", "--json"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&secret));
}

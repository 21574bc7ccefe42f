//! Wall time of `messenger send` and `messenger pull` as whole processes
//! against a local `rendezvous`, split into passphrase unlock, connect and
//! login, and the rest (issue 5, "Benchmark").
//!
//! The split comes from commands that stop at each stage, all real
//! processes of the same build:
//!
//! | command | does |
//! |---|---|
//! | `whoami` | start the process, read the profile (no passphrase) |
//! | `history bob` | + unlock the key file (Argon2id) and open the store |
//! | `users` | + connect (QUIC + TLS 1.3, pinned), log in, one request |
//! | `send bob TEXT` | + look the contact up, encrypt, save, send, commit |
//! | `pull` | + fetch one waiting message, decrypt, save, acknowledge |
//!
//! so unlock = history − whoami, connect and login = users − history, and
//! the rest = send (or pull) − users. Each is run [`RUNS`] times; medians
//! and ranges are printed. It runs at the default key-file cost and at a
//! cheaper one, to show the unlock cost is the key file's setting.
//!
//! Run: `cargo bench --bench cli` (does nothing unless given `--bench`,
//! which `cargo bench` passes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use messenger_testkit::Rendezvous;

/// Runs per command: 15, enough for a stable median of process timings.
const RUNS: usize = 15;

struct Person {
    home: PathBuf,
}

impl Person {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_messenger"));
        cmd.args(args)
            .arg("--home")
            .arg(&self.home)
            .env("MESSENGER_PASSPHRASE", "benchmark passphrase")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    fn run(&self, args: &[&str]) -> Duration {
        let start = Instant::now();
        let out = self.cmd(args).output().unwrap();
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        took
    }
}

fn person(root: &Path, name: &str, kdf_mib: Option<&str>, server: &Rendezvous) -> Person {
    let p = Person {
        home: root.join(name),
    };
    let mut init = vec!["init", name];
    if let Some(mib) = kdf_mib {
        init.extend(["--kdf-memory-mib", mib]);
    }
    p.run(&init);
    let addr = server.addr.to_string();
    p.run(&[
        "register",
        "--server",
        &addr,
        "--server-fingerprint",
        &server.fingerprint,
    ]);
    p
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut ms: Vec<f64>) -> Stats {
    ms.sort_by(f64::total_cmp);
    Stats {
        median: ms[ms.len() / 2],
        min: ms[0],
        max: ms[ms.len() - 1],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(label: &str, kdf_mib: Option<&str>, server: &Rendezvous, root: &Path) {
    let dir = root.join(kdf_mib.unwrap_or("default"));
    std::fs::create_dir_all(&dir).unwrap();
    // Names unique per round: every round registers on the same server.
    let suffix = kdf_mib.unwrap_or("default");
    let (a, b) = (format!("alice{suffix}"), format!("bob{suffix}"));
    let alice = person(&dir, &a, kdf_mib, server);
    let bob = person(&dir, &b, kdf_mib, server);
    // A session both ways, so send measures the steady state.
    alice.run(&["send", &b, "warm-up"]);
    bob.run(&["pull"]);
    bob.run(&["send", &a, "warm-up"]);
    alice.run(&["pull"]);

    let mut times: Vec<(&str, Vec<f64>)> = ["whoami", "history", "users", "send", "pull"]
        .iter()
        .map(|c| (*c, Vec::new()))
        .collect();
    for i in 0..RUNS {
        let text = format!("benchmark message {i} with a typical length of a chat line");
        times[0].1.push(ms(alice.run(&["whoami"])));
        times[1]
            .1
            .push(ms(alice.run(&["history", &b, "--limit", "1"])));
        times[2].1.push(ms(alice.run(&["users"])));
        times[3].1.push(ms(alice.run(&["send", &b, &text])));
        times[4].1.push(ms(bob.run(&["pull"])));
    }
    let s: Vec<Stats> = times.iter().map(|(_, t)| stats(t.clone())).collect();
    println!("\n## key file cost: {label} ({} runs each, wall ms)", RUNS);
    println!("| command | median | min | max |");
    println!("|---|---|---|---|");
    for ((name, _), st) in times.iter().zip(&s) {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            st.median, st.min, st.max
        );
    }
    let (whoami, history, users, send, pull) = (
        s[0].median,
        s[1].median,
        s[2].median,
        s[3].median,
        s[4].median,
    );
    println!(
        "split (medians): process start {whoami:.1} ms; unlock {:.1} ms; connect+login {:.1} ms; send rest {:.1} ms; pull rest {:.1} ms",
        history - whoami,
        users - history,
        send - users,
        pull - users
    );
    println!(
        "send total {send:.1} ms = start {whoami:.1} + unlock {:.1} + connect/login {:.1} + rest {:.1}",
        history - whoami,
        users - history,
        send - users
    );
    println!(
        "pull total {pull:.1} ms = start {whoami:.1} + unlock {:.1} + connect/login {:.1} + rest {:.1}",
        history - whoami,
        users - history,
        pull - users
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let root = messenger_testkit::temp_dir("bench-cli").unwrap();
    let server = Rendezvous::start(
        Path::new(env!("CARGO_BIN_EXE_rendezvous")),
        "127.0.0.1:0",
        &root.path().join("server"),
        &[],
        &[],
    )
    .unwrap();
    println!("# messenger CLI wall time against a local rendezvous (127.0.0.1)");
    measure(
        "default (Argon2id 64 MiB, t=3, p=4)",
        None,
        &server,
        root.path(),
    );
    measure("--kdf-memory-mib 8", Some("8"), &server, root.path());
}

//! # messenger-cli
//!
//! The `messenger` command: clap definitions, passphrase input and output
//! rendering on top of [`messenger_client`], which does the work. The root
//! package's binary is one line calling [`main`].
//!
//! ## Output
//!
//! Results go to standard output: text for people, or with `--json` one
//! JSON object on one line. Failures go to standard error as one line
//! `error: ...` (the error and its causes joined with `": "`), sometimes
//! followed by one `hint: ...` line, and the exit code is 1; usage errors
//! are clap's, with exit code 2. A panic is reported as one `error:` line
//! too, never as a backtrace.
//!
//! ## Commands
//!
//! * `init NAME [--force] [--kdf-memory-mib MIB]`: creates the identity.
//! * `whoami [--json]`: name, fingerprint, identity key; no passphrase.
//! * `fingerprint [--json]`: the `SHA256:` fingerprint; no passphrase.
//! * `passwd [--new-passphrase-file FILE] [--kdf-memory-mib MIB]`: changes
//!   the passphrase.
//! * `register --server HOST:PORT [--server-fingerprint SHA256:..]
//!   [--invite TOKEN]`: registers the identity, pins the certificate.
//! * `send USER TEXT...|-`, `pull [--json]`, `history USER [--limit N]
//!   [--json]`, `users|cl [--json]`, `friend add|accept|decline|remove
//!   USER`, `friend list [--json]`: the messaging commands.
//! * `fingerprint USER [--json]`, `verify USER [NUMBER]`: safety numbers.
//! * `chat`: stays online; see [`chat`].
//!
//! Global options: `--home DIR` (`MESSENGER_HOME`) and
//! `--passphrase-file FILE` (or `MESSENGER_PASSPHRASE`), before or after the
//! subcommand.

#![forbid(unsafe_code)]

mod args;
mod chat;
mod commands;
mod passphrase;
mod render;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, anyhow};
use clap::Parser as _;
use messenger_client::{Home, HomeError, KdfParams, PassphraseError, Profile};
use serde::Serialize;

use crate::args::{
    Cli, Command, FingerprintArgs, HOME_ENV, InitArgs, JsonArgs, KdfArgs, PasswdArgs,
};
use crate::passphrase::CliPassphrases;

/// Runs the `messenger` command with the process's arguments and returns
/// its exit code: 0 on success, 1 on an error, 2 on a usage error.
pub fn main() -> ExitCode {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with code 0; usage errors to
            // stderr with code 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let home = match cli.home {
        Some(dir) => Home::at(dir),
        None => Home::at(Home::default_dir().ok_or_else(|| {
            anyhow!("no home directory: the platform has no data directory for this user")
        })?),
    };
    let mut out = Output::stdout();
    match cli.command {
        Command::Init(args) => init(&home, cli.passphrase_file, args, &mut out),
        Command::Whoami(args) => whoami(&home, args, &mut out),
        Command::Fingerprint(FingerprintArgs { user: None, json }) => {
            fingerprint(&home, JsonArgs { json }, &mut out)
        }
        Command::Passwd(args) => passwd(&home, cli.passphrase_file, args, &mut out),
        command => commands::run(&home, cli.passphrase_file, command, &mut out),
    }
}

fn init(
    home: &Home,
    passphrase_file: Option<PathBuf>,
    args: InitArgs,
    out: &mut Output,
) -> anyhow::Result<()> {
    let params = kdf_params(&args.kdf)?.unwrap_or(KdfParams::DEFAULT);
    let mut passphrases = CliPassphrases::new(passphrase_file, None);
    let profile = home.init(&args.name, &mut passphrases, params, args.force)?;
    out.line(&format!(
        "created identity {} in {}",
        profile.name(),
        home.path().display()
    ))?;
    out.line(&format!("fingerprint {}", profile.fingerprint()))
}

fn whoami(home: &Home, args: JsonArgs, out: &mut Output) -> anyhow::Result<()> {
    let profile = home.profile()?;
    if args.json {
        #[derive(Serialize)]
        struct Whoami {
            name: String,
            fingerprint: String,
            identity_key: String,
            server: Option<String>,
            server_fingerprint: Option<String>,
            home: String,
        }
        return out.json(&Whoami {
            name: profile.name().to_string(),
            fingerprint: profile.fingerprint(),
            identity_key: profile.identity_key_hex(),
            server: profile.server().map(|s| s.address.clone()),
            server_fingerprint: profile.server().map(|s| s.fingerprint.clone()),
            home: home.path().display().to_string(),
        });
    }
    out.line(&format!("name         {}", profile.name()))?;
    out.line(&format!("fingerprint  {}", profile.fingerprint()))?;
    out.line(&format!("identity key {}", profile.identity_key_hex()))?;
    match profile.server() {
        Some(server) => out.line(&format!(
            "server       {} (certificate {})",
            server.address, server.fingerprint
        ))?,
        None => out.line("server       none (not registered)")?,
    }
    out.line(&format!("home         {}", home.path().display()))
}

fn fingerprint(home: &Home, args: JsonArgs, out: &mut Output) -> anyhow::Result<()> {
    let profile = home.profile()?;
    if args.json {
        #[derive(Serialize)]
        struct Fingerprint {
            name: String,
            fingerprint: String,
        }
        return out.json(&Fingerprint {
            name: profile.name().to_string(),
            fingerprint: profile.fingerprint(),
        });
    }
    out.line(&profile.fingerprint())
}

fn passwd(
    home: &Home,
    passphrase_file: Option<PathBuf>,
    args: PasswdArgs,
    out: &mut Output,
) -> anyhow::Result<()> {
    let params = kdf_params(&args.kdf)?;
    let mut passphrases = CliPassphrases::new(passphrase_file, args.new_passphrase_file);
    let profile: Profile = home.change_passphrase(&mut passphrases, params)?;
    out.line(&format!("changed the passphrase of {}", profile.name()))
}

/// The key-file cost from `--kdf-memory-mib`, with the default iterations
/// and lanes; `None` if not given.
fn kdf_params(args: &KdfArgs) -> anyhow::Result<Option<KdfParams>> {
    let Some(mib) = args.kdf_memory_mib else {
        return Ok(None);
    };
    let params = KdfParams::new(
        mib.saturating_mul(1024),
        KdfParams::DEFAULT.iterations(),
        KdfParams::DEFAULT.parallelism(),
    )
    .context("invalid --kdf-memory-mib")?;
    Ok(Some(params))
}

/// Standard output, with write failures (a closed pipe) as errors rather
/// than panics.
pub(crate) struct Output {
    stdout: io::Stdout,
}

impl Output {
    fn stdout() -> Self {
        Self {
            stdout: io::stdout(),
        }
    }

    pub(crate) fn line(&mut self, text: &str) -> anyhow::Result<()> {
        let mut lock = self.stdout.lock();
        writeln!(lock, "{text}")
            .and_then(|()| lock.flush())
            .context("could not write to standard output")
    }

    pub(crate) fn json<T: Serialize>(&mut self, value: &T) -> anyhow::Result<()> {
        let text = serde_json::to_string(value).context("could not encode JSON")?;
        self.line(&text)
    }
}

/// Prints `error: ...` and maybe `hint: ...` to standard error, one line
/// each.
fn report(error: &anyhow::Error) {
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "error: {}", error_text(error.as_ref()));
    if let Some(hint) = hint(error) {
        let _ = writeln!(stderr, "hint: {hint}");
    }
}

/// What to do next, for the errors where there is something to say.
fn hint(error: &anyhow::Error) -> Option<String> {
    if let Some(hint) = commands::hint(error) {
        return Some(hint);
    }
    const PASSPHRASE_HINT: &str = "in scripts, put the passphrase in a file only you can read and pass --passphrase-file FILE";
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<HomeError>() {
            return match e {
                HomeError::Passphrase(PassphraseError::Unavailable(_)) => {
                    Some(PASSPHRASE_HINT.to_owned())
                }
                HomeError::NotInitialized { .. } => Some(
                    "create an identity with `messenger init NAME`, or point --home at an existing one"
                        .to_owned(),
                ),
                HomeError::AlreadyInitialized { .. } => Some(
                    "`messenger init NAME --force` replaces it; the old identity is then lost for good"
                        .to_owned(),
                ),
                HomeError::KeyFile { .. } | HomeError::CorruptProfile { .. } => Some(
                    "restore the home from a backup, or start over with `messenger init NAME --force` (contacts will see a new key)"
                        .to_owned(),
                ),
                _ => None,
            };
        }
        if let Some(PassphraseError::Unavailable(_)) = cause.downcast_ref::<PassphraseError>() {
            return Some(PASSPHRASE_HINT.to_owned());
        }
    }
    if error.to_string().starts_with("no home directory") {
        return Some(format!("pass --home DIR or set {HOME_ENV}"));
    }
    None
}

/// An error and its causes on one line, outermost first, joined by `: `.
/// A cause whose text an earlier part already shows (an error that puts
/// its source in its own message) is left out, so nothing is said twice.
pub(crate) fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let text = one_line(&cause.to_string());
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

/// Keeps a message on one line: parsers' multi-line messages are folded.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reports a panic (a bug) as one `error:` line instead of Rust's message
/// and backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".to_owned());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let _ = writeln!(
            io::stderr(),
            "error: internal error{at}: {}; this is a bug, please report it",
            one_line(&what)
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_says_each_cause_once() {
        /// An error with an optional cause, shown as `text` (which may
        /// already include the cause's text, as `{source}` does).
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let inner = || Some(Box::new(E("too large (7 bytes)", None)));
        let e = anyhow::Error::from(E("could not encrypt for bob: too large (7 bytes)", inner()));
        assert_eq!(
            error_text(e.as_ref()),
            "could not encrypt for bob: too large (7 bytes)"
        );
        let e = anyhow::Error::from(E("could not send", inner())).context("send\n failed");
        assert_eq!(
            error_text(e.as_ref()),
            "send failed: could not send: too large (7 bytes)"
        );
    }

    #[test]
    fn one_line_folds_whitespace() {
        assert_eq!(one_line("a\n  b\tc \n"), "a b c");
    }

    #[test]
    fn hints() {
        let e = anyhow::Error::from(HomeError::NotInitialized {
            home: PathBuf::from("/h"),
        });
        assert!(hint(&e).unwrap().contains("messenger init"));
        let e = anyhow::Error::from(HomeError::WrongPassphrase);
        assert_eq!(hint(&e), None);
        let e = anyhow::Error::from(HomeError::from(PassphraseError::Unavailable(
            "x".to_owned(),
        )));
        assert!(hint(&e).unwrap().contains("--passphrase-file"));
    }
}

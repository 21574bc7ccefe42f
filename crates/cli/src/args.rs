//! The command line, as clap definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Environment variable naming the home directory.
pub(crate) const HOME_ENV: &str = "MESSENGER_HOME";
/// Environment variable holding the passphrase.
pub(crate) const PASSPHRASE_ENV: &str = "MESSENGER_PASSPHRASE";
/// Environment variable holding the new passphrase for `passwd`.
pub(crate) const NEW_PASSPHRASE_ENV: &str = "MESSENGER_NEW_PASSPHRASE";

/// Largest `--kdf-memory-mib`: the key file's own cap (1 GiB), which a
/// larger value would make unreadable.
const MAX_KDF_MEMORY_MIB: u32 = 1024;

const AFTER_HELP: &str = "\
Passphrases are never taken on the command line. They are read, in order, from
--passphrase-file FILE, from the MESSENGER_PASSPHRASE environment variable, or
from a prompt without echo when standard input is a terminal. A file readable
only by you is safer than the variable, which other programs you run inherit.

Environment:
  MESSENGER_HOME                profile directory, like --home
  MESSENGER_PASSPHRASE          the passphrase
  MESSENGER_NEW_PASSPHRASE      the new passphrase for `messenger passwd`
  MESSENGER_CONNECT_TIMEOUT_MS  how long to wait for the server, in ms (default 10000)";

/// End-to-end encrypted messenger for people who self-host.
#[derive(Debug, Parser)]
#[command(name = "messenger", version, after_help = AFTER_HELP)]
pub(crate) struct Cli {
    /// Profile directory holding your identity [default: the platform data
    /// directory, e.g. ~/.local/share/messenger]
    #[arg(long, global = true, env = HOME_ENV, hide_env_values = true, value_name = "DIR")]
    pub(crate) home: Option<PathBuf>,

    /// Read the passphrase from FILE (its contents, less one trailing newline)
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) passphrase_file: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create your identity, sealed under a passphrase, and print its fingerprint
    Init(InitArgs),
    /// Register your name and public keys with a rendezvous server
    Register(RegisterArgs),
    /// Show your name, server and fingerprint (needs no passphrase)
    Whoami(JsonArgs),
    /// Print your fingerprint, or with USER the safety number you share with USER
    Fingerprint(FingerprintArgs),
    /// Mark USER verified after comparing safety numbers
    Verify(VerifyArgs),
    /// Encrypt and send a message to USER
    Send(SendArgs),
    /// Fetch, decrypt and show new messages
    Pull(JsonArgs),
    /// Show the conversation with USER from the local history
    History(HistoryArgs),
    /// List who is online
    #[command(visible_alias = "cl")]
    Users(JsonArgs),
    /// Friends: add, accept, decline, remove, list
    #[command(subcommand)]
    Friend(FriendCommand),
    /// Stay online: show messages and presence as they come, send as you type
    Chat,
    /// Change the passphrase your identity is sealed under
    Passwd(PasswdArgs),
}

/// `messenger register`.
#[derive(Debug, Args)]
pub(crate) struct RegisterArgs {
    /// The server, HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) server: String,

    /// The server certificate's fingerprint, as its operator printed it;
    /// without it the certificate is trusted on first use and pinned
    #[arg(long, value_name = "SHA256:...")]
    pub(crate) server_fingerprint: Option<String>,

    /// A registration token from the operator (`rendezvous invite`)
    // Tokens are base64url and may start with '-'.
    #[arg(long, value_name = "TOKEN", allow_hyphen_values = true)]
    pub(crate) invite: Option<String>,
}

/// `messenger fingerprint`.
#[derive(Debug, Args)]
pub(crate) struct FingerprintArgs {
    /// Show the safety number shared with USER instead of your fingerprint
    pub(crate) user: Option<String>,

    /// Print one JSON object instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

/// `messenger verify`.
#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// The contact
    pub(crate) user: String,

    /// The 60-digit safety number USER read to you (spaces allowed); without
    /// it you are shown the number and asked to confirm on the terminal
    #[arg(num_args = 0.., value_name = "SAFETY_NUMBER")]
    pub(crate) number: Vec<String>,
}

/// `messenger send`.
#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// The recipient
    pub(crate) user: String,

    /// The message; `-` reads it from standard input
    #[arg(required = true, num_args = 1.., value_name = "TEXT")]
    pub(crate) text: Vec<String>,
}

/// `messenger history`.
#[derive(Debug, Args)]
pub(crate) struct HistoryArgs {
    /// The contact
    pub(crate) user: String,

    /// Show at most the last N messages
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub(crate) limit: usize,

    /// Print one JSON object per message instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

/// `messenger friend ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum FriendCommand {
    /// Ask USER to be friends (works while USER is offline)
    Add {
        /// Whom
        user: String,
    },
    /// Accept USER's friend request
    Accept {
        /// Whom
        user: String,
    },
    /// Decline USER's friend request
    Decline {
        /// Whom
        user: String,
    },
    /// Stop being friends with USER
    Remove {
        /// Whom
        user: String,
    },
    /// List friends and pending requests
    List(JsonArgs),
}

/// `messenger init`.
#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Your username: 1-32 characters of a-z, 0-9, '_', '.', '-'
    pub(crate) name: String,

    /// Replace an existing identity (the old one is lost for good)
    #[arg(long)]
    pub(crate) force: bool,

    #[command(flatten)]
    pub(crate) kdf: KdfArgs,
}

/// `messenger passwd`.
#[derive(Debug, Args)]
pub(crate) struct PasswdArgs {
    /// Read the new passphrase from FILE (its contents, less one trailing
    /// newline) [env: MESSENGER_NEW_PASSPHRASE]
    #[arg(long, value_name = "FILE")]
    pub(crate) new_passphrase_file: Option<PathBuf>,

    #[command(flatten)]
    pub(crate) kdf: KdfArgs,
}

/// Key-file cost options.
#[derive(Debug, Args)]
pub(crate) struct KdfArgs {
    /// Argon2 memory cost in MiB for sealing the key file [default: 64, or
    /// for passwd the file's current cost]. Lower values unlock faster but
    /// resist guessing less
    #[arg(
        long,
        value_name = "MIB",
        help_heading = "Advanced",
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_KDF_MEMORY_MIB))
    )]
    pub(crate) kdf_memory_mib: Option<u32>,
}

/// Output format options.
#[derive(Debug, Args)]
pub(crate) struct JsonArgs {
    /// Print one JSON object instead of text
    #[arg(long)]
    pub(crate) json: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_before_or_after_the_subcommand() {
        for argv in [
            &["messenger", "--home", "/h", "whoami"][..],
            &["messenger", "whoami", "--home", "/h"][..],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            assert_eq!(cli.home, Some(PathBuf::from("/h")), "{argv:?}");
        }
        let cli = Cli::try_parse_from(["messenger", "passwd", "--passphrase-file", "/p"]).unwrap();
        assert_eq!(cli.passphrase_file, Some(PathBuf::from("/p")));
    }

    #[test]
    fn an_invite_token_may_start_with_a_hyphen() {
        let cli = Cli::try_parse_from([
            "messenger",
            "register",
            "--server",
            "h:1",
            "--invite",
            "-189vj9fn",
        ])
        .unwrap();
        let Command::Register(args) = cli.command else {
            panic!("not register")
        };
        assert_eq!(args.invite.as_deref(), Some("-189vj9fn"));
    }

    #[test]
    fn kdf_memory_is_bounded() {
        let parse =
            |v: &str| Cli::try_parse_from(["messenger", "init", "a", "--kdf-memory-mib", v]);
        assert!(parse("1").is_ok());
        assert!(parse("1024").is_ok());
        assert!(parse("0").is_err());
        assert!(parse("1025").is_err());
    }
}

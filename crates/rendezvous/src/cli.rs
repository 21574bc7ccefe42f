//! The `rendezvous` command line: parse, start, print the two lines clients
//! and tests need, serve until SIGINT or SIGTERM, shut down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

use crate::admin::send_announcement;
use crate::app::{
    ADDRESS_FILE, SERVER_KEY_FILE, listening_line, load_or_create_server_secret, server_key_pair,
    sign_announcement, start,
};
use crate::invite::{invite_key, make_reset_token, make_token};
use crate::server::ServerConfig;
use crate::service::{Registration, ServiceConfig, UsersPolicy};
use crate::store::StoreOptions;
use crate::tls::ServerIdentity;
use messenger_proto::msg::MAX_ANNOUNCEMENT_LEN;

/// Default UDP address: every interface, port 4433.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";

/// The self-hosted rendezvous server of the messenger: presence, key
/// directory, friends, groups and store-and-forward of ciphertext, over QUIC.
#[derive(Debug, Parser)]
#[command(name = "rendezvous", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default when no command is given).
    Serve(ServeArgs),
    /// Print a one-time registration token (for `--registration invite`).
    /// Works whether or not the server is running.
    Invite {
        /// The server's data directory.
        #[arg(long, env = "RENDEZVOUS_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Instead, a one-time token that lets USER register again with new
        /// keys (a user who lost their key); their contacts will see a
        /// changed key
        #[arg(long, value_name = "USER")]
        reset: Option<String>,
    },
    /// Broadcast an announcement, signed by the server key, through the
    /// running server: delivered at once to everyone online and to everyone
    /// else at their next login.
    Announce {
        /// The text (at most 4,096 bytes).
        text: String,
        /// The server's data directory.
        #[arg(long, env = "RENDEZVOUS_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Address of the running server [default: the one it recorded in
        /// the data directory].
        #[arg(long)]
        server: Option<SocketAddr>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RegistrationArg {
    /// Anyone may register.
    Open,
    /// Registration needs a one-time token.
    Invite,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum UsersArg {
    /// `users` lists everyone online.
    Everyone,
    /// `users` lists only the asker's online friends.
    Friends,
}

#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// UDP address to listen on (port 0 picks a free port).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Directory for the database, certificate and keys [default: the
    /// platform data directory, e.g. ~/.local/share/rendezvous].
    #[arg(long, env = "RENDEZVOUS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Who may register.
    #[arg(long, value_enum, default_value = "open")]
    registration: RegistrationArg,
    /// Whom the `users` request lists.
    #[arg(long, value_enum, default_value = "everyone")]
    users: UsersArg,
    /// A CA-issued certificate chain (PEM) instead of the self-signed one.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

fn default_data_dir() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "rendezvous").map(|d| d.data_dir().to_path_buf())
}

/// Runs the command line; the binary's `main` is this.
pub fn main() -> ExitCode {
    let mut command = Cli::command();
    let matches = command.get_matches_mut();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `rendezvous --data-dir X invite` would otherwise take X as a serve
    // option (the top level's own options are `ServeArgs`') and ignore it:
    // the command would use the default directory.
    let misplaced = command
        .get_arguments()
        .filter(|arg| {
            matches.value_source(arg.get_id().as_str())
                == Some(clap::parser::ValueSource::CommandLine)
        })
        .find_map(clap::Arg::get_long)
        .map(str::to_owned);
    if let (Some(name), Some(flag)) = (matches.subcommand_name(), misplaced) {
        let message = format!(
            "--{flag} before the command `{name}` would be ignored: a command's options go \
             after it (see `rendezvous {name} --help`)"
        );
        command
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit();
    }
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
        Some(Command::Invite { data_dir, reset }) => return report(invite(data_dir, reset)),
        Some(Command::Announce {
            text,
            data_dir,
            server,
        }) => return report(announce(text, data_dir, server)),
    };
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn report(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn data_dir_or_default(data_dir: Option<PathBuf>) -> Result<PathBuf, String> {
    data_dir
        .or_else(default_data_dir)
        .ok_or_else(|| "no data directory: pass --data-dir".to_owned())
}

fn invite(data_dir: Option<PathBuf>, reset: Option<String>) -> Result<String, String> {
    let dir = data_dir_or_default(data_dir)?;
    let secret = load_or_create_server_secret(&dir).map_err(|e| e.to_string())?;
    let key = invite_key(&secret[..]);
    match reset {
        None => make_token(&key),
        Some(user) => {
            let user = messenger_crypto::identity::Username::parse(&user)
                .map_err(|_| format!("invalid username {user:?}"))?;
            make_reset_token(&key, user.as_str())
        }
    }
    .ok_or_else(|| "cannot make a token".to_owned())
}

fn announce(
    text: String,
    data_dir: Option<PathBuf>,
    server: Option<SocketAddr>,
) -> Result<String, String> {
    if text.len() > MAX_ANNOUNCEMENT_LEN {
        return Err(format!(
            "announcement longer than {MAX_ANNOUNCEMENT_LEN} bytes"
        ));
    }
    let dir = data_dir_or_default(data_dir)?;
    let key_path = dir.join(SERVER_KEY_FILE);
    if !key_path.exists() {
        return Err(format!(
            "{} not found: is this the server's data directory?",
            key_path.display()
        ));
    }
    let secret = load_or_create_server_secret(&dir).map_err(|e| e.to_string())?;
    // What the running server recorded: its address, and the fingerprint of
    // the certificate it serves (CA-issued with `--cert`, else the
    // self-signed one in the data directory).
    let recorded = std::fs::read_to_string(dir.join(ADDRESS_FILE));
    let mut lines = recorded.as_deref().unwrap_or("").lines();
    let (recorded_addr, recorded_fingerprint) = (lines.next(), lines.next());
    let mut addr = match (server, recorded_addr) {
        (Some(a), _) => a,
        (None, Some(line)) => line
            .trim()
            .parse()
            .map_err(|e| format!("bad address in {}: {e}", dir.join(ADDRESS_FILE).display()))?,
        (None, None) => {
            let why = recorded
                .err()
                .map_or_else(|| "empty".to_owned(), |e| e.to_string());
            return Err(format!(
                "no running server recorded in {} ({why}); pass --server ADDR",
                dir.display()
            ));
        }
    };
    let fingerprint = match recorded_fingerprint {
        Some(line) if line.trim().starts_with("SHA256:") => line.trim().to_owned(),
        _ => ServerIdentity::load_or_create(&dir)
            .map_err(|e| e.to_string())?
            .fingerprint()
            .to_owned(),
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let issued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let signed = sign_announcement(&server_key_pair(&secret), issued_at, &text);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(send_announcement(addr, &fingerprint, signed))?;
    Ok(format!("announced to {addr}"))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr; stdout carries only the lines clients and tests read.
    // Colours only on a terminal: a service manager's journal or a log file
    // would keep the escape codes.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let data_dir = args
        .data_dir
        .or_else(default_data_dir)
        .ok_or("no data directory: pass --data-dir")?;
    let mut config = ServerConfig::new(args.listen, data_dir.clone());
    config.cert = args.cert.zip(args.key);
    let service_config = ServiceConfig {
        registration: match args.registration {
            RegistrationArg::Open => Registration::Open,
            RegistrationArg::Invite => Registration::Invite,
        },
        users_policy: match args.users {
            UsersArg::Everyone => UsersPolicy::Everyone,
            UsersArg::Friends => UsersPolicy::FriendsOnly,
        },
        ..ServiceConfig::default()
    };
    // Handlers first: once the ready lines are out, a SIGTERM must mean a
    // clean shutdown, not the default action (an abrupt exit).
    let signalled = shutdown_signal();
    let running =
        start(config, service_config, StoreOptions::default()).map_err(|e| e.to_string())?;
    println!("{}", listening_line(running.handle.local_addr()));
    println!("certificate {}", running.handle.fingerprint());
    tracing::info!(addr = %running.handle.local_addr(), "serving");

    signalled.await;
    tracing::info!("shutting down");
    running.handle.shutdown().await;
    // No server listens there any more; `announce` should say so at once.
    let _ = std::fs::remove_file(data_dir.join(ADDRESS_FILE));
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now and returns the future that
/// ends at the first of them.
#[cfg(unix)]
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        match handlers {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Ctrl-C, elsewhere.
#[cfg(not(unix))]
fn shutdown_signal() -> impl Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! The `rendezvous` command line: parse, start, print the two lines clients
//! and tests need, serve until SIGINT or SIGTERM, shut down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{listening_line, start};
use crate::server::ServerConfig;
use crate::service::{Registration, ServiceConfig};
use crate::store::StoreOptions;

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
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RegistrationArg {
    /// Anyone may register.
    Open,
    /// Registration needs a one-time token.
    Invite,
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
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr; stdout carries only the lines clients and tests read.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let data_dir = args
        .data_dir
        .or_else(default_data_dir)
        .ok_or("no data directory: pass --data-dir")?;
    let mut config = ServerConfig::new(args.listen, data_dir);
    config.cert = args.cert.zip(args.key);
    let service_config = ServiceConfig {
        registration: match args.registration {
            RegistrationArg::Open => Registration::Open,
            RegistrationArg::Invite => Registration::Invite,
        },
        ..ServiceConfig::default()
    };
    let running =
        start(config, service_config, StoreOptions::default()).map_err(|e| e.to_string())?;
    println!("{}", listening_line(running.handle.local_addr()));
    println!("certificate {}", running.handle.fingerprint());
    tracing::info!(addr = %running.handle.local_addr(), "serving");

    wait_for_signal().await;
    tracing::info!("shutting down");
    running.handle.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
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

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

//! The commands that need the unlocked identity and, mostly, the server.

use std::io::{self, IsTerminal as _, Read as _};
use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use messenger_client::client::{self, Client, ClientError, Event, FriendAction};
use messenger_client::conn::{ConnError, ConnectOptions};
use messenger_client::engine::EngineError;
use messenger_client::store::StoreError;
use messenger_client::{Home, HomeError};
use messenger_proto::ErrorCode;
use serde::Serialize;

use crate::args::{Command, FriendCommand, HistoryArgs, RegisterArgs, SendArgs, VerifyArgs};
use crate::passphrase::CliPassphrases;
use crate::render;
use crate::{Output, chat};

/// Largest message read from standard input for `send USER -`: the
/// largest plaintext one message carries (64 KiB).
const MAX_STDIN_MESSAGE: u64 = 64 * 1024;

/// Environment variable overriding the connect timeout, in milliseconds
/// (slow links; tests of an unreachable server).
pub(crate) const CONNECT_TIMEOUT_ENV: &str = "MESSENGER_CONNECT_TIMEOUT_MS";

/// The connection settings: the defaults, with the connect timeout from
/// [`CONNECT_TIMEOUT_ENV`] when set.
fn connect_options() -> anyhow::Result<ConnectOptions> {
    let mut options = ConnectOptions::default();
    if let Ok(value) = std::env::var(CONNECT_TIMEOUT_ENV) {
        let ms: u64 = value.parse().ok().filter(|&ms| ms > 0).with_context(|| {
            format!("{CONNECT_TIMEOUT_ENV} must be a positive number of milliseconds")
        })?;
        options.connect_timeout = std::time::Duration::from_millis(ms);
    }
    Ok(options)
}

/// Runs one of the commands that need the passphrase.
pub(crate) fn run(
    home: &Home,
    passphrase_file: Option<PathBuf>,
    command: Command,
    out: &mut Output,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    let mut passphrases = CliPassphrases::new(passphrase_file, None);
    if let Command::Register(args) = command {
        return runtime.block_on(register(
            home,
            &mut passphrases,
            args,
            out,
            &connect_options()?,
        ));
    }
    // Read a message from stdin before anything else touches the terminal.
    let command = match command {
        Command::Send(mut args) if args.text == ["-"] => {
            args.text = vec![read_stdin_message()?];
            Command::Send(args)
        }
        other => other,
    };
    let mut client = Client::open(home, &mut passphrases, connect_options()?)?;
    runtime.block_on(async {
        let result = dispatch(&mut client, command, out).await;
        for event in client.take_events() {
            render::event_to_stderr(&event);
        }
        client.close().await;
        result
    })
}

async fn dispatch(client: &mut Client, command: Command, out: &mut Output) -> anyhow::Result<()> {
    match command {
        Command::Send(args) => send(client, args, out).await,
        Command::Pull(args) => pull(client, args.json, out).await,
        Command::History(args) => history(client, args, out),
        Command::Users(args) => users(client, args.json, out).await,
        Command::Friend(command) => friend(client, command, out).await,
        Command::Fingerprint(args) => {
            let user = args.user.context("missing USER")?;
            safety_number(client, &user, args.json, out).await
        }
        Command::Verify(args) => verify(client, args, out).await,
        Command::Chat => chat::run(client, out).await,
        Command::Init(_) | Command::Whoami(_) | Command::Passwd(_) | Command::Register(_) => {
            bail!("internal error: command dispatched twice")
        }
    }
}

async fn register(
    home: &Home,
    passphrases: &mut CliPassphrases,
    args: RegisterArgs,
    out: &mut Output,
    options: &ConnectOptions,
) -> anyhow::Result<()> {
    let profile = client::register(
        home,
        passphrases,
        &args.server,
        args.server_fingerprint.as_deref(),
        args.invite,
        options,
    )
    .await?;
    let server = profile
        .server()
        .ok_or_else(|| anyhow!("the profile did not keep the server"))?;
    out.line(&format!(
        "registered {} with {}",
        profile.name(),
        server.address
    ))?;
    out.line(&format!(
        "server certificate {} (pinned)",
        server.fingerprint
    ))
}

fn read_stdin_message() -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    io::stdin()
        .take(MAX_STDIN_MESSAGE + 1)
        .read_to_end(&mut bytes)
        .context("could not read the message from standard input")?;
    if bytes.len() as u64 > MAX_STDIN_MESSAGE {
        bail!("the message is longer than {MAX_STDIN_MESSAGE} bytes");
    }
    let mut text = String::from_utf8(bytes).context("the message is not UTF-8 text")?;
    if text.ends_with('\n') {
        text.pop();
    }
    Ok(text)
}

async fn send(client: &mut Client, args: SendArgs, out: &mut Output) -> anyhow::Result<()> {
    let text = args.text.join(" ");
    if text.is_empty() {
        bail!("the message is empty");
    }
    let sent = client.send(&args.user, &text).await;
    let sent = match sent {
        Ok(sent) => sent,
        Err(e) => {
            for event in client.take_events() {
                render::event_to_stderr(&event);
            }
            return Err(e.into());
        }
    };
    for event in client.take_events() {
        render::event_to_stderr(&event);
    }
    if sent.flushed > 0 {
        out.line(&format!(
            "sent {} earlier message(s) from the outbox",
            sent.flushed
        ))?;
    }
    out.line(&format!("sent to {}", args.user.to_lowercase()))
}

async fn pull(client: &mut Client, json: bool, out: &mut Output) -> anyhow::Result<()> {
    let events = client.pull().await?;
    let mut count = 0;
    for event in events {
        match event {
            Event::Message(m) => {
                count += 1;
                if json {
                    out.json(&render::JsonMessage::from(&m))?;
                } else {
                    out.line(&render::message_line(&m))?;
                }
            }
            other => render::event_to_stderr(&other),
        }
    }
    if count == 0 && !json {
        out.line("no new messages")?;
    }
    Ok(())
}

fn history(client: &mut Client, args: HistoryArgs, out: &mut Output) -> anyhow::Result<()> {
    let entries = client.history(&args.user, args.limit)?;
    let me = client.profile().name().to_string();
    let them = args.user.to_lowercase();
    for entry in &entries {
        if args.json {
            out.json(&render::JsonHistory::new(entry, &me, &them))?;
        } else {
            out.line(&render::history_line(entry, &me, &them))?;
        }
    }
    if entries.is_empty() && !args.json {
        out.line(&format!("no messages with {them}"))?;
    }
    Ok(())
}

async fn users(client: &mut Client, json: bool, out: &mut Output) -> anyhow::Result<()> {
    let users = client.users().await?;
    if json {
        #[derive(Serialize)]
        struct Users {
            users: Vec<render::JsonUser>,
        }
        return out.json(&Users {
            users: users.iter().map(render::JsonUser::from).collect(),
        });
    }
    if users.is_empty() {
        return out.line("nobody is online");
    }
    for (i, user) in users.iter().enumerate() {
        out.line(&format!("{:>3}. {}", i + 1, render::user_line(user)))?;
    }
    Ok(())
}

async fn friend(
    client: &mut Client,
    command: FriendCommand,
    out: &mut Output,
) -> anyhow::Result<()> {
    let (action, user, done) = match command {
        FriendCommand::List(args) => return friend_list(client, args.json, out).await,
        FriendCommand::Add { user } => (FriendAction::Add, user, "asked"),
        FriendCommand::Accept { user } => (FriendAction::Accept, user, "accepted"),
        FriendCommand::Decline { user } => (FriendAction::Decline, user, "declined"),
        FriendCommand::Remove { user } => (FriendAction::Remove, user, "removed"),
    };
    client.friend(action, &user).await?;
    let user = user.to_lowercase();
    out.line(&match action {
        FriendAction::Add => format!("{done} {user} to be friends"),
        _ => format!("{done} {user}"),
    })
}

async fn friend_list(client: &mut Client, json: bool, out: &mut Output) -> anyhow::Result<()> {
    let friends = client.friends().await?;
    if json {
        #[derive(Serialize)]
        struct FriendList {
            friends: Vec<render::JsonUser>,
            incoming: Vec<String>,
            outgoing: Vec<String>,
        }
        return out.json(&FriendList {
            friends: friends.friends.iter().map(render::JsonUser::from).collect(),
            incoming: friends.incoming,
            outgoing: friends.outgoing,
        });
    }
    if friends.friends.is_empty() && friends.incoming.is_empty() && friends.outgoing.is_empty() {
        return out.line("no friends yet; `messenger friend add USER` asks someone");
    }
    for user in &friends.friends {
        out.line(&render::user_line(user))?;
    }
    for name in &friends.incoming {
        out.line(&format!(
            "{name} asked to be friends (`messenger friend accept {name}`)"
        ))?;
    }
    for name in &friends.outgoing {
        out.line(&format!("{name} has not answered yet"))?;
    }
    Ok(())
}

async fn safety_number(
    client: &mut Client,
    user: &str,
    json: bool,
    out: &mut Output,
) -> anyhow::Result<()> {
    let safety = client.safety_number(user).await?;
    for warning in &safety.warnings {
        render::warning(warning);
    }
    if json {
        #[derive(Serialize)]
        struct Number<'a> {
            user: &'a str,
            safety_number: &'a str,
            verified: bool,
        }
        return out.json(&Number {
            user: &safety.user,
            safety_number: &safety.digits,
            verified: safety.verified,
        });
    }
    out.line(&format!("safety number with {}:", safety.user))?;
    for row in render::number_rows(&safety.grouped) {
        out.line(&format!("  {row}"))?;
    }
    if io::stdout().is_terminal()
        && let Some(qr) = render::qr(&safety.digits)
    {
        out.line(&qr)?;
    }
    out.line(&if safety.verified {
        "verified".to_owned()
    } else {
        format!(
            "not verified: compare it with {0} in person or on a call, then `messenger verify {0} NUMBER`",
            safety.user
        )
    })
}

async fn verify(client: &mut Client, args: VerifyArgs, out: &mut Output) -> anyhow::Result<()> {
    let number = if args.number.is_empty() {
        let safety = client.safety_number(&args.user).await?;
        for warning in &safety.warnings {
            render::warning(warning);
        }
        if !io::stdin().is_terminal() {
            bail!(
                "give the safety number {} reads to you: messenger verify {} NUMBER",
                safety.user,
                safety.user
            );
        }
        out.line(&format!("safety number with {}:", safety.user))?;
        for row in render::number_rows(&safety.grouped) {
            out.line(&format!("  {row}"))?;
        }
        eprint!("does {} see exactly this number? [y/N] ", safety.user);
        let mut answer = String::new();
        io::stdin()
            .read_line(&mut answer)
            .context("could not read the answer")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("not verified");
        }
        safety.digits
    } else {
        // The number is checked against our own computation, so make sure
        // the directory's key has been compared first.
        let safety = client.safety_number(&args.user).await?;
        for warning in &safety.warnings {
            render::warning(warning);
        }
        args.number.join("")
    };
    client.verify(&args.user, &number)?;
    out.line(&format!("{} is verified", args.user.to_lowercase()))
}

/// What to do next, for the client's errors.
pub(crate) fn hint(error: &anyhow::Error) -> Option<String> {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return match e {
                ClientError::NotRegistered { .. } => Some(
                    "register first: messenger register --server HOST:PORT".to_owned(),
                ),
                ClientError::Queued { .. } => Some(
                    "it is sent by the next command that reaches the server (e.g. `messenger pull`)"
                        .to_owned(),
                ),
                ClientError::Engine(EngineError::Store(StoreError::Locked { .. })) => Some(
                    "one messenger command at a time uses a home: if `messenger chat` runs with it, send from there (`to USER TEXT`) or quit it first"
                        .to_owned(),
                ),
                ClientError::Connect { source, .. } => conn_hint(source),
                ClientError::Conn(source) => conn_hint(source),
                ClientError::Home(HomeError::WrongPassphrase) => None,
                _ => None,
            };
        }
    }
    None
}

fn conn_hint(error: &ConnError) -> Option<String> {
    match error {
        ConnError::CertificateMismatch { actual, .. } => Some(format!(
            "if the operator confirms the server's certificate changed to {actual}, register again with --server-fingerprint {actual}"
        )),
        ConnError::Server(ErrorCode::RateLimited) => {
            Some("wait a moment and try again".to_owned())
        }
        ConnError::Server(ErrorCode::QuotaExceeded) => Some(
            "the recipient's mailbox on the server is full until they fetch their messages"
                .to_owned(),
        ),
        ConnError::Server(ErrorCode::UserExists) => Some(
            "choose another name with `messenger init NAME --force`, or ask the operator for `rendezvous invite --reset NAME` if the name is yours".to_owned(),
        ),
        _ => None,
    }
}

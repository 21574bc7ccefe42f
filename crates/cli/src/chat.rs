//! `messenger chat`: stay logged in, show messages and presence as they
//! come, send what is typed.
//!
//! On a terminal the input line is edited with rustyline and events are
//! printed above it (rustyline's external printer), so typing is never
//! interrupted. With standard input piped, each event is one line on
//! standard output and each input line one command, so chat can be scripted
//! and tested; the end of input ends the session.
//!
//! Commands: `users` (`cl`, `client_list`), `to USER TEXT`, `USER TEXT` (USER
//! from the last user list or someone already talked to), `N TEXT` (N from
//! the last user list), a bare line to the last person written to, `pull`,
//! `help`, `quit` / `exit`.

use std::io::{self, BufRead as _, IsTerminal as _};

use anyhow::Context as _;
use messenger_client::client::{Client, Event};
use tokio::sync::mpsc;

use crate::render;
use crate::{Output, error_text};

/// Input lines waiting to be handled: 16; the reader thread waits beyond.
const LINE_QUEUE: usize = 16;

const HELP: &str = "\
commands:
  users | cl | client_list   who is online (numbered)
  to USER TEXT               send TEXT to USER
  USER TEXT                  the same, for someone listed or talked to
  N TEXT                     send to number N of the last user list
  TEXT                       send to the last person you wrote to
  pull                       fetch waiting messages
  help                       this text
  quit | exit                leave";

/// Where lines go: standard output, or above the input line.
enum Screen {
    Plain,
    Terminal(Box<dyn rustyline::ExternalPrinter + Send>),
}

impl Screen {
    fn show(&mut self, out: &mut Output, line: &str) -> anyhow::Result<()> {
        match self {
            Self::Plain => out.line(line),
            Self::Terminal(printer) => printer
                .print(format!("{line}\n"))
                .context("could not print to the terminal"),
        }
    }
}

/// Runs the chat session until `quit`, the end of input, or a lost
/// connection.
pub(crate) async fn run(client: &mut Client, out: &mut Output) -> anyhow::Result<()> {
    client.connect().await?;
    let (tx, mut lines) = mpsc::channel::<String>(LINE_QUEUE);
    let mut screen = if io::stdin().is_terminal() {
        Screen::Terminal(spawn_editor(tx, client.profile().name().as_str())?)
    } else {
        spawn_reader(tx);
        Screen::Plain
    };
    let me = client.profile().name().to_string();
    screen.show(
        out,
        &format!(
            "connected as {me} to {}; type help for commands",
            client.server().address
        ),
    )?;
    let mut state = State::default();
    for event in client.pull().await? {
        show_event(&mut screen, out, &event)?;
    }
    loop {
        tokio::select! {
            push = client.next_push() => {
                let Some(push) = push else {
                    let reason = client.disconnect_reason();
                    screen.show(out, &format!("* disconnected: {reason}"))?;
                    anyhow::bail!("disconnected: {reason}");
                };
                for event in client.handle_push(push).await? {
                    show_event(&mut screen, out, &event)?;
                }
            }
            line = lines.recv() => {
                let Some(line) = line else { return Ok(()) };
                if !command(client, &mut state, &mut screen, out, line.trim()).await? {
                    return Ok(());
                }
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// Names of the last `users` listing, for `N TEXT`.
    listed: Vec<String>,
    /// The last person written to, for a bare line.
    last: Option<String>,
    /// Everyone written to or heard from in this session.
    known: Vec<String>,
}

fn show_event(screen: &mut Screen, out: &mut Output, event: &Event) -> anyhow::Result<()> {
    screen.show(out, &render::event_line(event))
}

/// Handles one input line; `false` to leave.
async fn command(
    client: &mut Client,
    state: &mut State,
    screen: &mut Screen,
    out: &mut Output,
    line: &str,
) -> anyhow::Result<bool> {
    if line.is_empty() {
        return Ok(true);
    }
    let (first, rest) = match line.split_once(char::is_whitespace) {
        Some((first, rest)) => (first, rest.trim()),
        None => (line, ""),
    };
    match first {
        "quit" | "exit" if rest.is_empty() => return Ok(false),
        "help" if rest.is_empty() => {
            for l in HELP.lines() {
                screen.show(out, l)?;
            }
        }
        "users" | "cl" | "client_list" if rest.is_empty() => match client.users().await {
            Ok(users) => {
                state.listed = users.iter().map(|u| u.username.clone()).collect();
                if users.is_empty() {
                    screen.show(out, "nobody is online")?;
                }
                for (i, u) in users.iter().enumerate() {
                    screen.show(out, &format!("{:>3}. {}", i + 1, render::user_line(u)))?;
                }
            }
            Err(e) => screen.show(out, &format!("error: {}", error_text(&e)))?,
        },
        "pull" if rest.is_empty() => match client.pull().await {
            Ok(events) => {
                for event in &events {
                    show_event(screen, out, event)?;
                }
            }
            Err(e) => screen.show(out, &format!("error: {}", error_text(&e)))?,
        },
        "to" => match rest.split_once(char::is_whitespace) {
            Some((user, text)) => send(client, state, screen, out, user, text.trim()).await?,
            None => screen.show(out, "usage: to USER TEXT")?,
        },
        _ => {
            let target = if let Ok(n) = first.parse::<usize>() {
                match n.checked_sub(1).and_then(|i| state.listed.get(i)) {
                    Some(name) => Some((name.clone(), rest)),
                    None => {
                        screen.show(out, &format!("no user number {n}; `users` lists them"))?;
                        return Ok(true);
                    }
                }
            } else {
                let lower = first.to_lowercase();
                (!rest.is_empty()
                    && (state.listed.contains(&lower) || state.known.contains(&lower)))
                .then_some((lower, rest))
            };
            match (target, state.last.clone()) {
                (Some((user, text)), _) => send(client, state, screen, out, &user, text).await?,
                (None, Some(last)) => send(client, state, screen, out, &last, line).await?,
                (None, None) => screen.show(
                    out,
                    "to whom? `to USER TEXT` (or `help`); a bare line goes to the last person you wrote to",
                )?,
            }
        }
    }
    Ok(true)
}

async fn send(
    client: &mut Client,
    state: &mut State,
    screen: &mut Screen,
    out: &mut Output,
    user: &str,
    text: &str,
) -> anyhow::Result<()> {
    if text.is_empty() {
        return screen.show(out, "nothing to send");
    }
    let user = user.to_lowercase();
    match client.send(&user, text).await {
        Ok(_) => {
            for event in client.take_events() {
                show_event(screen, out, &event)?;
            }
            screen.show(out, &format!("sent to {user}"))?;
            state.last = Some(user.clone());
            if !state.known.contains(&user) {
                state.known.push(user);
            }
        }
        Err(e) => screen.show(out, &format!("error: {}", error_text(&e)))?,
    }
    for event in client.take_events() {
        show_event(screen, out, &event)?;
    }
    Ok(())
}

/// Reads piped standard input line by line on a thread.
fn spawn_reader(tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
}

/// Runs the line editor on a thread and returns the printer that writes
/// above its input line.
fn spawn_editor(
    tx: mpsc::Sender<String>,
    name: &str,
) -> anyhow::Result<Box<dyn rustyline::ExternalPrinter + Send>> {
    let mut editor = rustyline::DefaultEditor::new().context("cannot start the line editor")?;
    let printer = editor
        .create_external_printer()
        .context("cannot print above the input line")?;
    let prompt = format!("{name}> ");
    std::thread::spawn(move || {
        // Ctrl-C, Ctrl-D or a terminal error ends the input.
        while let Ok(line) = editor.readline(&prompt) {
            let _ = editor.add_history_entry(line.as_str());
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    Ok(Box::new(printer))
}

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

use std::collections::VecDeque;
use std::io::{self, BufRead as _, IsTerminal as _};
use std::time::Duration;

use anyhow::Context as _;
use messenger_client::client::{Client, ClientError, Event};
use messenger_client::conn::ClosedReason;
use tokio::sync::mpsc;
use tokio::time::Instant;

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

/// First wait before connecting again after the connection was lost;
/// doubled after each failed try, up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two tries to connect again.
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// `wait` times a random factor from 0.75 to 1.25, so that the clients a
/// restarting server dropped all at once do not come back all at once.
fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(rand::random_range(0.75..1.25))
}

/// A wait in whole seconds, rounded to the nearest ("in 0 s" would read as
/// "now", so at least 1).
fn seconds(wait: Duration) -> u64 {
    (wait.as_secs_f64().round() as u64).max(1)
}

/// Runs the chat session until `quit`, the end of input, or a connection
/// that ended for good. A connection lost for a passing reason (the
/// server restarting, the network gone) is made again, after 1 s, then
/// twice as long after each failed try, up to 30 s. Meanwhile what is typed
/// is handled at once: a message goes to the outbox and out with the next
/// connection, `users` and `pull` say that the chat is not connected, and
/// `quit` leaves, even during a try.
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
    // Lines typed during a try to connect again, handled after it.
    let mut held: VecDeque<String> = VecDeque::new();
    // Why the last try to connect again failed, as shown.
    let mut said: Option<String> = None;
    // Whether the server's notice of a replacing login was shown (the
    // close that follows need not say it again).
    let mut told_replaced = false;
    loop {
        let line = if let Some(line) = held.pop_front() {
            Some(line)
        } else {
            let online = client.is_connected();
            let wake = state.retry.map_or_else(Instant::now, |(at, _)| at);
            tokio::select! {
                push = client.next_push(), if online => {
                    match push {
                        Some(push) => match client.handle_push(push).await {
                            Ok(events) => {
                                for event in &events {
                                    told_replaced |= matches!(event, Event::Disconnected { .. });
                                    show_event(&mut screen, out, event)?;
                                }
                            }
                            // The connection went under the acknowledgement:
                            // the next push says so, and it is made again.
                            Err(e) if e.is_transient() => {
                                screen.show(out, &format!("error: {}", error_text(&e)))?;
                            }
                            Err(e) => return Err(e.into()),
                        },
                        None => {
                            let reason = client.disconnect_reason();
                            if !reason.is_transient() {
                                if !(told_replaced && reason == ClosedReason::Replaced) {
                                    screen.show(out, &format!("* disconnected: {reason}"))?;
                                }
                                anyhow::bail!("disconnected: {reason}");
                            }
                            let delay = jittered(RECONNECT_FIRST);
                            screen.show(
                                out,
                                &format!(
                                    "* disconnected: {reason}; connecting again in {} s",
                                    seconds(delay)
                                ),
                            )?;
                            state.retry = Some((Instant::now() + delay, RECONNECT_FIRST));
                        }
                    }
                    continue;
                }
                () = tokio::time::sleep_until(wake), if state.retry.is_some() => {
                    let wait = state.retry.map_or(RECONNECT_FIRST, |(_, wait)| wait);
                    let result = match connect_again(client, &mut lines, &mut held).await {
                        Some(result) => result,
                        None => {
                            // Leaving: what was typed before goes to the
                            // outbox (still not connected), then out.
                            while let Some(line) = held.pop_front() {
                                if !command(client, &mut state, &mut screen, out, line.trim()).await? {
                                    break;
                                }
                            }
                            return Ok(());
                        }
                    };
                    match result {
                        Ok(flushed) => {
                            state.retry = None;
                            said = None;
                            connected_again(client, &mut screen, out, flushed).await?;
                        }
                        // Logged in, but sending the outbox failed.
                        Err(e) if client.is_connected() => {
                            state.retry = None;
                            said = None;
                            connected_again(client, &mut screen, out, 0).await?;
                            screen.show(out, &format!("error: {}", error_text(&e)))?;
                        }
                        Err(e) if e.is_transient() => {
                            let next = (wait * 2).min(RECONNECT_MAX);
                            let delay = jittered(next);
                            // Why, once; then only that it goes on.
                            let why = error_text(&e);
                            let line = if said.as_ref() == Some(&why) {
                                format!("* still disconnected; next try in {} s", seconds(delay))
                            } else {
                                format!("* still disconnected: {why}; next try in {} s", seconds(delay))
                            };
                            said = Some(why);
                            screen.show(out, &line)?;
                            state.retry = Some((Instant::now() + delay, next));
                        }
                        Err(e) => {
                            screen.show(out, &format!("* cannot connect again: {}", error_text(&e)))?;
                            return Err(e.into());
                        }
                    }
                    continue;
                }
                line = lines.recv() => line,
            }
        };
        let Some(line) = line else { return Ok(()) };
        if !command(client, &mut state, &mut screen, out, line.trim()).await? {
            return Ok(());
        }
    }
}

/// Says the chat is connected again, with how many outbox messages went,
/// and shows what waited on the server meanwhile.
async fn connected_again(
    client: &mut Client,
    screen: &mut Screen,
    out: &mut Output,
    flushed: usize,
) -> anyhow::Result<()> {
    screen.show(out, "* connected again")?;
    if flushed > 0 {
        screen.show(
            out,
            &format!("sent {flushed} earlier message(s) from the outbox"),
        )?;
    }
    match client.pull().await {
        Ok(events) => {
            for event in &events {
                show_event(screen, out, event)?;
            }
        }
        Err(e) => screen.show(out, &format!("error: {}", error_text(&e)))?,
    }
    Ok(())
}

/// Connects again while still reading input: `None` when `quit` or the end
/// of input comes first (the try is dropped; the lines before it are in
/// `held`). Other lines wait in `held` (at most [`LINE_QUEUE`]; beyond,
/// input waits in the channel).
async fn connect_again(
    client: &mut Client,
    lines: &mut mpsc::Receiver<String>,
    held: &mut VecDeque<String>,
) -> Option<Result<usize, ClientError>> {
    let connecting = client.connect();
    tokio::pin!(connecting);
    loop {
        tokio::select! {
            result = &mut connecting => return Some(result),
            line = lines.recv(), if held.len() < LINE_QUEUE => match line {
                None => return None,
                Some(line) if is_quit(line.trim()) => return None,
                Some(line) => held.push_back(line),
            },
        }
    }
}

/// Whether `line` (trimmed) ends the session.
fn is_quit(line: &str) -> bool {
    matches!(line, "quit" | "exit")
}

#[derive(Default)]
struct State {
    /// Names of the last `users` listing, for `N TEXT`.
    listed: Vec<String>,
    /// The last person written to, for a bare line.
    last: Option<String>,
    /// Everyone written to or heard from in this session.
    known: Vec<String>,
    /// While not connected: when to try again, and how long to wait after
    /// that try if it fails.
    retry: Option<(Instant, Duration)>,
}

impl State {
    /// The line for a command that needs the server while not connected.
    fn offline_line(&self) -> Option<String> {
        self.retry.map(|(at, _)| {
            let left = at.saturating_duration_since(Instant::now());
            format!("* not connected; next try in {} s", seconds(left))
        })
    }
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
        _ if is_quit(line) => return Ok(false),
        "help" if rest.is_empty() => {
            for l in HELP.lines() {
                screen.show(out, l)?;
            }
        }
        "users" | "cl" | "client_list" | "pull" if rest.is_empty() && state.retry.is_some() => {
            if let Some(line) = state.offline_line() {
                screen.show(out, &line)?;
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
    let result = if state.retry.is_some() {
        // Known to be out of reach: straight to the outbox, no connect
        // timeout to wait out.
        client.send_later(&user, text).map(|_| None)
    } else {
        client.send(&user, text).await.map(Some)
    };
    let saved = match result {
        Ok(Some(_)) => {
            for event in client.take_events() {
                show_event(screen, out, &event)?;
            }
            screen.show(out, &format!("sent to {user}"))?;
            true
        }
        Ok(None) => {
            screen.show(
                out,
                &format!("* not connected: the message to {user} waits in the outbox and goes out once connected"),
            )?;
            true
        }
        Err(ClientError::Queued { reason, .. }) => {
            screen.show(
                out,
                &format!("* not sent yet: the message to {user} waits in the outbox and goes out with the next one or connection ({reason})"),
            )?;
            true
        }
        Err(e) => {
            screen.show(out, &format!("error: {}", error_text(&e)))?;
            false
        }
    };
    if saved {
        state.last = Some(user.clone());
        if !state.known.contains(&user) {
            state.known.push(user);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_spread_and_shown_in_whole_seconds() {
        let wait = Duration::from_secs(8);
        let draws: Vec<Duration> = (0..200).map(|_| jittered(wait)).collect();
        assert!(draws.iter().all(|d| (6.0..10.0).contains(&d.as_secs_f64())));
        // Spread, not one value for everybody.
        assert!(draws.iter().any(|d| *d < wait) && draws.iter().any(|d| *d > wait));
        assert_eq!(seconds(Duration::from_millis(400)), 1);
        assert_eq!(seconds(Duration::from_millis(1_600)), 2);
        assert_eq!(seconds(RECONNECT_MAX), 30);
    }
}

//! How results look: message and history lines, JSON shapes, warnings, the
//! safety number's rows and QR code, and UTC times.

use std::io::{self, Write as _};

use messenger_client::client::{Event, HistoryEntry, Message, Warning};
use messenger_client::engine::Direction;
use messenger_crypto::identity::PublicIdentity;
use messenger_proto::msg::UserInfo;
use serde::Serialize;

use crate::one_line;

/// A received message as one JSON object (`pull --json`).
#[derive(Serialize)]
pub(crate) struct JsonMessage<'a> {
    from: &'a str,
    text: &'a str,
    id: &'a str,
    sent_at: u64,
}

impl<'a> From<&'a Message> for JsonMessage<'a> {
    fn from(m: &'a Message) -> Self {
        Self {
            from: &m.from,
            text: &m.text,
            id: &m.id,
            sent_at: m.sent_at,
        }
    }
}

/// A history row as one JSON object (`history --json`).
#[derive(Serialize)]
pub(crate) struct JsonHistory<'a> {
    direction: &'static str,
    from: &'a str,
    to: &'a str,
    text: &'a str,
    id: String,
    sent_at: u64,
    state: String,
}

impl<'a> JsonHistory<'a> {
    pub(crate) fn new(entry: &'a HistoryEntry, me: &'a str, them: &'a str) -> Self {
        let outgoing = entry.direction == Direction::Outgoing;
        Self {
            direction: if outgoing { "out" } else { "in" },
            from: if outgoing { me } else { them },
            to: if outgoing { them } else { me },
            text: &entry.text,
            id: hex(&entry.message_id),
            sent_at: entry.sent_at.unwrap_or(entry.created_at),
            state: format!("{:?}", entry.state).to_lowercase(),
        }
    }
}

/// A user as one JSON object.
#[derive(Serialize)]
pub(crate) struct JsonUser {
    name: String,
    fingerprint: Option<String>,
    online: bool,
}

impl From<&UserInfo> for JsonUser {
    fn from(u: &UserInfo) -> Self {
        Self {
            name: u.username.clone(),
            fingerprint: fingerprint_of(&u.identity),
            online: u.online,
        }
    }
}

fn fingerprint_of(identity: &[u8]) -> Option<String> {
    PublicIdentity::from_bytes(identity)
        .ok()
        .map(|i| i.fingerprint())
}

/// `bob  SHA256:...  online`.
pub(crate) fn user_line(u: &UserInfo) -> String {
    let fp = fingerprint_of(&u.identity).unwrap_or_else(|| "(bad key)".to_owned());
    let state = if u.online { "online" } else { "offline" };
    format!("{:<16} {fp}  {state}", u.username)
}

/// `[2026-11-23 10:04] bob: hello`.
pub(crate) fn message_line(m: &Message) -> String {
    format!(
        "[{}] {}: {}",
        utc(m.sent_at),
        m.from,
        one_line_text(&m.text)
    )
}

/// `[2026-11-23 10:04] alice -> bob: hello (sent)`.
pub(crate) fn history_line(entry: &HistoryEntry, me: &str, them: &str) -> String {
    let (from, to) = if entry.direction == Direction::Outgoing {
        (me, them)
    } else {
        (them, me)
    };
    let state = format!("{:?}", entry.state).to_lowercase();
    format!(
        "[{}] {from} -> {to}: {} ({state})",
        utc(entry.sent_at.unwrap_or(entry.created_at)),
        one_line_text(&entry.text)
    )
}

/// A message's text on one terminal line: line breaks shown as `⏎`,
/// other control characters dropped, so a message cannot forge lines of
/// output.
pub(crate) fn one_line_text(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            '\n' => Some('⏎'),
            c if c.is_control() => None,
            c => Some(c),
        })
        .collect()
}

/// Prints a warning on standard error.
pub(crate) fn warning(w: &Warning) {
    let _ = writeln!(io::stderr(), "warning: {}", one_line(&w.to_string()));
}

/// An event as one line for people (`chat`, and `pull`'s side notes).
pub(crate) fn event_line(event: &Event) -> String {
    match event {
        Event::Message(m) => message_line(m),
        Event::Presence { user, online: true } => format!("* {user} is online"),
        Event::Presence {
            user,
            online: false,
        } => format!("* {user} is offline"),
        Event::FriendRequest { from } => {
            format!("* {from} asks to be friends (`friend accept {from}`)")
        }
        Event::FriendAnswer {
            from,
            accepted: true,
        } => format!("* {from} accepted your friend request"),
        Event::FriendAnswer { from, .. } => format!("* {from} declined your friend request"),
        Event::FriendRemoved { from } => format!("* {from} removed you as a friend"),
        Event::Announcement { text } => {
            format!("* announcement from the server: {}", one_line_text(text))
        }
        Event::Warning(w) => format!("warning: {}", one_line(&w.to_string())),
        Event::Disconnected { reason } => format!("* disconnected: {reason}"),
        _ => "* (an event this version cannot show)".to_owned(),
    }
}

/// Prints a non-message event on standard error.
pub(crate) fn event_to_stderr(event: &Event) {
    let _ = writeln!(io::stderr(), "{}", event_line(event));
}

/// The 12 groups of 5 digits in 3 rows of 4, as people read them aloud.
pub(crate) fn number_rows(grouped: &str) -> Vec<String> {
    let groups: Vec<&str> = grouped.split_whitespace().collect();
    groups.chunks(4).map(|row| row.join(" ")).collect()
}

/// The 60 digits as a QR code in Unicode half blocks, for a phone to scan.
pub(crate) fn qr(digits: &str) -> Option<String> {
    let code = qrcode::QrCode::new(digits.as_bytes()).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build(),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `YYYY-MM-DD HH:MM` in UTC for seconds since the Unix epoch, by the
/// proleptic Gregorian calendar (days-to-civil conversion).
pub(crate) fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (h, m) = (rem / 3600, rem % 3600 / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        // 2000-02-29 12:34 UTC.
        assert_eq!(utc(951_827_640), "2000-02-29 12:34");
        // 2026-11-23 00:00 UTC.
        assert_eq!(utc(1_795_392_000), "2026-11-23 00:00");
    }

    #[test]
    fn text_cannot_forge_lines() {
        assert_eq!(one_line_text("a\nb\r\x1b[2Jc"), "a⏎b[2Jc");
    }

    #[test]
    fn number_rows_of_four_groups() {
        let grouped = (0..12)
            .map(|i| format!("{i:05}"))
            .collect::<Vec<_>>()
            .join(" ");
        let rows = number_rows(&grouped);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0], "00000 00001 00002 00003");
    }
}

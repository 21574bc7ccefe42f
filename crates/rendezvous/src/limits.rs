//! Network limits: how many connections, streams, bytes in flight, requests
//! and pending pushes one peer may cost the server.
//!
//! Every default is a named const with the reason for its number. The
//! [`Limits`] struct carries them into [`crate::server::ServerConfig`];
//! tests shrink them (a two-connection cap, a 200 ms timeout) to reach the
//! edges quickly.

use std::time::Duration;

use messenger_proto::{LEN_PREFIX, MAX_FRAME_LEN};

/// Connections open at once from one IP address: 16.
///
/// A person runs one client per device and the protocol needs one
/// connection per client; 16 leaves room for a household or a small office
/// behind one NAT address while stopping one host from holding thousands of
/// connections (each costs about 30 KB and a task; T-35).
pub const MAX_CONNECTIONS_PER_IP: usize = 16;

/// Longest a QUIC/TLS handshake may take: 10 s.
///
/// A handshake is two or three round trips; 10 s covers a slow mobile link
/// with retransmissions, and bounds how long a half-open connection holds a
/// per-IP slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection with no packets in either direction for this long is closed:
/// 30 s.
///
/// Together with [`KEEP_ALIVE`] this is how a dropped client (pulled cable,
/// killed process) is seen offline: within 30 s, while three missed
/// keep-alives in a row are needed to reach it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval of QUIC keep-alive pings from the server: 10 s.
///
/// A third of [`IDLE_TIMEOUT`], so a live but quiet client is never timed
/// out by a single lost ping; also keeps NAT bindings (often 30 s for UDP)
/// open. At 10,000 idle connections a 5 s interval cost 11–15 % of a core
/// (performance.md §4.9); 10 s halves that.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Time a client has, after the handshake, to open its control stream and
/// send on it: 5 s.
///
/// An honest client opens it at once; a peer that handshakes and stays silent
/// is holding a slot for nothing (slowloris, T-37).
pub const CONTROL_STREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a client has, after the handshake, to log in: 10 s.
///
/// Without it a peer that sends its preface and stops holds one of its
/// address's [`MAX_CONNECTIONS_PER_IP`] slots for ever (keep-alives keep
/// it from going idle), and a client killed after its handshake holds one
/// until the [`IDLE_TIMEOUT`]; 16 of them lock the honest clients at that
/// address out. An honest
/// client sends its preface, reads the hello and logs in at once (a
/// `Register` first is one more round trip and one commit): a few round
/// trips, far below 10 s even on a slow mobile link with retransmissions.
/// It covers [`CONTROL_STREAM_TIMEOUT`] with room to spare, and is a third
/// of the idle timeout, so a half-open connection frees its slot three
/// times sooner than before.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a frame may take to arrive once its first byte has: 30 s (the
/// [`IDLE_TIMEOUT`]).
///
/// QUIC keep-alives keep a connection that drips one byte a second from
/// ever going idle, so without this a peer could hold a connection slot and
/// a partly filled frame buffer indefinitely (slowloris, T-37). A maximum
/// frame (256 KiB) in 30 s needs about 70 kbit/s, below any link the
/// protocol is usable on; an idle client between frames is not affected.
pub const FRAME_TIMEOUT: Duration = IDLE_TIMEOUT;

/// Bidirectional streams a client may have open at once: 4.
///
/// The protocol uses one control stream; a few more allow for a later
/// feature without a new limit, and small counts keep quinn's per-connection
/// maps small (4 bidi / 4 uni saved ~8 KB per idle connection,
/// performance.md §4.9). Streams beyond the control stream are refused
/// (T-36).
pub const MAX_BIDI_STREAMS: u32 = 4;

/// Unidirectional streams a client may have open at once: 4.
///
/// The protocol uses none; see [`MAX_BIDI_STREAMS`].
pub const MAX_UNI_STREAMS: u32 = 4;

/// Receive window of one stream: one maximum frame and its prefix
/// (256 KiB + 4 bytes).
///
/// A whole maximum frame can be in flight on the control stream, and no
/// more: the server reads a frame's bytes as they come, so the window
/// reopens while the client sends. Larger windows only queue data the server
/// has not asked for (performance.md §4.9: default windows queued up to
/// seconds of data).
pub const STREAM_RECEIVE_WINDOW: u32 = (MAX_FRAME_LEN + LEN_PREFIX) as u32;

/// Receive window of a whole connection: 1 MiB.
///
/// Four times the stream window, so the control stream is never starved by
/// the connection limit, while one client can make the server buffer at
/// most 1 MiB however many streams it opens.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes the server keeps unacknowledged towards one client: 1 MiB.
///
/// Enough for four maximum frames; beyond it writes wait, which is the
/// backpressure that fills the push queue of a client that does not read.
pub const SEND_WINDOW: u64 = 1024 * 1024;

/// Ack-eliciting packets a client may receive before it must send an ACK,
/// asked of every client with QUIC's ACK frequency extension
/// (draft-ietf-quic-ack-frequency; quinn's `AckFrequencyConfig`): 4.
///
/// QUIC's default is 1 (an ACK for every second packet). The server's
/// traffic is many small frames on many connections (pushes, replies), so
/// ACK-only packets from clients were a large share of what it receives:
/// asking for an ACK every fifth packet (or after the peer's
/// `max_ack_delay`, 25 ms by default) raised relay throughput by ~18 %
/// (docs/benchmarks.md §3). Loss is still detected by packet threshold and
/// within the ACK delay; out-of-order packets still elicit an immediate
/// ACK (reordering threshold 2, quinn's default).
pub const ACK_ELICITING_THRESHOLD: u32 = 4;

/// Handshakes the endpoint keeps pending at once: 1,024.
///
/// quinn's default (65,536) lets a flood of Initial packets hold memory for
/// that many half-open connections; 1,024 pending handshakes is far above
/// the arrival rate of honest clients on one server.
pub const MAX_INCOMING: usize = 1024;

/// Pushes queued for one connection before it is disconnected: 256.
///
/// A client that reads lets the queue drain at network speed; one that does
/// not read would make the server hold every push for it. At 256 (a burst of
/// group messages, presence changes after a restart) the client is
/// disconnected instead; its envelopes stay in its mailbox for the next
/// login, so nothing is lost.
pub const PUSH_QUEUE: usize = 256;

/// Requests per second one connection may make on average: 200.
///
/// An interactive client sends a few per second; a bulk sync (pulling a
/// mailbox 256 envelopes at a time, acking, uploading 200 prekeys) stays far
/// below 200. Beyond it requests are answered `rate_limited` without being
/// handled, so one connection cannot monopolise the store.
pub const REQUESTS_PER_SECOND: u32 = 200;

/// Requests one connection may make in a burst above the average: 400.
///
/// Two seconds' worth, so a client catching up after a reconnect is not
/// throttled.
pub const REQUEST_BURST: u32 = 400;

/// Pipelined requests ([`crate::handler::Handler::pipelines`], i.e. `Send`s) one connection
/// may have pending at once: 16.
///
/// A `Send` is answered only after the group commit that stores it, which
/// waits for an fsync; letting a connection's sends wait together lets them
/// share a commit instead of taking one commit each (docs/benchmarks.md §1).
/// Each pending request holds its envelope (up to 66 KiB) until its commit,
/// so 16 bounds what one connection makes the server hold to about 1 MiB,
/// like its receive window; a client typically keeps a few in flight (the
/// benchmark 8). At the bound a further pipelined request waits until the
/// oldest reply is out (backpressure), and the connection is read only
/// [`MAX_READ_AHEAD`] frames further.
pub const MAX_PIPELINED: usize = 16;

/// Frames held per connection while its pipeline is full: 64, the one
/// waiting for room included.
///
/// A live `Send`'s reply waits for the recipient's `Ack`, which may be
/// queued behind the recipient's own full pipeline; two clients sending to
/// each other would then wait for each other until the live grace. So
/// while [`MAX_PIPELINED`] replies are pending the server reads on, takes
/// each frame's rate-limit token, applies the `Ack`s it finds at once
/// ([`crate::handler::Handler::begins_ahead`]) and keeps every other frame
/// for its turn; at this bound (or [`MAX_READ_AHEAD_BYTES`]) it stops
/// reading until the pipeline has room. A client that keeps 16 sends in
/// flight has at most 16 more sends and the acks of the pushes it was sent
/// behind a waiting one; 64 covers that with room, and costs a few
/// kilobytes of held requests besides their bodies.
pub const MAX_READ_AHEAD: usize = 64;

/// Bytes of frames held per connection while its pipeline is full
/// ([`MAX_READ_AHEAD`]): reading stops once they reach 256 KiB (one
/// maximum frame, the stream's receive window), so at most that plus one
/// frame (< 512 KiB) are held, beside the pipeline's own (about 1 MiB).
/// Small frames such as acks reach the frame bound first.
pub const MAX_READ_AHEAD_BYTES: usize = MAX_FRAME_LEN;

/// Time [`crate::server::ServerHandle::shutdown`] lets connections finish the
/// request they are handling: 5 s.
///
/// Handlers commit to disk; a commit takes milliseconds, so 5 s is ample,
/// and the server still stops promptly when a handler hangs.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The limits a server enforces, with the consts above as defaults.
///
/// Fields are public so a test or an operator setting can change one;
/// [`Limits::default`] is what the server uses otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// [`MAX_CONNECTIONS_PER_IP`].
    pub max_connections_per_ip: usize,
    /// [`HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// [`KEEP_ALIVE`].
    pub keep_alive: Duration,
    /// [`CONTROL_STREAM_TIMEOUT`].
    pub control_stream_timeout: Duration,
    /// [`LOGIN_TIMEOUT`].
    pub login_timeout: Duration,
    /// [`FRAME_TIMEOUT`].
    pub frame_timeout: Duration,
    /// [`MAX_BIDI_STREAMS`].
    pub max_bidi_streams: u32,
    /// [`MAX_UNI_STREAMS`].
    pub max_uni_streams: u32,
    /// [`STREAM_RECEIVE_WINDOW`].
    pub stream_receive_window: u32,
    /// [`CONNECTION_RECEIVE_WINDOW`].
    pub connection_receive_window: u32,
    /// [`SEND_WINDOW`].
    pub send_window: u64,
    /// [`MAX_INCOMING`].
    pub max_incoming: usize,
    /// [`PUSH_QUEUE`].
    pub push_queue: usize,
    /// [`REQUESTS_PER_SECOND`].
    pub requests_per_second: u32,
    /// [`REQUEST_BURST`].
    pub request_burst: u32,
    /// [`SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections_per_ip: MAX_CONNECTIONS_PER_IP,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            keep_alive: KEEP_ALIVE,
            control_stream_timeout: CONTROL_STREAM_TIMEOUT,
            login_timeout: LOGIN_TIMEOUT,
            frame_timeout: FRAME_TIMEOUT,
            max_bidi_streams: MAX_BIDI_STREAMS,
            max_uni_streams: MAX_UNI_STREAMS,
            stream_receive_window: STREAM_RECEIVE_WINDOW,
            connection_receive_window: CONNECTION_RECEIVE_WINDOW,
            send_window: SEND_WINDOW,
            max_incoming: MAX_INCOMING,
            push_queue: PUSH_QUEUE,
            requests_per_second: REQUESTS_PER_SECOND,
            request_burst: REQUEST_BURST,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_a_maximum_frame() {
        let limits = Limits::default();
        assert!(limits.stream_receive_window as usize >= MAX_FRAME_LEN + LEN_PREFIX);
        assert!(limits.connection_receive_window >= limits.stream_receive_window);
        assert!(limits.send_window >= u64::from(limits.stream_receive_window));
    }

    const _: () = assert!(REQUEST_BURST >= REQUESTS_PER_SECOND);

    #[test]
    fn keep_alive_fits_the_idle_timeout_three_times() {
        let limits = Limits::default();
        assert!(limits.keep_alive * 3 <= limits.idle_timeout);
        assert!(limits.control_stream_timeout < limits.idle_timeout);
        // A connection that never logs in frees its slot before it could
        // go idle, and an honest client gets at least the time it has to
        // open its control stream.
        assert!(limits.login_timeout < limits.idle_timeout);
        assert!(limits.control_stream_timeout < limits.login_timeout);
    }
}

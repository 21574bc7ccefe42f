//! Live relay between online users, next to a bare quinn relay probe and
//! Redis pub/sub measured in the same run (`docs/benchmarks.md` §3).
//!
//! `cargo bench -p messenger-rendezvous --bench relay -- [ours] [bare] [redis]`
//! (no name: all three, interleaved run by run).
//!
//! 1,000 clients in 500 pairs; each sender keeps at most [`WINDOW`]
//! messages of [`BODY`] bytes in flight towards its partner (a message
//! leaves the window when the partner has read it), so every system sees
//! the same offered load. Latency is sender write → recipient read, from a
//! timestamp in the first 8 bytes of the body (one clock: both ends are
//! this process).
//!
//! - **ours**: the real server (`app::start`) in a child process; every
//!   client registers and logs in (channel-binding signature); senders
//!   send `Send` envelopes, recipients get them as `Push::Envelope` and ack
//!   them (one `Ack` in flight per recipient, covering every envelope read
//!   since the previous one), as a client does after delivery. The
//!   recipients are online and acknowledge within the grace, so this is the
//!   live-delivery path (docs/protocol.md §4): a sender is answered when its
//!   partner acknowledged, and nothing is written to disk; the stored path
//!   is the `server` bench's `store` scenario.
//! - **bare**: a quinn server with the same `net::tls_config` and
//!   `net::quinn_config` (so the same transport settings), one bidi stream
//!   per connection, that forwards each length-prefixed frame from a
//!   sender's stream to its partner's, one write per frame.
//! - **redis**: `redis-server` (no persistence) with 500 subscribers and
//!   500 publishers on their own TCP connections, `PUBLISH` of the same
//!   bodies, spoken in RESP by a small client here.
//!
//! Diagnostics (environment): `BENCH_RUNS=<n>` runs per system instead of
//! 3; `BENCH_DEBUG=1` lists pairs with messages still in flight after the
//! drain; `BENCH_NO_ACK=1` makes our recipients never ack.
//!
//! The server (or redis) runs pinned to CPU 1, this load generator (one
//! tokio current-thread runtime) to CPU 0; server CPU seconds come from
//! `/proc/<pid>/stat`. For the QUIC systems each run also prints the
//! server's datagrams and STREAM and ACK frames per delivered message, in
//! and out, summed from its clients' connection statistics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    unreachable_pub,
    dead_code
)]

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

#[global_allocator]
/// The allocator the `rendezvous` binary ships with (src/bin/rendezvous.rs).
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use messenger_proto::msg::{
    ClientFrame, DEFAULT_DEVICE, MAX_ACKS, NOTIFY_ID, OutgoingEnvelope, Push, Reply, Request,
    ServerFrame,
};
use messenger_proto::{FrameDecoder, decode, encode};
use messenger_rendezvous::limits::Limits;
use messenger_rendezvous::rate::Rate;
use messenger_rendezvous::server::ServerConfig;
use messenger_rendezvous::service::{LIVE_SEQ_BIT, PREKEY_LOW_WATER, ServiceConfig};
use messenger_rendezvous::store::StoreOptions;
use messenger_rendezvous::tls::ServerIdentity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;

use common::{
    KillOnDrop, Person, ServerChild, bounded_local, client_endpoint_buffered, cpu_seconds,
    free_port, load_average, login, median, percentile, person_with, pin_self, pinned_command,
    print_machine, register, udp_rcvbuf_errors, udp_socket_drops, wait_for_port,
};
use support::TestClient;

/// Sender/recipient pairs (twice as many clients).
const PAIRS: usize = 500;
/// Messages in flight per sender.
const WINDOW: usize = 8;
/// Body (ciphertext) size.
const BODY: usize = 1024;
const WARM_UP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// Longest wait, after the measured window, for messages in flight.
const DRAIN: Duration = Duration::from_secs(5);
/// Runs per system.
const RUNS: usize = 3;
/// Handshakes/registrations in flight while connecting.
const CONNECT_CONCURRENCY: usize = 64;
/// Hard limit on a server child; it also dies with our stdin.
const CHILD_LIFETIME: Duration = Duration::from_secs(600);
const READ_CHUNK: usize = 64 * 1024;
/// Send and receive buffer asked for the load generator's UDP socket: 4 MiB
/// (performance.md §4.9); the servers keep the system default.
const CLIENT_SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Request ids of the traffic phase start here (setup used small ones).
const FIRST_ID: u32 = 1 << 20;

fn main() {
    if std::env::var("BENCH_ROLE").as_deref() == Ok("server") {
        server_main();
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs bench
    // targets without it, and this bench must not run there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("relay bench: skipped (run it with `cargo bench --bench relay`)");
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = !args
        .iter()
        .any(|a| ["ours", "bare", "redis"].contains(&a.as_str()));
    let want = |s: &str| all || args.iter().any(|a| a == s);
    let systems: Vec<System> = [System::Ours, System::Bare, System::Redis]
        .into_iter()
        .filter(|s| want(s.key()))
        .collect();
    pin_self();
    print_machine();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, relay_scenario(systems));
}

// ---------------------------------------------------------- server child

/// Limits raised for 1,000 connections from one IP and unthrottled
/// requests; everything else (windows, stream counts, push queue) is
/// production's.
fn bench_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_connections_per_ip = 4 * 2 * PAIRS;
    limits.requests_per_second = 10_000_000;
    limits.request_burst = 10_000_000;
    limits
}

fn server_main() {
    let mode = std::env::var("BENCH_MODE").unwrap();
    let data = PathBuf::from(std::env::var("BENCH_DATA").unwrap());
    common::die_with_parent(CHILD_LIFETIME);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match mode.as_str() {
            "ours" => {
                let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), data);
                config.limits = bench_limits();
                let unlimited = Rate::per(10_000_000, Duration::from_secs(1), 10_000_000);
                let service = ServiceConfig {
                    send_rate: unlimited,
                    request_rate: unlimited,
                    ..ServiceConfig::default()
                };
                let store = StoreOptions {
                    mailbox_max_messages: u32::MAX,
                    mailbox_max_bytes: u64::MAX,
                    ..StoreOptions::default()
                };
                let running = messenger_rendezvous::app::start(config, service, store).unwrap();
                println!("listening on {}", running.handle.local_addr());
                println!("certificate {}", running.handle.fingerprint());
                std::future::pending::<()>().await;
            }
            "bare" => bare_relay(&data).await,
            other => panic!("unknown mode {other}"),
        }
    });
}

/// Role byte a bare-probe client writes first, then its pair as a u32.
const ROLE_SENDER: u8 = 0;
const ROLE_RECIPIENT: u8 = 1;

type Rendezvous = (
    Option<oneshot::Sender<quinn::SendStream>>,
    Option<oneshot::Receiver<quinn::SendStream>>,
);

/// The bare relay: same TLS and transport configuration as ours; each
/// connection opens one bidi stream and names its pair and role; a
/// sender's frames are forwarded to its partner's stream as they arrive.
async fn bare_relay(data: &Path) {
    let limits = bench_limits();
    let identity = ServerIdentity::load_or_create(data).unwrap();
    let tls = messenger_rendezvous::net::tls_config(
        vec![identity.cert_der().clone()],
        identity.key_der().to_rustls(),
    )
    .unwrap();
    let config = messenger_rendezvous::net::quinn_config(tls, &limits).unwrap();
    // The server's own socket set-up (same buffer sizes as ours).
    let socket = messenger_rendezvous::server::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    println!("listening on {}", endpoint.local_addr().unwrap());
    println!("certificate {}", identity.fingerprint());
    let pairs: Arc<Mutex<HashMap<u32, Rendezvous>>> = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let pairs = Arc::clone(&pairs);
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Ok((send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            let mut head = [0u8; 5];
            if recv.read_exact(&mut head).await.is_err() {
                return;
            }
            let pair = u32::from_be_bytes(head[1..5].try_into().unwrap());
            let (tx, rx) = {
                let mut map = pairs.lock().unwrap();
                let slot = map.entry(pair).or_insert_with(|| {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                });
                if head[0] == ROLE_RECIPIENT {
                    (slot.0.take(), None)
                } else {
                    (None, slot.1.take())
                }
            };
            if let Some(tx) = tx {
                let _ = tx.send(send);
                conn.closed().await;
            } else if let Some(rx) = rx {
                let Ok(out) = rx.await else { return };
                forward(recv, out).await;
                drop(send);
            }
        });
    }
}

/// Copies whole length-prefixed frames from `recv` to `out`, one write
/// per frame.
async fn forward(mut recv: quinn::RecvStream, mut out: quinn::SendStream) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            _ => return,
        }
        let mut start = 0;
        while buf.len() - start >= 4 {
            let len = u32::from_be_bytes(buf[start..start + 4].try_into().unwrap()) as usize;
            if buf.len() - start < 4 + len {
                break;
            }
            if out.write_all(&buf[start..start + 4 + len]).await.is_err() {
                return;
            }
            start += 4 + len;
        }
        buf.drain(..start);
    }
}

// ------------------------------------------------------------ one run

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Ours,
    Bare,
    Redis,
}

impl System {
    fn key(self) -> &'static str {
        match self {
            System::Ours => "ours",
            System::Bare => "bare",
            System::Redis => "redis",
        }
    }

    fn label(self) -> &'static str {
        match self {
            System::Ours => "ours (Send → live Push::Envelope → Ack → Accepted)",
            System::Bare => "bare quinn relay probe",
            System::Redis => "redis pub/sub",
        }
    }
}

/// The clock and tallies of one run (single-thread: `Cell`s).
struct Run {
    epoch: Instant,
    warm_end: Instant,
    end: Instant,
    /// Messages read by a recipient inside the measured window.
    delivered: Cell<u64>,
    /// Their latency in µs.
    latencies: RefCell<Vec<u32>>,
    /// Refused sends, failed acks, broken streams.
    errors: Cell<u64>,
    /// `Accepted` replies with a mailbox seq: sends that fell back from
    /// live delivery to the stored path (ours only).
    stored: Cell<u64>,
    /// `Ack` requests our recipients sent, and the delivery ids they
    /// carried (ours only): how well acks are batched.
    acks: Cell<u64>,
    acked: Cell<u64>,
}

impl Run {
    fn starting_now() -> Rc<Self> {
        let epoch = Instant::now();
        Rc::new(Self {
            epoch,
            warm_end: epoch + WARM_UP,
            end: epoch + WARM_UP + MEASURE,
            delivered: Cell::new(0),
            latencies: RefCell::new(Vec::with_capacity(1 << 20)),
            errors: Cell::new(0),
            stored: Cell::new(0),
            acks: Cell::new(0),
            acked: Cell::new(0),
        })
    }

    fn error(&self) {
        self.errors.set(self.errors.get() + 1);
    }

    /// Waits for room in `pair`'s window; the next body, stamped with the
    /// time, or None once the measured window is over.
    async fn next_body(&self, pair: &Pair) -> Option<Vec<u8>> {
        pair.window.acquire().await.ok()?.forget();
        let now = Instant::now();
        if now >= self.end {
            return None;
        }
        let mut body = vec![0xA5u8; BODY];
        let us = (now - self.epoch).as_micros() as u64;
        body[..8].copy_from_slice(&us.to_be_bytes());
        body[8..16].copy_from_slice(&pair.sent.get().to_be_bytes());
        pair.sent.set(pair.sent.get() + 1);
        Some(body)
    }

    /// A recipient read `body`: count it, record its latency, reopen the
    /// sender's window.
    fn delivered(&self, pair: &Pair, body: &[u8]) {
        let now = Instant::now();
        if body.len() >= 8 {
            let sent = u64::from_be_bytes(body[..8].try_into().unwrap());
            let now_us = (now - self.epoch).as_micros() as u64;
            if now >= self.warm_end && now < self.end {
                self.delivered.set(self.delivered.get() + 1);
                let lat = u32::try_from(now_us.saturating_sub(sent)).unwrap_or(u32::MAX);
                self.latencies.borrow_mut().push(lat);
            }
        } else {
            self.error();
        }
        pair.received.set(pair.received.get() + 1);
        pair.window.add_permits(1);
    }
}

/// One sender → recipient pair's window and counts.
struct Pair {
    window: Semaphore,
    sent: Cell<u64>,
    received: Cell<u64>,
}

impl Pair {
    fn new() -> Rc<Self> {
        Rc::new(Self {
            window: Semaphore::new(WINDOW),
            sent: Cell::new(0),
            received: Cell::new(0),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_s: f64,
    per_cpu_s: f64,
    /// Sent but not read by the end of the drain.
    lost: u64,
    errors: u64,
    /// See [`Run::stored`].
    stored: u64,
    /// Envelopes per `Ack` ([`Run::acks`]).
    per_ack: f64,
    connect_s: f64,
    /// UDP datagrams the server's and the load generator's sockets dropped
    /// (receive buffer full) during the traffic; None for TCP.
    drops: Option<(u64, u64)>,
    /// The server's QUIC traffic in the measured window per delivered
    /// message, as its clients counted it; None for TCP.
    traffic: Option<Traffic>,
}

/// QUIC traffic of the server, summed over its clients' connection
/// statistics (what a client received, the server sent).
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    datagrams_out: f64,
    datagrams_in: f64,
    stream_frames_out: f64,
    stream_frames_in: f64,
    ack_frames_out: f64,
    ack_frames_in: f64,
}

impl Traffic {
    fn now(conns: &[quinn::Connection]) -> Self {
        let mut t = Self::default();
        for c in conns {
            let s = c.stats();
            t.datagrams_out += s.udp_rx.datagrams as f64;
            t.datagrams_in += s.udp_tx.datagrams as f64;
            t.stream_frames_out += s.frame_rx.stream as f64;
            t.stream_frames_in += s.frame_tx.stream as f64;
            t.ack_frames_out += s.frame_rx.acks as f64;
            t.ack_frames_in += s.frame_tx.acks as f64;
        }
        t
    }

    /// `(self - earlier) / n`.
    fn per(self, earlier: Self, n: f64) -> Self {
        Self {
            datagrams_out: (self.datagrams_out - earlier.datagrams_out) / n,
            datagrams_in: (self.datagrams_in - earlier.datagrams_in) / n,
            stream_frames_out: (self.stream_frames_out - earlier.stream_frames_out) / n,
            stream_frames_in: (self.stream_frames_in - earlier.stream_frames_in) / n,
            ack_frames_out: (self.ack_frames_out - earlier.ack_frames_out) / n,
            ack_frames_in: (self.ack_frames_in - earlier.ack_frames_in) / n,
        }
    }
}

/// Lets the traffic tasks run through warm-up and the measured window,
/// samples the server's CPU over the measured window, then waits (bounded)
/// for messages in flight and stops the tasks.
async fn measure(
    run: Rc<Run>,
    pairs: &[Rc<Pair>],
    server_pid: u32,
    mut tasks: JoinSet<()>,
    connect_s: f64,
    udp_ports: Option<(u16, u16)>,
    conns: &[quinn::Connection],
) -> Outcome {
    let drops = || {
        udp_ports.map(|(s, c)| {
            (
                udp_socket_drops(s).unwrap_or(0),
                udp_socket_drops(c).unwrap_or(0),
            )
        })
    };
    let drops0 = drops();
    tokio::time::sleep_until(run.warm_end.into()).await;
    let cpu0 = cpu_seconds(server_pid);
    let (traffic0, delivered0) = (Traffic::now(conns), run.delivered.get());
    tokio::time::sleep_until(run.end.into()).await;
    let cpu_s = cpu_seconds(server_pid) - cpu0;
    let traffic = (!conns.is_empty()).then(|| {
        let n = run.delivered.get().saturating_sub(delivered0).max(1) as f64;
        Traffic::now(conns).per(traffic0, n)
    });
    let deadline = Instant::now() + DRAIN;
    let in_flight = || -> u64 {
        pairs
            .iter()
            .map(|p| p.sent.get().saturating_sub(p.received.get()))
            .sum()
    };
    while in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = in_flight();
    let drops = drops().zip(drops0).map(|(a, b)| (a.0 - b.0, a.1 - b.1));
    if std::env::var("BENCH_DEBUG").is_ok() {
        for (i, p) in pairs.iter().enumerate() {
            if p.sent.get() != p.received.get() {
                println!(
                    "      pair {i}: sent {} received {}",
                    p.sent.get(),
                    p.received.get()
                );
            }
        }
    }
    // Wake senders parked on a full window so they see the end.
    for p in pairs {
        p.window.close();
    }
    tasks.shutdown().await;
    let mut lat = run.latencies.take();
    lat.sort_unstable();
    let delivered = run.delivered.get();
    Outcome {
        rate: delivered as f64 / MEASURE.as_secs_f64(),
        p50_ms: percentile(&lat, 0.5) / 1000.0,
        p99_ms: percentile(&lat, 0.99) / 1000.0,
        cpu_s,
        per_cpu_s: delivered as f64 / cpu_s,
        lost,
        errors: run.errors.get(),
        stored: run.stored.get(),
        per_ack: run.acked.get() as f64 / run.acks.get().max(1) as f64,
        connect_s,
        drops,
        traffic,
    }
}

// ------------------------------------------------------------------ ours

fn sender_name(i: usize) -> String {
    format!("relay-s{i}")
}

fn recipient_name(i: usize) -> String {
    format!("relay-r{i}")
}

/// Reads the next server frame; None when the stream ends or breaks.
async fn read_frame(recv: &mut quinn::RecvStream, dec: &mut FrameDecoder) -> Option<ServerFrame> {
    loop {
        if let Some(body) = dec.next_frame() {
            return decode(&body).ok();
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => dec.push(&chunk.bytes).ok()?,
            _ => return None,
        }
    }
}

async fn ours_run(people: Rc<Vec<Person>>) -> Outcome {
    let server = ServerChild::spawn_env("ours", &[]);
    let (endpoint, _) = client_endpoint_buffered(&server.fingerprint, CLIENT_SOCKET_BUFFER);
    let client_port = endpoint.local_addr().unwrap().port();
    let addr = server.addr;
    let t = Instant::now();
    let clients: Vec<TestClient> = bounded_local(2 * PAIRS, CONNECT_CONCURRENCY, {
        let people = Rc::clone(&people);
        move |i| {
            let people = Rc::clone(&people);
            let e = endpoint.clone();
            async move {
                let p = &people[i];
                let mut c = register(&e, addr, p).await;
                login(&mut c, p).await;
                // Enough one-time prekeys were registered that login pushes
                // nothing: the client's frame decoder is empty here, so its
                // stream can be read by a new decoder below.
                assert!(c.pushes.is_empty(), "{:?}", c.pushes);
                c
            }
        }
    })
    .await;
    let connect_s = t.elapsed().as_secs_f64();
    let mut conns = Vec::new();
    let mut halves = Vec::new();
    for c in clients {
        conns.push(c.conn.clone());
        halves.push((c.send, c.recv));
    }
    let recipients = halves.split_off(PAIRS);
    let pairs: Vec<Rc<Pair>> = (0..PAIRS).map(|_| Pair::new()).collect();
    let run = Run::starting_now();
    let mut tasks = JoinSet::new();
    for (i, ((mut send, mut recv), (mut rsend, mut rrecv))) in
        halves.into_iter().zip(recipients).enumerate()
    {
        let to = recipient_name(i);
        let (r, pair) = (Rc::clone(&run), Rc::clone(&pairs[i]));
        // Sender: envelopes while the window has room.
        tasks.spawn_local(async move {
            let mut id = FIRST_ID;
            while let Some(body) = r.next_body(&pair).await {
                id += 1;
                let mid = common::client_message_id();
                let frame = ClientFrame {
                    id,
                    request: Request::Send(OutgoingEnvelope {
                        to: to.clone(),
                        to_device: DEFAULT_DEVICE,
                        id: mid,
                        body,
                    }),
                };
                if send.write_all(&encode(&frame).unwrap()).await.is_err() {
                    r.error();
                    return;
                }
            }
            // Keep the stream open (dropping it would end the session).
            std::future::pending::<()>().await;
        });
        // Sender's replies: every one must be `Accepted`.
        let r = Rc::clone(&run);
        tasks.spawn_local(async move {
            let mut dec = FrameDecoder::new();
            while let Some(frame) = read_frame(&mut recv, &mut dec).await {
                match frame {
                    ServerFrame::Reply {
                        result: Ok(Reply::Accepted { seq, .. }),
                        ..
                    } if seq & LIVE_SEQ_BIT == 0 => r.stored.set(r.stored.get() + 1),
                    ServerFrame::Reply {
                        result: Ok(Reply::Accepted { .. }),
                        ..
                    } => {}
                    ServerFrame::Reply { .. } => r.error(),
                    _ => {}
                }
            }
        });
        // Recipient: pushes in; after each read of the stream, one `Ack`
        // notification (no reply) for every envelope that read completed.
        let (r, pair) = (Rc::clone(&run), Rc::clone(&pairs[i]));
        // Diagnostic only (BENCH_NO_ACK=1): recipients do not ack.
        let no_ack = std::env::var("BENCH_NO_ACK").is_ok();
        tasks.spawn_local(async move {
            let mut dec = FrameDecoder::new();
            let mut pending: Vec<u64> = Vec::new();
            loop {
                match rrecv.read_chunk(READ_CHUNK, true).await {
                    Ok(Some(chunk)) => {
                        if dec.push(&chunk.bytes).is_err() {
                            r.error();
                            return;
                        }
                    }
                    _ => return,
                }
                while let Some(frame) = dec.next_decoded::<ServerFrame>() {
                    match frame {
                        Ok(ServerFrame::Push(Push::Envelope(e))) => {
                            r.delivered(&pair, &e.body);
                            pending.push(e.seq);
                        }
                        Ok(ServerFrame::Push(_)) => {}
                        _ => r.error(),
                    }
                }
                if no_ack {
                    pending.clear();
                }
                for seqs in pending.chunks(MAX_ACKS) {
                    r.acks.set(r.acks.get() + 1);
                    r.acked.set(r.acked.get() + seqs.len() as u64);
                    let frame = ClientFrame {
                        id: NOTIFY_ID,
                        request: Request::Ack {
                            seqs: seqs.to_vec(),
                        },
                    };
                    if rsend.write_all(&encode(&frame).unwrap()).await.is_err() {
                        r.error();
                        return;
                    }
                }
                pending.clear();
            }
        });
    }
    let out = measure(
        run,
        &pairs,
        server.pid,
        tasks,
        connect_s,
        Some((addr.port(), client_port)),
        &conns,
    )
    .await;
    for c in &conns {
        c.close(0u32.into(), b"bye");
    }
    drop(server);
    out
}

// ------------------------------------------------------------------ bare

async fn bare_run() -> Outcome {
    let server = ServerChild::spawn_env("bare", &[]);
    let (endpoint, _) = client_endpoint_buffered(&server.fingerprint, CLIENT_SOCKET_BUFFER);
    let client_port = endpoint.local_addr().unwrap().port();
    let addr = server.addr;
    let t = Instant::now();
    let streams = bounded_local(2 * PAIRS, CONNECT_CONCURRENCY, move |i| {
        let e = endpoint.clone();
        async move {
            let conn = support::connect_raw(&e, addr).await.unwrap();
            let (mut send, recv) = conn.open_bi().await.unwrap();
            let role = if i < PAIRS {
                ROLE_SENDER
            } else {
                ROLE_RECIPIENT
            };
            let mut head = [role, 0, 0, 0, 0];
            head[1..].copy_from_slice(&((i % PAIRS) as u32).to_be_bytes());
            send.write_all(&head).await.unwrap();
            (conn, send, recv)
        }
    })
    .await;
    let connect_s = t.elapsed().as_secs_f64();
    let mut conns = Vec::new();
    let mut halves = Vec::new();
    for (conn, send, recv) in streams {
        conns.push(conn);
        halves.push((send, recv));
    }
    let recipients = halves.split_off(PAIRS);
    let pairs: Vec<Rc<Pair>> = (0..PAIRS).map(|_| Pair::new()).collect();
    let run = Run::starting_now();
    let mut tasks = JoinSet::new();
    for (i, ((mut send, sender_recv), (recipient_send, mut recv))) in
        halves.into_iter().zip(recipients).enumerate()
    {
        let (r, pair) = (Rc::clone(&run), Rc::clone(&pairs[i]));
        tasks.spawn_local(async move {
            let _keep = sender_recv;
            let mut frame = Vec::with_capacity(4 + BODY);
            while let Some(body) = r.next_body(&pair).await {
                frame.clear();
                frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
                frame.extend_from_slice(&body);
                if send.write_all(&frame).await.is_err() {
                    r.error();
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        let (r, pair) = (Rc::clone(&run), Rc::clone(&pairs[i]));
        tasks.spawn_local(async move {
            let _keep = recipient_send;
            let mut dec = FrameDecoder::new();
            loop {
                while let Some(body) = dec.next_frame() {
                    r.delivered(&pair, &body);
                }
                match recv.read_chunk(READ_CHUNK, true).await {
                    Ok(Some(chunk)) => {
                        if dec.push(&chunk.bytes).is_err() {
                            r.error();
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
    }
    let out = measure(
        run,
        &pairs,
        server.pid,
        tasks,
        connect_s,
        Some((addr.port(), client_port)),
        &conns,
    )
    .await;
    for c in &conns {
        c.close(0u32.into(), b"bye");
    }
    drop(server);
    out
}

// ----------------------------------------------------------------- redis

/// A RESP value, as much of it as this bench reads.
#[derive(Debug)]
enum Resp {
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Resp>),
    Other,
}

/// One line from `at` (without CRLF) and the index after it.
fn resp_line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rel = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[at..at + rel], at + rel + 2))
}

fn resp_int(line: &[u8]) -> i64 {
    std::str::from_utf8(line).unwrap().parse().unwrap()
}

/// Parses one value at `at`; None if it is not all in `buf` yet.
fn resp_parse(buf: &[u8], at: usize) -> Option<(Resp, usize)> {
    let kind = *buf.get(at)?;
    let (line, next) = resp_line(buf, at + 1)?;
    match kind {
        b':' => Some((Resp::Int(resp_int(line)), next)),
        b'$' => {
            let n = resp_int(line);
            if n < 0 {
                return Some((Resp::Other, next));
            }
            let end = next + n as usize;
            if buf.len() < end + 2 {
                return None;
            }
            Some((Resp::Bulk(buf[next..end].to_vec()), end + 2))
        }
        b'*' => {
            let n = resp_int(line);
            let mut items = Vec::with_capacity(n.max(0) as usize);
            let mut at = next;
            for _ in 0..n.max(0) {
                let (v, after) = resp_parse(buf, at)?;
                items.push(v);
                at = after;
            }
            Some((Resp::Array(items), at))
        }
        b'-' => panic!("redis error: {}", String::from_utf8_lossy(line)),
        _ => Some((Resp::Other, next)),
    }
}

/// Reads RESP values from `r`, calling `f` on each; returns when the
/// connection ends or `f` returns false.
async fn resp_read(r: &mut tokio::net::tcp::OwnedReadHalf, mut f: impl FnMut(Resp) -> bool) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let mut at = 0;
        while let Some((v, next)) = resp_parse(&buf, at) {
            at = next;
            if !f(v) {
                buf.drain(..at);
                return;
            }
        }
        buf.drain(..at);
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A RESP command of bulk strings.
fn resp_command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn redis_version() -> String {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// None when redis-server is not installed.
async fn redis_run() -> Option<Outcome> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let port_s = port.to_string();
    let mut cmd = pinned_command(Path::new("redis-server"));
    cmd.args(["--bind", "127.0.0.1", "--port", &port_s])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().ok()?;
    if !wait_for_port(&mut child, port) {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    let pid = child.id();
    let _child = KillOnDrop(child);
    let t = Instant::now();
    let streams = bounded_local(2 * PAIRS, CONNECT_CONCURRENCY, move |i| async move {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.set_nodelay(true).unwrap();
        let (mut r, mut w) = s.into_split();
        if i >= PAIRS {
            let channel = format!("ch{}", i - PAIRS);
            w.write_all(&resp_command(&[b"SUBSCRIBE", channel.as_bytes()]))
                .await
                .unwrap();
            // The subscription's confirmation.
            let mut confirmed = false;
            tokio::time::timeout(
                support::WAIT,
                resp_read(&mut r, |_| {
                    confirmed = true;
                    false
                }),
            )
            .await
            .unwrap();
            assert!(confirmed);
        }
        (r, w)
    })
    .await;
    let connect_s = t.elapsed().as_secs_f64();
    let mut halves = streams;
    let recipients = halves.split_off(PAIRS);
    let pairs: Vec<Rc<Pair>> = (0..PAIRS).map(|_| Pair::new()).collect();
    let run = Run::starting_now();
    let mut tasks = JoinSet::new();
    for (i, ((mut pr, mut pw), (mut sr, sw))) in halves.into_iter().zip(recipients).enumerate() {
        let channel = format!("ch{i}");
        let (r, pair) = (Rc::clone(&run), Rc::clone(&pairs[i]));
        tasks.spawn_local(async move {
            while let Some(body) = r.next_body(&pair).await {
                let cmd = resp_command(&[b"PUBLISH", channel.as_bytes(), &body]);
                if pw.write_all(&cmd).await.is_err() {
                    r.error();
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        // Publisher replies: the number of subscribers reached, 1.
        let r = Rc::clone(&run);
        tasks.spawn_local(async move {
            resp_read(&mut pr, |v| {
                if !matches!(v, Resp::Int(1)) {
                    r.error();
                }
                true
            })
            .await;
        });
        let (r, pair) = (Rc::clone(&run), Rc::clone(&pairs[i]));
        tasks.spawn_local(async move {
            let _keep = sw;
            resp_read(&mut sr, |v| {
                match v {
                    Resp::Array(mut items) if items.len() == 3 => {
                        if let Some(Resp::Bulk(body)) = items.pop() {
                            r.delivered(&pair, &body);
                        } else {
                            r.error();
                        }
                    }
                    _ => r.error(),
                }
                true
            })
            .await;
        });
    }
    let out = measure(run, &pairs, pid, tasks, connect_s, None, &[]).await;
    Some(out)
}

// -------------------------------------------------------------- scenario

async fn relay_scenario(systems: Vec<System>) {
    println!();
    println!(
        "== relay: {} clients in {PAIRS} pairs, {WINDOW} messages in flight per sender, {BODY} B \
         bodies, {}s warm-up + {}s measured (+ up to {}s drain), {RUNS} runs per system, \
         interleaved",
        2 * PAIRS,
        WARM_UP.as_secs(),
        MEASURE.as_secs(),
        DRAIN.as_secs()
    );
    println!(
        "   server config for the bench: per-user send/request rate limits and per-connection \
         request rate raised to 10M/s, connections per IP {}, mailbox quotas unlimited; \
         durability, group commit, transport windows and push queue as in production",
        4 * 2 * PAIRS
    );
    println!("   peer: {}", redis_version());
    let people: Rc<Vec<Person>> = Rc::new(
        (0..2 * PAIRS)
            .map(|i| {
                let name = if i < PAIRS {
                    sender_name(i)
                } else {
                    recipient_name(i - PAIRS)
                };
                person_with(name, PREKEY_LOW_WATER)
            })
            .collect(),
    );
    let mut results: Vec<(System, Vec<Outcome>)> =
        systems.iter().map(|&s| (s, Vec::new())).collect();
    // BENCH_RUNS overrides the run count (quick checks only).
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUNS);
    for run in 0..runs {
        for (system, outs) in &mut results {
            let load = load_average();
            let drops = udp_rcvbuf_errors();
            let out = match system {
                System::Ours => Some(ours_run(Rc::clone(&people)).await),
                System::Bare => Some(bare_run().await),
                System::Redis => redis_run().await,
            };
            let drops = udp_rcvbuf_errors() - drops;
            let Some(o) = out else {
                println!("   redis-server not available: peer skipped");
                continue;
            };
            let socket_drops = o.drops.map_or_else(String::new, |(s, c)| {
                format!(" (server socket {s}, load generator socket {c})")
            });
            let fell_back = if *system == System::Ours {
                format!(
                    " ({} sends answered from the mailbox, not live; {:.2} envelopes per ack)",
                    o.stored, o.per_ack
                )
            } else {
                String::new()
            };
            println!(
                "   [{}] run {}: {:.0} delivered msgs/s, latency p50 {:.2} ms p99 {:.2} ms, \
                 server CPU {:.2} s ({:.0} msgs per server CPU-second), {} lost, {} errors{fell_back}, \
                 connected in {:.1} s, {drops} UDP datagrams dropped{socket_drops}, \
                 load average before {load}",
                system.key(),
                run + 1,
                o.rate,
                o.p50_ms,
                o.p99_ms,
                o.cpu_s,
                o.per_cpu_s,
                o.lost,
                o.errors,
                o.connect_s
            );
            if let Some(t) = o.traffic {
                println!(
                    "      server QUIC traffic per delivered message: {:.2} datagrams out, {:.2} in; \
                     STREAM frames {:.2} out, {:.2} in; ACK frames {:.2} out, {:.2} in",
                    t.datagrams_out,
                    t.datagrams_in,
                    t.stream_frames_out,
                    t.stream_frames_in,
                    t.ack_frames_out,
                    t.ack_frames_in
                );
            }
            outs.push(o);
        }
    }
    let mut medians: HashMap<&'static str, (f64, f64)> = HashMap::new();
    for (system, outs) in &results {
        if outs.is_empty() {
            continue;
        }
        let pick = |f: fn(&Outcome) -> f64| outs.iter().map(f).collect::<Vec<f64>>();
        let rates = pick(|o| o.rate);
        let per_cpu = pick(|o| o.per_cpu_s);
        let p50 = pick(|o| o.p50_ms);
        let p99 = pick(|o| o.p99_ms);
        println!(
            "   {}: median {:.0} msgs/s (runs {}), p50 {:.2} ms (runs {}), p99 {:.2} ms (runs \
             {}), {:.0} msgs per server CPU-second (runs {})",
            system.label(),
            median(&rates),
            common::spread(&rates),
            median(&p50),
            spread2(&p50),
            median(&p99),
            spread2(&p99),
            median(&per_cpu),
            common::spread(&per_cpu),
        );
        medians.insert(system.key(), (median(&rates), median(&per_cpu)));
    }
    if let Some(&(ours, ours_cpu)) = medians.get("ours") {
        if let Some(&(bare, bare_cpu)) = medians.get("bare") {
            println!(
                "   ratio ours / bare quinn: throughput {:.3} (goal >= 0.80: {}), per server \
                 CPU-second {:.3}",
                ours / bare,
                if ours / bare >= 0.8 { "met" } else { "not met" },
                ours_cpu / bare_cpu
            );
        }
        if let Some(&(redis, redis_cpu)) = medians.get("redis") {
            println!(
                "   ratio ours / redis pub/sub: throughput {:.3} (goal > 1: {}), per server \
                 CPU-second {:.3}",
                ours / redis,
                if ours > redis { "met" } else { "not met" },
                ours_cpu / redis_cpu
            );
        }
    }
}

fn spread2(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.2}–{max:.2}")
}

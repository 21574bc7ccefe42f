//! The real server (`app::start`: the service and store behind the QUIC
//! layer) under hostile input on 127.0.0.1: mutated frames of every kind
//! (T-30), slow-drip and silent connections (T-37), 0-RTT (T-45), stalled
//! handshakes and vanished peers, and the order of a push and the reply it
//! made ready.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use messenger_crypto::prekey::{OneTimePrekeyPair, SignedPrekeyPair};
use messenger_proto::msg::{
    ClientFrame, Login, NOTIFY_ID, OutgoingEnvelope, Push, Reply, Request, ServerFrame,
    SignedRoster,
};
use messenger_proto::{ALPN, MAX_FRAME_LEN, PROTOCOL_VERSION, decode, encode};
use messenger_rendezvous::app::{load_or_create_server_secret, server_key_pair, sign_announcement};
use messenger_rendezvous::handler::CloseReason;
use messenger_rendezvous::limits::Limits;
use messenger_rendezvous::pin::pinned_client_config;
use messenger_rendezvous::tls::ServerIdentity;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use support::real::{
    Person, address, fast_service, logged_in, login, make_friends, person, register,
    registered_and_logged_in, roster, start_app, start_with, temp_dir,
};
use support::{TestClient, WAIT, client_endpoint, client_endpoint_with, close_code, connect_raw};

/// The tests here each load both cores (hundreds of handshakes); they take
/// turns rather than starve each other's timers.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Mutations per frame kind in CI (T-30; 50,000 nightly).
const MUTATIONS: usize = 2_000;

/// Of the mutations of one kind that do not decode (the server closes
/// their connection, so each needs a connection of its own), how many are
/// sent in CI: an even spread over all of them. Every one of them is
/// checked to fail the same `decode` the server runs; sending all of them
/// (about 39,000 handshakes, ~50 s on 2 cores) is `T30_CLOSING_PER_KIND=all`.
const CLOSING_PER_KIND: usize = 250;

/// A count from the environment (`all` for no limit), else `default`.
fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) if v == "all" => usize::MAX,
        Ok(v) => v.parse().unwrap_or(default),
        Err(_) => default,
    }
}

/// A bad frame must be answered or its connection closed within this.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// Connections used at once for frames that close their connection.
const CLOSING_WORKERS: usize = 32;

/// Frames sent before their replies are read, on the batch connection.
const WINDOW: usize = 32;

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One well-formed sample of every request kind, with plausible contents
/// (real keys and signatures where the server checks them), as `mallory`.
fn samples(mallory: &mut Person, carol: &Person, server_secret: &[u8; 64]) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(77);
    let fresh = OneTimePrekeyPair::generate_batch(&mut mallory.counter, 5, &mut rng).unwrap();
    let spk = SignedPrekeyPair::generate(&mallory.id, &mut mallory.counter, &mut rng).unwrap();
    let announcement = sign_announcement(&server_key_pair(server_secret), 1_700_000_000, "hello");
    let requests = vec![
        register(carol),
        Request::Login(Login {
            username: "mallory".into(),
            signature: vec![0x11; 64],
        }),
        Request::FetchBundle {
            username: "bob".into(),
        },
        Request::PrekeyStatus,
        Request::UploadPrekeys {
            one_time_prekeys: fresh.iter().map(|k| k.public().to_bytes()).collect(),
        },
        Request::RotateSignedPrekey {
            signed_prekey: spk.public().to_bytes(),
        },
        Request::Send(OutgoingEnvelope {
            to: "bob".into(),
            to_device: 1,
            id: [3; 16],
            body: vec![0xC5; 48],
        }),
        Request::GroupSend {
            group: "team".into(),
            id: [4; 16],
            body: vec![0x5C; 48],
        },
        Request::Pull { after: 0, max: 16 },
        Request::Ack {
            seqs: vec![1, 2, 300, 70_000],
        },
        Request::Users,
        Request::FriendRequest {
            username: "bob".into(),
        },
        Request::FriendAccept {
            username: "bob".into(),
        },
        Request::FriendDecline {
            username: "bob".into(),
        },
        Request::FriendRemove {
            username: "bob".into(),
        },
        Request::FriendList,
        Request::GroupCreate(roster(mallory, "crew", 1, &["mallory", "bob"])),
        Request::GroupJoin {
            group: "team".into(),
        },
        Request::GroupUpdate(roster(mallory, "team", 2, &["mallory", "bob"])),
        Request::GroupLeave {
            group: "team".into(),
        },
        Request::GroupMembers {
            group: "team".into(),
        },
        Request::MyGroups,
        Request::Announce(announcement),
        Request::Lookup {
            username: "bob".into(),
        },
        Request::UsersAfter {
            after: Some("alice".into()),
        },
    ];
    // Every variant once, in order: the variant indices (each body's first
    // byte) are 0, 1, 2, … and the next index is no request at all (serde
    // reports an unknown variant as a custom error). A `match` could not
    // check this: `Request` is non-exhaustive.
    for (i, r) in requests.iter().enumerate() {
        let body = postcard::to_stdvec(r).expect("encodes");
        assert_eq!(usize::from(body[0]), i, "{r:?} out of place");
    }
    let next = u8::try_from(requests.len()).expect("fewer than 128 kinds");
    assert!(
        matches!(
            postcard::from_bytes::<Request>(&[next]),
            Err(postcard::Error::SerdeDeCustom)
        ),
        "request kind {next} has no sample"
    );
    requests
}

/// Puts the length prefix before `body`.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// `count` mutated bodies of `body`: truncation at every length first,
/// then bit flips, trailing bytes, unknown enum tags (at `tag_at`), invalid
/// UTF-8 inside the `strings` found in the body, and huge length varints.
fn mutations(
    body: &[u8],
    tag_at: usize,
    strings: &[&str],
    count: usize,
    seed: u64,
) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out: Vec<Vec<u8>> = (0..body.len().min(count))
        .map(|len| body[..len].to_vec())
        .collect();
    let string_spans: Vec<(usize, usize)> = strings
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            body.windows(s.len())
                .position(|w| w == s.as_bytes())
                .map(|at| (at, s.len()))
        })
        .collect();
    let mut kind = 0usize;
    while out.len() < count {
        let mut m = body.to_vec();
        match kind % 5 {
            0 => {
                for _ in 0..rng.random_range(1..=3) {
                    let bit = rng.random_range(0..m.len() * 8);
                    m[bit / 8] ^= 1 << (bit % 8);
                }
            }
            1 => {
                for _ in 0..rng.random_range(1..=16) {
                    m.push(rng.random());
                }
            }
            2 => {
                if tag_at < m.len() {
                    // Request has 23 variants; anything above is unknown
                    // (values of 128 and more also start a longer varint).
                    m[tag_at] = rng.random_range(23..=255);
                }
            }
            3 => {
                let bad = [0xFF, 0xFE, 0xC0, 0xC1, 0x80, 0xED, 0xF8];
                let (at, len) = if string_spans.is_empty() {
                    (0, m.len())
                } else {
                    string_spans[rng.random_range(0..string_spans.len())]
                };
                let i = at + rng.random_range(0..len);
                m[i] = bad[rng.random_range(0..bad.len())];
            }
            _ => {
                let huge: &[u8] = match rng.random_range(0..3) {
                    // u32::MAX
                    0 => &[0xFF, 0xFF, 0xFF, 0xFF, 0x0F],
                    // 2^28: more elements than any frame holds
                    1 => &[0x80, 0x80, 0x80, 0x80, 0x01],
                    // u64::MAX
                    _ => &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
                };
                let at = rng.random_range(0..=m.len());
                if rng.random_bool(0.5) {
                    m.splice(at..at, huge.iter().copied());
                } else {
                    let end = (at + huge.len()).min(m.len());
                    m.splice(at..end, huge.iter().copied());
                }
            }
        }
        kind += 1;
        out.push(m);
    }
    out
}

/// One pass of T-30 over every frame kind.
struct MutationPass {
    mutations: usize,
    closing_per_kind: usize,
    seed: u64,
}

impl MutationPass {
    /// Returns (mutations made, answered, error answers, closing frames sent).
    async fn run(
        &self,
        bodies: &[(Vec<u8>, usize)],
        strings: &[&str],
        batch: &mut TestClient,
        addr: SocketAddr,
        fp: &str,
        closing: &Arc<Closing>,
    ) -> (usize, usize, usize, usize) {
        let (mut total, mut answered, mut errors, mut closing_sent) = (0, 0, 0, 0);
        for (kind, (body, tag_at)) in bodies.iter().enumerate() {
            let mutated = mutations(
                body,
                *tag_at,
                strings,
                self.mutations,
                self.seed + kind as u64,
            );
            assert_eq!(mutated.len(), self.mutations);
            total += mutated.len();
            let mut decodable = Vec::new();
            let mut closing_frames = Vec::new();
            for m in mutated {
                if kind == 0 {
                    // The preface kind: a fresh connection for each.
                    closing_frames.push(framed(&m));
                } else if let Ok(frame) = decode::<ClientFrame>(&m) {
                    if frame.is_notification() && !matches!(frame.request, Request::Ack { .. }) {
                        // Only an `Ack` may be a notification (id 0).
                        closing_frames.push(framed(&m));
                    } else {
                        decodable.push((frame.id, framed(&m)));
                    }
                } else {
                    closing_frames.push(framed(&m));
                }
            }
            if kind == 0 {
                // A one-byte body has few distinct mutations.
                closing_frames.sort();
                closing_frames.dedup();
            }
            let (r, e) = send_answered(batch, decodable).await;
            answered += r;
            errors += e;
            let sample = spread(closing_frames, self.closing_per_kind);
            closing_sent += sample.len();
            send_closing(addr, fp, sample, kind == 0, closing).await;
        }
        (total, answered, errors, closing_sent)
    }
}

/// At most `n` of `items`, evenly spread over them.
fn spread<T>(items: Vec<T>, n: usize) -> Vec<T> {
    if items.len() <= n {
        return items;
    }
    let step = items.len() as f64 / n as f64;
    let mut keep: HashSet<usize> = (0..n).map(|i| (i as f64 * step) as usize).collect();
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| keep.remove(&i).then_some(item))
        .collect()
}

/// Vectors that decode but exceed a limit: the server must answer them with
/// an error, not store them.
fn oversized_but_well_formed() -> Vec<Request> {
    vec![
        Request::UploadPrekeys {
            one_time_prekeys: vec![vec![0x42; 36]; 5_000],
        },
        Request::Ack {
            seqs: (0..40_000).collect(),
        },
        Request::Send(OutgoingEnvelope {
            to: "bob".into(),
            to_device: 1,
            id: [9; 16],
            body: vec![0xAA; MAX_FRAME_LEN - 100],
        }),
        Request::GroupCreate(SignedRoster {
            group: "huge".into(),
            version: 1,
            owner: "mallory".into(),
            members: (0..20_000).map(|i| format!("m{i:05}")).collect(),
            signature: vec![0; 64],
        }),
    ]
}

/// The outcome of sending frames that should close their connection.
#[derive(Default)]
struct Closing {
    closed: AtomicUsize,
    /// Preface mutations that were still a valid preface.
    hello: AtomicUsize,
}

/// Sends each of `frames` on a connection of its own (as the preface when
/// `as_preface`, else after the hello) and checks the close: a frame-error
/// code within [`ANSWER_WITHIN`].
async fn send_closing(
    addr: SocketAddr,
    fp: &str,
    frames: Vec<Vec<u8>>,
    as_preface: bool,
    outcome: &Arc<Closing>,
) {
    let queue = Arc::new(std::sync::Mutex::new(frames));
    let endpoints: Vec<quinn::Endpoint> = (0..4).map(|_| client_endpoint(fp)).collect();
    let mut workers = Vec::new();
    for i in 0..CLOSING_WORKERS {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let (queue, outcome) = (queue.clone(), outcome.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let Some(frame) = queue.lock().unwrap().pop() else {
                    return;
                };
                let conn = connect_raw(&endpoint, addr).await.unwrap();
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                if !as_preface {
                    send.write_all(&encode(&PROTOCOL_VERSION).unwrap())
                        .await
                        .unwrap();
                }
                let sent = Instant::now();
                send.write_all(&frame).await.unwrap();
                let closed = tokio::time::timeout(ANSWER_WITHIN, conn.closed()).await;
                match closed {
                    Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
                        let code = close.error_code.into_inner();
                        let expected = [
                            CloseReason::BadRequest,
                            CloseReason::TooLarge,
                            CloseReason::UnsupportedVersion,
                        ];
                        assert!(
                            expected.iter().any(|r| u64::from(r.code()) == code),
                            "frame {frame:02x?} closed with {code}"
                        );
                        outcome.closed.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(other) => panic!("frame {frame:02x?}: connection lost: {other}"),
                    Err(_) if as_preface => {
                        // Still a valid preface: the hello must have come.
                        let mut prefix = [0u8; 4];
                        tokio::time::timeout(ANSWER_WITHIN, recv.read_exact(&mut prefix))
                            .await
                            .expect("hello in time")
                            .expect("hello read");
                        outcome.hello.fetch_add(1, Ordering::SeqCst);
                        conn.close(0u32.into(), b"");
                    }
                    Err(_) => panic!(
                        "frame {frame:02x?}: not closed within {ANSWER_WITHIN:?} ({:?})",
                        sent.elapsed()
                    ),
                }
            }
        }));
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .expect("closing frames done in time")
            .unwrap();
    }
    for endpoint in endpoints {
        endpoint.close(0u32.into(), b"");
    }
}

/// Sends frames that decode on one logged-in connection, `WINDOW` at a time,
/// and checks each gets its reply within [`ANSWER_WITHIN`] of its window.
/// Returns (replies, error replies).
async fn send_answered(c: &mut TestClient, frames: Vec<(u32, Vec<u8>)>) -> (usize, usize) {
    let (mut replies, mut errors) = (0, 0);
    let mut pending: Vec<(u32, Vec<u8>)> = frames;
    pending.reverse();
    while !pending.is_empty() {
        // A window of frames with distinct request ids.
        let mut ids = HashSet::new();
        let mut window = Vec::new();
        let mut later = Vec::new();
        while window.len() < WINDOW
            && let Some((id, frame)) = pending.pop()
        {
            if id == NOTIFY_ID {
                // An `Ack` notification: never answered.
                window.push(frame);
            } else if ids.insert(id) {
                window.push(frame);
            } else {
                later.push((id, frame));
            }
        }
        pending.extend(later.into_iter().rev());
        let sent = Instant::now();
        for frame in &window {
            c.send.write_all(frame).await.unwrap();
        }
        while !ids.is_empty() {
            let frame = tokio::time::timeout(ANSWER_WITHIN, c.frame())
                .await
                .unwrap_or_else(|_| panic!("no reply within {ANSWER_WITHIN:?}: {ids:?}"))
                .unwrap_or_else(|e| panic!("the batch connection failed: {e}"));
            match frame {
                ServerFrame::Reply { id, result } => {
                    assert!(ids.remove(&id), "reply to an unknown id {id}");
                    replies += 1;
                    if result.is_err() {
                        errors += 1;
                    }
                }
                ServerFrame::Push(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            sent.elapsed() < ANSWER_WITHIN,
            "window answered in {:?}",
            sent.elapsed()
        );
    }
    (replies, errors)
}

/// T-30: for the preface and each of the 23 request kinds, 2,000 mutations
/// (truncation at every length, bit flips, trailing bytes, unknown tags,
/// invalid UTF-8, huge lengths) of a plausible frame are made. Every one
/// that still decodes (checked with the same `decode` the server uses) goes
/// to the real server, 32 at a time on one logged-in connection, and must be
/// answered. The ones that do not decode close their connection, so each
/// needs a connection of its own: [`CLOSING_PER_KIND`] of them per kind,
/// evenly spread, are sent in CI (all with `T30_CLOSING_PER_KIND=all`), and
/// each must be closed with a frame-error code. Every answer or close
/// within 1 s; well-formed but oversized vectors are answered with an error;
/// an honest client meanwhile sees no failed request; the process's RSS
/// (server and test client) grows < 10 % over the pass, measured after a
/// smaller warm-up pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_mutated_frames_of_every_kind() {
    let _turn = HEAVY.lock().await;
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.max_connections_per_ip = 10_000;
    limits.requests_per_second = 1_000_000;
    limits.request_burst = 1_000_000;
    let running = start_app(limits, &dir);
    let (addr, fp) = address(&running);
    let secret = load_or_create_server_secret(&dir.path().join("data")).unwrap();

    let mut mallory = person("mallory", 1);
    let (bob, honest, carol) = (person("bob", 2), person("honest", 3), person("carol", 4));
    let mut batch = registered_and_logged_in(addr, &fp, &mallory).await;
    let b = registered_and_logged_in(addr, &fp, &bob).await;
    assert_eq!(
        batch
            .request(Request::GroupCreate(roster(
                &mallory,
                "team",
                1,
                &["mallory", "bob"]
            )))
            .await,
        Ok(Reply::Ok)
    );
    b.conn.close(0u32.into(), b"");

    // The honest client: requests every 20 ms, each must succeed; the ids
    // of its envelopes to bob that were accepted are kept, to be found in
    // bob's mailbox at the end.
    let stop = Arc::new(AtomicBool::new(false));
    let honest_ok = Arc::new(AtomicUsize::new(0));
    let honest_accepted = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let honest_task = {
        let (stop, ok, fp) = (stop.clone(), honest_ok.clone(), fp.clone());
        let accepted = honest_accepted.clone();
        tokio::spawn(async move {
            let mut c = registered_and_logged_in(addr, &fp, &honest).await;
            let mut n = 0u8;
            while !stop.load(Ordering::SeqCst) {
                let request = match n % 3 {
                    0 => Request::Users,
                    1 => Request::FriendList,
                    _ => Request::Send(OutgoingEnvelope {
                        to: "bob".into(),
                        to_device: 1,
                        id: [n; 16],
                        body: vec![n; 32],
                    }),
                };
                let is_send = matches!(request, Request::Send(_));
                let r = c.request(request).await;
                assert!(r.is_ok(), "an honest request failed: {r:?}");
                if is_send {
                    assert!(matches!(r, Ok(Reply::Accepted { .. })), "{r:?}");
                    accepted.lock().unwrap().insert([n; 16]);
                }
                ok.fetch_add(1, Ordering::SeqCst);
                n = n.wrapping_add(1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Kind 0 is the preface; kinds 1.. are the request samples.
    let preface = encode(&PROTOCOL_VERSION).unwrap()[4..].to_vec();
    let strings = ["mallory", "bob", "carol", "team", "crew", "hello", "honest"];
    let requests = samples(&mut mallory, &carol, &secret);
    let mut bodies = vec![(preface, usize::MAX)];
    for request in &requests {
        let frame = encode(&ClientFrame {
            id: 1,
            request: request.clone(),
        })
        .unwrap();
        // id 1 is one varint byte: the request tag follows it.
        bodies.push((frame[4..].to_vec(), 1));
    }
    let closing = Arc::new(Closing::default());
    // Warm-up pass (connection handling, allocator arenas, store cache),
    // then the RSS baseline, then the measured pass. RSS rises during the
    // warm-up (to ~120 MiB here) and then stays flat: memory that is reused,
    // not leaked.
    let warm = MutationPass {
        mutations: 200,
        closing_per_kind: 100,
        seed: 1_000,
    };
    warm.run(&bodies, &strings, &mut batch, addr, &fp, &closing)
        .await;
    let rss_start = vm_rss_kib();
    let started = Instant::now();
    let pass = MutationPass {
        mutations: env_count("T30_MUTATIONS", MUTATIONS),
        closing_per_kind: env_count("T30_CLOSING_PER_KIND", CLOSING_PER_KIND),
        seed: 0,
    };
    let (total, answered, error_answers, closed_sent) = pass
        .run(&bodies, &strings, &mut batch, addr, &fp, &closing)
        .await;
    let rss_end = vm_rss_kib();
    // Well-formed but oversized vectors: answered with an error.
    let oversized: Vec<(u32, Vec<u8>)> = oversized_but_well_formed()
        .into_iter()
        .enumerate()
        .map(|(i, request)| {
            let id = 1_000 + u32::try_from(i).unwrap();
            (id, encode(&ClientFrame { id, request }).unwrap())
        })
        .collect();
    let n_oversized = oversized.len();
    let (r, e) = send_answered(&mut batch, oversized).await;
    assert_eq!((r, e), (n_oversized, n_oversized), "oversized accepted");

    // The server still serves: a fresh login works.
    let mut again = TestClient::connect(addr, &fp).await;
    login(&mut again, &mallory).await;

    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(10), honest_task)
        .await
        .unwrap()
        .unwrap();
    let closed = closing.closed.load(Ordering::SeqCst);
    let hello = closing.hello.load(Ordering::SeqCst);
    eprintln!(
        "T-30: {total} mutations in {:?}: {answered} answered ({error_answers} errors), \
         {closed_sent} sent of those that close ({closed} closed in both passes, \
         {hello} valid prefaces); honest requests {}; RSS {rss_start} -> {rss_end} KiB",
        started.elapsed(),
        honest_ok.load(Ordering::SeqCst)
    );
    assert!(honest_ok.load(Ordering::SeqCst) > 0);
    assert!(closed > 0 && answered > 0);
    // Nothing accepted was lost: every envelope the honest client was told
    // was accepted is in bob's mailbox, with its body.
    let mut b = TestClient::connect(addr, &fp).await;
    login(&mut b, &bob).await;
    let mut stored = HashSet::new();
    let mut after = 0;
    loop {
        let Ok(Reply::Envelopes { envelopes, more }) =
            b.request(Request::Pull { after, max: 256 }).await
        else {
            panic!("bob's pull failed");
        };
        for e in &envelopes {
            after = after.max(e.seq);
            // Mallory's mutated sends that still decoded are there too.
            if e.from == "honest" {
                assert_eq!(e.body, vec![e.id[0]; 32], "envelope {:?}", e.id);
                stored.insert(e.id);
            }
        }
        if !more || envelopes.is_empty() {
            break;
        }
    }
    let accepted = honest_accepted.lock().unwrap().clone();
    assert!(!accepted.is_empty());
    let lost: Vec<_> = accepted.difference(&stored).collect();
    assert!(lost.is_empty(), "accepted but not stored: {lost:?}");
    assert!(
        rss_end * 10 < rss_start * 11,
        "RSS grew from {rss_start} to {rss_end} KiB"
    );
    running.handle.shutdown().await;
}

/// How a slowloris connection of T-37 behaves.
#[derive(Clone, Copy, Debug)]
enum Slow {
    /// Handshakes, then sends nothing.
    Silent,
    /// Opens the control stream and sends the preface one byte a second.
    DripPreface,
    /// Sends the preface, then a request one byte a second.
    DripRequest,
}

/// One slowloris connection; returns how long after its last on-time step
/// (the handshake, or the first byte of the dripped request) it was closed,
/// and the close code.
async fn slowloris(endpoint: quinn::Endpoint, addr: SocketAddr, how: Slow) -> (Duration, u64) {
    let conn = connect_raw(&endpoint, addr).await.unwrap();
    let mut since = Instant::now();
    let mut drip: Vec<u8> = Vec::new();
    let mut streams = None;
    match how {
        Slow::Silent => {}
        Slow::DripPreface => drip = encode(&PROTOCOL_VERSION).unwrap(),
        Slow::DripRequest => {
            let (mut send, recv) = conn.open_bi().await.unwrap();
            send.write_all(&encode(&PROTOCOL_VERSION).unwrap())
                .await
                .unwrap();
            streams = Some((send, recv));
            drip = encode(&ClientFrame {
                id: 1,
                request: Request::Send(OutgoingEnvelope {
                    to: "bob".into(),
                    to_device: 1,
                    id: [1; 16],
                    body: vec![0; 64],
                }),
            })
            .unwrap();
        }
    }
    if !drip.is_empty() {
        if streams.is_none() {
            streams = Some(conn.open_bi().await.unwrap());
        }
        let (send, _recv) = streams.as_mut().unwrap();
        since = Instant::now();
        for byte in drip {
            if send.write_all(&[byte]).await.is_err() {
                break;
            }
            let closed = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
            if closed.is_ok() {
                break;
            }
        }
    }
    let error = tokio::time::timeout(Duration::from_secs(60), conn.closed())
        .await
        .expect("closed within 60 s");
    let code = match error {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("{how:?}: closed without a code: {other}"),
    };
    (since.elapsed(), code)
}

/// T-37: 500 connections that stay silent after the handshake, drip their
/// preface, or drip a request one byte a second are all closed within
/// their timeout (control stream 1 s, frame 2 s here) + 2 s, while an
/// honest client's requests keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t37_slowloris_connections_are_closed_in_time() {
    let _turn = HEAVY.lock().await;
    const CONNECTIONS: usize = 500;
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.max_connections_per_ip = 10_000;
    limits.control_stream_timeout = Duration::from_secs(1);
    limits.frame_timeout = Duration::from_secs(2);
    let running = start_app(limits.clone(), &dir);
    let (addr, fp) = address(&running);
    let honest = person("honest", 3);
    let mut c = registered_and_logged_in(addr, &fp, &honest).await;

    let endpoints: Vec<quinn::Endpoint> = (0..4).map(|_| client_endpoint(&fp)).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let how = match i % 3 {
            0 => Slow::Silent,
            1 => Slow::DripPreface,
            _ => Slow::DripRequest,
        };
        let endpoint = endpoints[i % endpoints.len()].clone();
        // Spread over a second, so the handshakes do not delay the server's
        // timers of the connections before them.
        let delay = Duration::from_millis(2 * i as u64);
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            (how, slowloris(endpoint, addr, how).await)
        });
    }
    // The honest client meanwhile.
    let mut honest_ok = 0;
    let mut results = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !tasks.is_empty() {
        assert!(Instant::now() < deadline, "slowloris test overran");
        let r = c.request(Request::Users).await;
        assert!(r.is_ok(), "an honest request failed: {r:?}");
        honest_ok += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Some(done) = tasks.try_join_next() {
            results.push(done.unwrap());
        }
    }
    assert_eq!(results.len(), CONNECTIONS);
    let mut worst = Duration::ZERO;
    for (how, (took, code)) in &results {
        let (limit, reason) = match how {
            Slow::Silent | Slow::DripPreface => {
                (limits.control_stream_timeout, CloseReason::NoControlStream)
            }
            Slow::DripRequest => (limits.frame_timeout, CloseReason::SlowFrame),
        };
        assert_eq!(*code, u64::from(reason.code()), "{how:?}");
        assert!(
            *took < limit + Duration::from_secs(2),
            "{how:?} closed after {took:?}"
        );
        worst = worst.max(*took);
    }
    eprintln!("T-37: {CONNECTIONS} closed, slowest after {worst:?}; {honest_ok} honest requests");
    assert!(honest_ok > 0);
    // Still serving new clients.
    let mut again = TestClient::connect(addr, &fp).await;
    login(&mut again, &honest).await;
    running.handle.shutdown().await;
}

/// Serves each connection's first stream: reads a preface, answers "ok". A stand-in server for the 0-RTT control case.
async fn echo_server(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let mut preface = [0u8; 5];
                let _ = recv.read_exact(&mut preface).await;
                let _ = send.write_all(b"ok").await;
                let _ = send.finish();
                let _ = conn.closed().await;
            }
        });
    }
}

/// Whether a second connection from `endpoint` (whose first connection got
/// the server's session tickets) can start in 0-RTT.
async fn second_connection_0rtt(endpoint: &quinn::Endpoint, addr: SocketAddr) -> bool {
    let first = connect_raw(endpoint, addr).await.unwrap();
    let (mut send, mut recv) = first.open_bi().await.unwrap();
    send.write_all(&encode(&PROTOCOL_VERSION).unwrap())
        .await
        .unwrap();
    // A reply means the handshake is done and the tickets were sent.
    let mut buf = [0u8; 2];
    let read = tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(()))),
        "no answer from {addr}: {read:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.close(0u32.into(), b"");
    let connecting = endpoint.connect(addr, "localhost").unwrap();
    match connecting.into_0rtt() {
        Ok((conn, _accepted)) => {
            conn.close(0u32.into(), b"");
            true
        }
        Err(connecting) => {
            // The full handshake still works.
            let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
                .await
                .unwrap()
                .unwrap();
            conn.close(0u32.into(), b"");
            false
        }
    }
}

/// T-45: a client with early data enabled and a resumption ticket cannot
/// start in 0-RTT against the server (its TLS configuration allows no
/// early data), so nothing reaches the server before the handshake is
/// done. Control: the same client against a stand-in server with the same
/// certificate that allows early data does start in 0-RTT, so the test can
/// tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t45_zero_rtt_is_refused() {
    let _turn = HEAVY.lock().await;
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let client = || {
        let mut tls = pinned_client_config(&fp).unwrap();
        tls.enable_early_data = true;
        client_endpoint_with(tls)
    };

    // The server's own TLS configuration.
    let identity = ServerIdentity::load_or_create(&dir.path().join("data")).unwrap();
    let chain = vec![identity.cert_der().clone()];
    let tls = messenger_rendezvous::net::tls_config(chain.clone(), identity.key_der().to_rustls())
        .unwrap();
    assert_eq!(tls.max_early_data_size, 0);
    assert_eq!(tls.alpn_protocols, vec![ALPN.to_vec()]);

    let endpoint = client();
    assert!(
        !second_connection_0rtt(&endpoint, addr).await,
        "the server accepted a 0-RTT connection"
    );
    endpoint.close(0u32.into(), b"");

    // Control: the same certificate with early data allowed.
    let mut permissive =
        messenger_rendezvous::net::tls_config(chain, identity.key_der().to_rustls()).unwrap();
    permissive.max_early_data_size = u32::MAX;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(permissive).unwrap();
    let control = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let control_addr = control.local_addr().unwrap();
    let serving = tokio::spawn(echo_server(control.clone()));
    let endpoint = client();
    assert!(
        second_connection_0rtt(&endpoint, control_addr).await,
        "control: the client did not even try 0-RTT"
    );
    endpoint.close(0u32.into(), b"");
    control.close(0u32.into(), b"");
    serving.abort();
    running.handle.shutdown().await;
}

/// The close code of `conn` and how long after `since` it came; waits at
/// most `within` for the close.
async fn closed_after(
    conn: &quinn::Connection,
    since: Instant,
    within: Duration,
) -> (Option<u64>, Duration) {
    let code = close_code(conn, within).await;
    (code, since.elapsed())
}

fn login_timeout_code() -> Option<u64> {
    Some(CloseReason::LoginTimeout.code().into())
}

/// A connection that sends its preface and then nothing, one that only
/// registers (allowed before login, and answered), and one whose login
/// fails are each closed with `LoginTimeout` once the login timeout has
/// passed: keep-alives would otherwise keep them open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_logs_in_is_closed_after_the_login_timeout() {
    let _turn = HEAVY.lock().await;
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.login_timeout = Duration::from_millis(500);
    // Keep-alives well inside the timeout, as with the defaults.
    limits.keep_alive = Duration::from_millis(100);
    let running = start_app(limits.clone(), &dir);
    let (addr, fp) = address(&running);
    let bound = limits.login_timeout + Duration::from_secs(3);
    let endpoint = client_endpoint(&fp);

    // The preface and nothing else. Each `since` is taken before the
    // client starts its handshake: the server's deadline starts when its
    // own side of the handshake is done, which can come a little before the
    // client's (once seen 2 ms before: a 498 ms close for a 500 ms limit).
    let since = Instant::now();
    let conn = connect_raw(&endpoint, addr).await.unwrap();
    let silent = TestClient::on(endpoint.clone(), conn).await;
    let (code, took) = closed_after(&silent.conn, since, bound).await;
    assert_eq!(code, login_timeout_code(), "preface only");
    assert!(
        took >= limits.login_timeout && took < bound,
        "preface only: closed after {took:?}"
    );

    // A registration is served before login, but is not a login.
    let carol = person("carol", 21);
    let since = Instant::now();
    let conn = connect_raw(&endpoint, addr).await.unwrap();
    let mut registering = TestClient::on(endpoint.clone(), conn).await;
    assert_eq!(registering.request(register(&carol)).await, Ok(Reply::Ok));
    let (code, took) = closed_after(&registering.conn, since, bound).await;
    assert_eq!(code, login_timeout_code(), "register only");
    assert!(took >= limits.login_timeout, "register only: {took:?}");

    // A failed login is not a login either.
    let since = Instant::now();
    let conn = connect_raw(&endpoint, addr).await.unwrap();
    let mut failing = TestClient::on(endpoint.clone(), conn).await;
    let bad = failing
        .request(Request::Login(Login {
            username: carol.name.clone(),
            signature: vec![0x11; 64],
        }))
        .await;
    assert!(bad.is_err(), "{bad:?}");
    let (code, took) = closed_after(&failing.conn, since, bound).await;
    assert_eq!(code, login_timeout_code(), "failed login");
    assert!(took >= limits.login_timeout, "failed login: {took:?}");

    running.handle.shutdown().await;
}

/// The frame and login deadlines share one timer, moved only when a deadline
/// falls before it (`net::read_requests`). The cases it must get right:
/// - a frame deadline before the login deadline moves the timer earlier
///   (a dripped frame before login is closed `SlowFrame`, not at the login
///   timeout);
/// - the timer set for a frame deadline that is gone (the frame completed)
///   fires early and is armed again for the login deadline (`LoginTimeout`,
///   not earlier, not never);
/// - frames split in halves, each completed in time, keep a logged-in
///   connection open far past the frame timeout, though the timer fires
///   for the first frame's deadline meanwhile;
/// - after a quick login, part of a frame moves the timer from the (now
///   cleared) login deadline to the earlier frame deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frame_and_login_deadlines_share_one_timer_correctly() {
    let _turn = HEAVY.lock().await;
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.frame_timeout = Duration::from_millis(400);
    limits.login_timeout = Duration::from_millis(2500);
    limits.keep_alive = Duration::from_millis(100);
    let running = start_app(limits.clone(), &dir);
    let (addr, fp) = address(&running);
    let endpoint = client_endpoint(&fp);
    let users = ClientFrame {
        id: 1,
        request: Request::Users,
    };
    let frame = encode(&users).unwrap();
    let (head, tail) = frame.split_at(3);

    // 1. Part of a frame before login, never completed.
    let since = Instant::now();
    let conn = connect_raw(&endpoint, addr).await.unwrap();
    let mut dripping = TestClient::on(endpoint.clone(), conn).await;
    dripping.send.write_all(head).await.unwrap();
    let (code, took) = closed_after(&dripping.conn, since, Duration::from_secs(5)).await;
    assert_eq!(code, Some(CloseReason::SlowFrame.code().into()));
    assert!(
        took >= limits.frame_timeout && took < limits.login_timeout,
        "a dripped frame before login closed after {took:?}"
    );

    // 2. A frame completed in time, then silence: the login timeout.
    let since = Instant::now();
    let conn = connect_raw(&endpoint, addr).await.unwrap();
    let mut quiet = TestClient::on(endpoint.clone(), conn).await;
    quiet.send.write_all(head).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    quiet.send.write_all(tail).await.unwrap();
    let (code, took) = closed_after(&quiet.conn, since, Duration::from_secs(6)).await;
    assert_eq!(code, login_timeout_code(), "closed after {took:?}");
    assert!(
        took >= limits.login_timeout,
        "closed before the login timeout: {took:?}"
    );

    // 3. Logged in, every frame split, each half 150 ms apart, for 2 s.
    let alice = person("alice", 23);
    let mut c = registered_and_logged_in(addr, &fp, &alice).await;
    let until = Instant::now() + Duration::from_secs(2);
    let mut id = 1_000;
    while Instant::now() < until {
        id += 1;
        let frame = encode(&ClientFrame {
            id,
            request: Request::Users,
        })
        .unwrap();
        let (head, tail) = frame.split_at(3);
        c.send.write_all(head).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.send.write_all(tail).await.unwrap();
        loop {
            match c.frame().await {
                Ok(ServerFrame::Reply { id: got, result }) => {
                    assert_eq!(got, id);
                    assert!(matches!(result, Ok(Reply::Users { .. })), "{result:?}");
                    break;
                }
                // E.g. `PrekeysLow` after login.
                Ok(ServerFrame::Push(_)) => {}
                other => panic!("expected the reply to {id}, got {other:?}"),
            }
        }
    }
    assert!(
        c.conn.close_reason().is_none(),
        "{:?}",
        c.conn.close_reason()
    );

    // 4. Logged in at once (the timer still set for the login deadline),
    // then part of a frame: closed `SlowFrame` at the frame deadline, not
    // at the login deadline the timer was set for.
    let bob = person("bob", 24);
    let since = Instant::now();
    let mut d = registered_and_logged_in(addr, &fp, &bob).await;
    let frame = encode(&ClientFrame {
        id: 77,
        request: Request::Users,
    })
    .unwrap();
    d.send.write_all(&frame[..3]).await.unwrap();
    let (code, took) = closed_after(&d.conn, since, Duration::from_secs(5)).await;
    assert_eq!(code, Some(CloseReason::SlowFrame.code().into()));
    assert!(
        took >= limits.frame_timeout && took < limits.login_timeout,
        "a dripped frame after login closed after {took:?}"
    );
    running.handle.shutdown().await;
}

/// A client that registers and logs in within the login timeout keeps its
/// connection well past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_in_connection_outlives_the_login_timeout() {
    let _turn = HEAVY.lock().await;
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.login_timeout = Duration::from_secs(1);
    limits.keep_alive = Duration::from_millis(200);
    let running = start_app(limits.clone(), &dir);
    let (addr, fp) = address(&running);
    let alice = person("alice", 22);
    let started = Instant::now();
    let mut c = registered_and_logged_in(addr, &fp, &alice).await;
    assert!(
        started.elapsed() < limits.login_timeout,
        "the login itself took {:?}",
        started.elapsed()
    );
    // Also a silent one beside it, as a control: the timeout does fire
    // on this server.
    let silent = TestClient::connect(addr, &fp).await;

    tokio::time::sleep(limits.login_timeout * 2 + Duration::from_millis(500)).await;
    assert_eq!(
        close_code(&silent.conn, Duration::from_secs(3)).await,
        login_timeout_code()
    );
    assert!(
        c.conn.close_reason().is_none(),
        "closed: {:?}",
        c.conn.close_reason()
    );
    assert_eq!(
        c.request(Request::Users)
            .await
            .map(|r| matches!(r, Reply::Users { .. })),
        Ok(true)
    );
    running.handle.shutdown().await;
}

/// With two connections allowed per address, two half-open connections
/// (preface sent, never logged in) fill the address's slots; once the
/// login timeout closes them, a new connection from that address is
/// accepted and logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_give_their_slots_back_at_the_login_timeout() {
    let _turn = HEAVY.lock().await;
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.max_connections_per_ip = 2;
    limits.login_timeout = Duration::from_secs(1);
    limits.keep_alive = Duration::from_millis(200);
    let running = start_app(limits.clone(), &dir);
    let (addr, fp) = address(&running);
    let endpoint = client_endpoint(&fp);
    let mut half_open = Vec::new();
    for _ in 0..2 {
        let conn = connect_raw(&endpoint, addr).await.unwrap();
        half_open.push(TestClient::on(endpoint.clone(), conn).await);
    }
    // The address is at its cap: a third connection is refused.
    let refused = connect_raw(&endpoint, addr).await;
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );

    let bound = limits.login_timeout + Duration::from_secs(3);
    for c in &half_open {
        assert_eq!(close_code(&c.conn, bound).await, login_timeout_code());
    }
    // The slots are given back when the server's connection tasks end,
    // just after the close.
    let deadline = Instant::now() + WAIT;
    let conn = loop {
        match connect_raw(&endpoint, addr).await {
            Ok(conn) => break conn,
            Err(error) => assert!(Instant::now() < deadline, "slot never freed: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut c = TestClient::on(endpoint.clone(), conn).await;
    let dave = person("dave", 23);
    assert_eq!(c.request(register(&dave)).await, Ok(Reply::Ok));
    login(&mut c, &dave).await;
    assert!(c.request(Request::Users).await.is_ok());
    running.handle.shutdown().await;
}

/// A UDP relay on 127.0.0.1 between one client and the server that can be
/// made to go silent: it passes the client's first `client_datagrams`
/// datagrams (all, with `usize::MAX`) and the server's answers until
/// [`Relay::cut`], then drops everything both ways, as a peer that loses
/// its network does. Stopped when dropped.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Datagrams passed from the client to the server so far.
    passed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(server: SocketAddr, client_datagrams: usize) -> Self {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let passed = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (cut, passed) = (Arc::clone(&cut), Arc::clone(&passed));
            async move {
                let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
                let mut client = None;
                loop {
                    tokio::select! {
                        got = front.recv_from(&mut up) => {
                            let Ok((n, from)) = got else { return };
                            client = Some(from);
                            if !cut.load(Ordering::SeqCst)
                                && passed.load(Ordering::SeqCst) < client_datagrams
                            {
                                let _ = back.send(&up[..n]).await;
                                passed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        got = back.recv(&mut down) => {
                            let Ok(n) = got else { return };
                            if let (false, Some(to)) = (cut.load(Ordering::SeqCst), client) {
                                let _ = front.send_to(&down[..n], to).await;
                            }
                        }
                    }
                }
            }
        });
        Self {
            addr,
            cut,
            passed,
            task,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A handshake that stalls (the client's first packet arrives, then
/// nothing: no answer reaches it) holds its address's connection slot only
/// until the handshake timeout, not the much longer idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_gives_its_slot_back_at_the_handshake_timeout() {
    let _turn = HEAVY.lock().await;
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.max_connections_per_ip = 1;
    limits.handshake_timeout = Duration::from_secs(1);
    limits.idle_timeout = Duration::from_secs(60);
    let running = start_app(limits.clone(), &dir);
    let (addr, fp) = address(&running);
    let relay = Relay::start(addr, 1).await;
    let stalled_endpoint = client_endpoint(&fp);
    let connecting = stalled_endpoint.connect(relay.addr, "localhost").unwrap();
    let stalled = tokio::spawn(tokio::time::timeout(Duration::from_secs(30), connecting));
    let endpoint = client_endpoint(&fp);
    // Once the server has the stalled one's first packet, it holds the
    // address's one slot: a connection of our own is refused.
    let passed = tokio::time::timeout(WAIT, async {
        while relay.passed.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    passed
        .await
        .expect("the stalled client's first packet sent");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = connect_raw(&endpoint, addr).await;
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "the stalled handshake did not hold the slot: {refused:?}"
    );
    // Given back at the handshake timeout: well before the idle timeout.
    let deadline = Instant::now() + limits.handshake_timeout + Duration::from_secs(4);
    let conn = loop {
        match connect_raw(&endpoint, addr).await {
            Ok(conn) => break conn,
            Err(error) => assert!(Instant::now() < deadline, "slot never freed: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut c = TestClient::on(endpoint.clone(), conn).await;
    let dave = person("dave", 24);
    assert_eq!(c.request(register(&dave)).await, Ok(Reply::Ok));
    stalled.abort();
    drop(relay);
    running.handle.shutdown().await;
}

/// "A dropped connection is seen as offline within the QUIC idle timeout":
/// alice's network vanishes without a close; her friend bob is told she
/// went offline once the server's keep-alives go unanswered for the idle
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_vanishes_is_offline_for_its_friends_after_the_idle_timeout() {
    let _turn = HEAVY.lock().await;
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.idle_timeout = Duration::from_secs(2);
    limits.keep_alive = Duration::from_millis(500);
    let running = start_app(limits.clone(), &dir);
    let (addr, fp) = address(&running);
    let (alice, bob) = (person("alice", 1), person("bob", 2));
    let mut b = registered_and_logged_in(addr, &fp, &bob).await;
    let mut a = TestClient::connect(addr, &fp).await;
    assert_eq!(a.request(register(&alice)).await, Ok(Reply::Ok));
    a.conn.close(0u32.into(), b"");
    // Alice again, through the relay.
    let relay = Relay::start(addr, usize::MAX).await;
    let endpoint = client_endpoint(&fp);
    let conn = connect_raw(&endpoint, relay.addr).await.unwrap();
    let mut a = TestClient::on(endpoint, conn).await;
    login(&mut a, &alice).await;
    make_friends(&mut a, "alice", &mut b, "bob").await;
    relay.cut();
    let cut_at = Instant::now();
    let bound = limits.idle_timeout + Duration::from_secs(5);
    let offline = tokio::time::timeout(bound, async {
        loop {
            let pushed = std::mem::take(&mut b.pushes);
            if pushed.iter().any(|p| {
                matches!(p, Push::Presence { username, online: false, .. } if username == "alice")
            }) {
                return;
            }
            match b.frame().await {
                Ok(ServerFrame::Push(push)) => b.pushes.push(push),
                Ok(_) => {}
                // `frame` gives up after its own wait; keep waiting.
                Err(e) if e == "timed out" => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(
        offline.is_ok(),
        "bob was not told alice went offline within {bound:?}"
    );
    // Not before the idle timeout had a chance to run.
    assert!(
        cut_at.elapsed() >= limits.idle_timeout / 2,
        "{:?}",
        cut_at.elapsed()
    );
    running.handle.shutdown().await;
}

/// Alice's live `Send` to bob is answered when bob acknowledges it. Bob,
/// writing back at that moment, sends his own envelope to alice and the
/// acknowledgement together, so the push of bob's envelope is queued on
/// alice's connection just before her reply is ready. Alice must read that
/// push before the reply: a client that stops reading pushes once its reply
/// is in (as `messenger` does) would otherwise leave bob's envelope
/// unacknowledged, and bob would wait the whole grace. The two became ready
/// in the same turn of alice's connection task, and its writer could go
/// second (an unbiased `select!`): that failed in most of these rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_queued_before_a_reply_was_ready_is_written_first() {
    const ROUNDS: u64 = 40;
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let (alice, bob) = (person("alice", 1), person("bob", 2));
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;
    let mut b = registered_and_logged_in(addr, &fp, &bob).await;
    let envelope = |to: &str, n: u64| {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&n.to_be_bytes());
        Request::Send(OutgoingEnvelope {
            to: to.into(),
            to_device: 1,
            id,
            body: vec![7; 64],
        })
    };
    let mut out_of_order = 0;
    for round in 0..ROUNDS {
        let a_send = a.send_request(envelope("bob", round)).await;
        let seq = loop {
            match b.frame().await.unwrap() {
                ServerFrame::Push(Push::Envelope(e)) => break e.seq,
                // `PrekeysLow` and the like.
                ServerFrame::Push(_) => {}
                other => panic!("round {round}: bob expected alice's envelope, got {other:?}"),
            }
        };
        // One write: the server reads both frames in one go.
        let b_send = b.next_request_id();
        let b_ack = b.next_request_id();
        let mut both = encode(&ClientFrame {
            id: b_send,
            request: envelope("alice", round),
        })
        .unwrap();
        both.extend(
            encode(&ClientFrame {
                id: b_ack,
                request: Request::Ack { seqs: vec![seq] },
            })
            .unwrap(),
        );
        b.send.write_all(&both).await.unwrap();

        // Alice: bob's envelope, then her answer.
        let mut pushed = None;
        loop {
            match a.frame().await.unwrap() {
                ServerFrame::Push(Push::Envelope(e)) => pushed = Some(e.seq),
                ServerFrame::Push(_) => {}
                ServerFrame::Reply { id, result } => {
                    assert_eq!(id, a_send, "round {round}");
                    assert!(matches!(result, Ok(Reply::Accepted { .. })), "{result:?}");
                    break;
                }
                other => panic!("round {round}: alice got {other:?}"),
            }
        }
        let pushed = match pushed {
            Some(seq) => seq,
            None => {
                out_of_order += 1;
                loop {
                    match a.frame().await.unwrap() {
                        ServerFrame::Push(Push::Envelope(e)) => break e.seq,
                        ServerFrame::Push(_) => {}
                        other => {
                            panic!("round {round}: alice expected bob's envelope, got {other:?}")
                        }
                    }
                }
            }
        };
        assert_eq!(
            a.request(Request::Ack { seqs: vec![pushed] }).await,
            Ok(Reply::Ok)
        );
        // Bob: his answer (live, from alice's acknowledgement) and the ack's.
        let mut answered = HashSet::from([b_send, b_ack]);
        while !answered.is_empty() {
            match b.frame().await.unwrap() {
                ServerFrame::Reply { id, result } if answered.remove(&id) => {
                    assert!(result.is_ok(), "round {round}: {result:?}");
                }
                ServerFrame::Push(_) => {}
                other => panic!("round {round}: bob got {other:?}"),
            }
        }
    }
    assert_eq!(
        out_of_order, 0,
        "alice's reply came before bob's envelope in {out_of_order} of {ROUNDS} rounds"
    );
}

/// The same order when the push waits behind another: bob reads nothing
/// for a while (a 2 KiB stream window), so the server's writer is held on
/// flow control with carol's envelopes. Meanwhile alice's envelope to bob is
/// queued, and then bob's `Send` to alice is answered (alice acknowledges
/// it). When bob reads, alice's envelope must come before that answer: the
/// reply, ready after the push was queued, must not take the send half
/// first. It did, before the request loop wrote the queued pushes ahead of
/// its replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_queued_behind_a_blocked_write_still_goes_before_a_later_reply() {
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let (alice, bob, carol) = (person("alice", 1), person("bob", 2), person("carol", 3));
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;
    let mut c = registered_and_logged_in(addr, &fp, &carol).await;
    registered_and_logged_in(addr, &fp, &bob).await;
    // Bob again, on a connection with a small stream window.
    let endpoint = client_endpoint(&fp);
    let tls = pinned_client_config(&fp).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(2048));
    config.transport_config(Arc::new(transport));
    let conn = endpoint
        .connect_with(config, addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let mut b = TestClient::on(endpoint, conn).await;
    login(&mut b, &bob).await;

    let envelope = |to: &str, marker: u8, len: usize| {
        Request::Send(OutgoingEnvelope {
            to: to.into(),
            to_device: 1,
            id: [marker; 16],
            body: vec![marker; len],
        })
    };
    // Settling time for the server to act on what was just written; the
    // order checked below does not depend on it being enough, only the
    // test's power to catch a reply written first.
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    // Carol's envelopes fill bob's window: the writer is held.
    for marker in 1..=8 {
        c.send_request(envelope("bob", marker, 1024)).await;
    }
    settle().await;
    // Bob writes to alice (live: answered when she acknowledges).
    let b_send = b.send_request(envelope("alice", 50, 64)).await;
    let seq = loop {
        match a.frame().await.unwrap() {
            ServerFrame::Push(Push::Envelope(e)) => break e.seq,
            ServerFrame::Push(_) => {}
            other => panic!("alice expected bob's envelope, got {other:?}"),
        }
    };
    // Alice's envelope to bob is queued behind carol's...
    a.send_request(envelope("bob", 99, 64)).await;
    settle().await;
    // ...and only then is bob's answer made ready.
    let ack = encode(&ClientFrame {
        id: NOTIFY_ID,
        request: Request::Ack { seqs: vec![seq] },
    })
    .unwrap();
    a.send.write_all(&ack).await.unwrap();
    settle().await;

    let mut seen = Vec::new();
    loop {
        match b.frame().await.unwrap() {
            ServerFrame::Push(Push::Envelope(e)) => seen.push(e.id[0]),
            ServerFrame::Push(_) => {}
            ServerFrame::Reply { id, result } => {
                assert_eq!(id, b_send);
                assert!(matches!(result, Ok(Reply::Accepted { .. })), "{result:?}");
                break;
            }
            other => panic!("bob got {other:?}"),
        }
    }
    assert!(
        seen.contains(&99),
        "bob's answer came before alice's envelope, queued before it was ready \
         (envelopes read before the answer: {seen:?})"
    );
    running.handle.shutdown().await;
}

/// Bob's client stops reading (STOP_SENDING on the control stream) but
/// stays connected. The server's writer fails at its next push and stops;
/// from then on pushes to bob fail at once, so alice's live send to him
/// is stored and answered without waiting the grace (20 s here). Before,
/// the queue outlived the writer: pushes went on "succeeding" into a queue
/// nobody wrote, holding memory, and each live send waited the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_a_connection_whose_writer_stopped_fail_at_once() {
    use messenger_rendezvous::service::{LIVE_SEQ_BIT, ServiceConfig};
    use messenger_rendezvous::store::StoreOptions;
    let dir = temp_dir();
    let service = ServiceConfig {
        live_grace: Duration::from_secs(20),
        ..fast_service()
    };
    let running = start_with(&dir, Limits::default(), service, StoreOptions::default());
    let (addr, fp) = address(&running);
    let (alice, bob, carol) = (person("alice", 1), person("bob", 2), person("carol", 3));
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;
    let mut b = registered_and_logged_in(addr, &fp, &bob).await;
    let mut c = registered_and_logged_in(addr, &fp, &carol).await;
    make_friends(&mut b, "bob", &mut c, "carol").await;
    b.recv.stop(0u32.into()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A push to bob (carol goes and comes back): the writer's write fails.
    c.conn.close(0u32.into(), b"");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _c = logged_in(addr, &fp, &carol).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        a.request(Request::Send(OutgoingEnvelope {
            to: "bob".into(),
            to_device: 1,
            id: [5; 16],
            body: vec![5; 64],
        })),
    )
    .await
    .expect("answered without waiting the 20 s grace");
    let Ok(Reply::Accepted { seq, .. }) = answered else {
        panic!("{answered:?}")
    };
    assert_eq!(seq & LIVE_SEQ_BIT, 0, "stored, not delivered live");
    running.handle.shutdown().await;
}

/// A connection that has spent its request rate still has its `Ack`
/// notifications of live delivery ids applied: dropped, alice's send would
/// wait the grace and be answered from the mailbox (a seq without the live
/// bit), and bob would get the envelope a second time. Its other requests
/// are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_acks_are_applied_beyond_the_connection_request_rate() {
    let dir = temp_dir();
    let mut limits = Limits::default();
    limits.requests_per_second = 1;
    limits.request_burst = 6;
    let running = start_app(limits, &dir);
    let (addr, fp) = address(&running);
    let (alice, bob) = (person("alice", 3), person("bob", 4));
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;
    let mut b = registered_and_logged_in(addr, &fp, &bob).await;
    // Bob spends what is left of his connection's burst.
    let mut spent = 0;
    while b.request(Request::Users).await != Err(messenger_proto::ErrorCode::RateLimited) {
        spent += 1;
        assert!(spent <= 6, "the rate never ran out");
    }
    for round in 0..3u64 {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&round.to_be_bytes());
        let sent = a
            .send_request(Request::Send(OutgoingEnvelope {
                to: "bob".into(),
                to_device: 1,
                id,
                body: vec![5; 32],
            }))
            .await;
        let seq = loop {
            match b.frame().await.unwrap() {
                ServerFrame::Push(Push::Envelope(e)) => break e.seq,
                ServerFrame::Push(_) => {}
                other => panic!("round {round}: bob got {other:?}"),
            }
        };
        let ack = encode(&ClientFrame {
            id: NOTIFY_ID,
            request: Request::Ack { seqs: vec![seq] },
        })
        .unwrap();
        b.send.write_all(&ack).await.unwrap();
        loop {
            match a.frame().await.unwrap() {
                ServerFrame::Reply { id, result } => {
                    assert_eq!(id, sent);
                    let Ok(Reply::Accepted { seq: answered, .. }) = result else {
                        panic!("round {round}: {result:?}")
                    };
                    assert_eq!(answered, seq, "round {round}: answered from the mailbox");
                    break;
                }
                ServerFrame::Push(_) => {}
                other => panic!("round {round}: alice got {other:?}"),
            }
        }
    }
}

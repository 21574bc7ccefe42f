//! End-to-end benchmarks of the rendezvous server over real QUIC on
//! loopback, each measured next to a peer in the same run
//! (`docs/benchmarks.md`).
//!
//! `cargo bench -p messenger-rendezvous --bench server -- [store] [idle]`
//! (no scenario: all of them).
//!
//! The server runs in a child process (this same binary, re-executed with
//! `BENCH_ROLE=server`), pinned to CPU 1 with `taskset` when it exists; the
//! load generator is this process, a single-thread tokio runtime pinned to
//! CPU 0. Server CPU time and RSS are read from `/proc/<child>/`. The child
//! exits when its stdin closes, so it cannot outlive the parent; every temp
//! dir is a `tempfile::TempDir`.
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

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Person, ServerChild, bounded_local, client_endpoint, close, cpu_seconds, has_taskset, login,
    median, open, percentile, person, pin_self, print_machine, register, rss_bytes, spread,
};
use messenger_proto::msg::{DEFAULT_DEVICE, OutgoingEnvelope, Reply, Request, ServerFrame};
use messenger_rendezvous::limits::Limits;
use messenger_rendezvous::rate::Rate;
use messenger_rendezvous::server::ServerConfig;
use messenger_rendezvous::service::ServiceConfig;
use messenger_rendezvous::store::StoreOptions;
use messenger_rendezvous::tls::ServerIdentity;

/// Runs per measured point.
const RUNS: usize = 3;
/// Store scenario: concurrent senders, requests in flight each, body size.
const SENDERS: usize = 100;
const IN_FLIGHT: usize = 8;
const BODY: usize = 1024;
const WARM_UP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(10);
/// Idle scenario: connections held.
const IDLE_CONNS: usize = 10_000;
/// Handshakes/registrations in flight while connecting.
const CONNECT_CONCURRENCY: usize = 64;
/// Hard limit on the whole bench; the child also dies with our stdin.
const CHILD_LIFETIME: Duration = Duration::from_secs(900);

fn main() {
    if std::env::var("BENCH_ROLE").as_deref() == Ok("server") {
        server_main();
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs bench
    // targets without it, and this bench must not run there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("server bench: skipped (run it with `cargo bench --bench server`)");
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = args.is_empty();
    let want = |s: &str| all || args.iter().any(|a| a == s);
    pin_self();
    print_machine();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if want("store") {
        rt.block_on(store_scenario());
    }
    if want("idle") {
        rt.block_on(idle_scenario());
    }
}

// ---------------------------------------------------------- server child

/// Limits raised for load from one IP and many requests per connection.
fn bench_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_connections_per_ip = 2 * IDLE_CONNS;
    limits.requests_per_second = 10_000_000;
    limits.request_burst = 10_000_000;
    limits
}

fn server_main() {
    let mode = std::env::var("BENCH_MODE").unwrap();
    let data = PathBuf::from(std::env::var("BENCH_DATA").unwrap());
    // Die with the parent: its end of our stdin closes when it exits.
    std::thread::spawn(|| {
        let mut byte = [0u8; 1];
        let _ = std::io::stdin().read(&mut byte);
        std::process::exit(0);
    });
    std::thread::spawn(|| {
        std::thread::sleep(CHILD_LIFETIME);
        std::process::exit(2);
    });
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
                    two_phase_commit: std::env::var("BENCH_TWO_PHASE").as_deref() != Ok("0"),
                    ..StoreOptions::default()
                };
                let running = messenger_rendezvous::app::start(config, service, store).unwrap();
                println!("listening on {}", running.handle.local_addr());
                println!("certificate {}", running.handle.fingerprint());
                std::future::pending::<()>().await;
            }
            "bare" => bare_server(&data).await,
            other => panic!("unknown mode {other}"),
        }
    });
}

/// A bare quinn server with the same TLS and transport configuration that
/// only accepts connections and holds one bidi stream each.
async fn bare_server(data: &Path) {
    let limits = bench_limits();
    let identity = ServerIdentity::load_or_create(data).unwrap();
    let tls = messenger_rendezvous::net::tls_config(
        vec![identity.cert_der().clone()],
        identity.key_der().to_rustls(),
    )
    .unwrap();
    let config = messenger_rendezvous::net::quinn_config(tls, &limits).unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    println!("listening on {}", endpoint.local_addr().unwrap());
    println!("certificate {}", identity.fingerprint());
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Ok((_send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            let mut buf = [0u8; 64];
            while let Ok(Some(_)) = recv.read(&mut buf).await {}
            conn.closed().await;
        });
    }
}

// ---------------------------------------------------------------- clients

// ---------------------------------------------------------------- store

#[derive(Debug, Clone, Copy)]
struct StoreRun {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_s: f64,
    per_cpu_s: f64,
}

async fn store_scenario() {
    println!();
    println!(
        "== store: durable store-and-forward, {SENDERS} logged-in senders x {IN_FLIGHT} pipelined \
         requests, {BODY} B bodies, recipients offline, {}s warm-up + {}s measured, {RUNS} runs",
        WARM_UP.as_secs(),
        MEASURE.as_secs()
    );
    println!(
        "   server config for the bench: per-user send/request rate limits and per-connection \
         request rate raised to 10M/s, connections per IP {}, mailbox quotas unlimited; \
         durability and group commit as in production",
        2 * IDLE_CONNS
    );
    let mut ours_runs = Vec::new();
    for two_phase in [true, false] {
        let label = if two_phase {
            "two-phase commit (production default)"
        } else {
            "one-phase commit (StoreOptions::two_phase_commit = false)"
        };
        let mut runs = Vec::new();
        for run in 0..RUNS {
            let local = tokio::task::LocalSet::new();
            let r = local.run_until(store_run(two_phase)).await;
            println!(
                "   [{label}] run {}: {:.0} accepted msgs/s, accept latency p50 {:.2} ms p99 \
                 {:.2} ms, server CPU {:.2} s ({:.0} msgs per server CPU-second)",
                run + 1,
                r.rate,
                r.p50_ms,
                r.p99_ms,
                r.cpu_s,
                r.per_cpu_s
            );
            runs.push(r);
        }
        let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
        let p50: Vec<f64> = runs.iter().map(|r| r.p50_ms).collect();
        let p99: Vec<f64> = runs.iter().map(|r| r.p99_ms).collect();
        let per_cpu: Vec<f64> = runs.iter().map(|r| r.per_cpu_s).collect();
        println!(
            "   ours [{label}]: median {:.0} msgs/s (runs {}), p50 {:.2} ms, p99 {:.2} ms, {:.0} \
             msgs per server CPU-second (runs {})",
            median(&rates),
            spread(&rates),
            median(&p50),
            median(&p99),
            median(&per_cpu),
            spread(&per_cpu)
        );
        ours_runs.push((label, median(&rates), median(&per_cpu)));
    }
    for pipeline in [1u32, IN_FLIGHT as u32] {
        let mut redis = Vec::new();
        for _ in 0..RUNS {
            match redis_lpush(pipeline) {
                Some(r) => redis.push(r),
                None => {
                    println!("   redis-server/redis-benchmark not available: peer skipped");
                    return;
                }
            }
        }
        let rates: Vec<f64> = redis.iter().map(|r| r.rate).collect();
        let per_cpu: Vec<f64> = redis.iter().map(|r| r.per_cpu_s).collect();
        let p50: Vec<f64> = redis.iter().map(|r| r.p50_ms).collect();
        let p99: Vec<f64> = redis.iter().map(|r| r.p99_ms).collect();
        let theirs = median(&rates);
        let their_cpu = median(&per_cpu);
        println!(
            "   redis LPUSH appendfsync always, -c {SENDERS} -P {pipeline}: median {theirs:.0} \
             ops/s (runs {}), p50 {:.2} ms, p99 {:.2} ms, {their_cpu:.0} ops per server \
             CPU-second (runs {})",
            spread(&rates),
            median(&p50),
            median(&p99),
            spread(&per_cpu),
        );
        for (label, rate, cpu) in &ours_runs {
            println!(
                "      ratio ours [{label}] / redis -P {pipeline}: throughput {:.2}, per \
                 server CPU-second {:.2}",
                rate / theirs,
                cpu / their_cpu
            );
        }
    }
}

async fn store_run(two_phase: bool) -> StoreRun {
    let server = ServerChild::spawn_env(
        "ours",
        &[("BENCH_TWO_PHASE", if two_phase { "1" } else { "0" })],
    );
    let endpoint = client_endpoint(&server.fingerprint);
    let addr = server.addr;
    let recipients: Vec<Person> = (0..SENDERS).map(|i| person(format!("rcpt{i}"))).collect();
    let senders: Vec<Person> = (0..SENDERS).map(|i| person(format!("sndr{i}"))).collect();
    for p in &recipients {
        let c = register(&endpoint, addr, p).await;
        close(&c);
    }
    let mut clients = Vec::new();
    for p in &senders {
        let mut c = register(&endpoint, addr, p).await;
        login(&mut c, p).await;
        clients.push(c);
    }
    let start = Instant::now();
    let warm_end = start + WARM_UP;
    let end = warm_end + MEASURE;
    let pid = server.pid;
    let cpu = tokio::task::spawn_local(async move {
        tokio::time::sleep_until(warm_end.into()).await;
        let a = cpu_seconds(pid);
        tokio::time::sleep_until(end.into()).await;
        cpu_seconds(pid) - a
    });
    let mut set = tokio::task::JoinSet::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let to = format!("rcpt{i}");
        set.spawn_local(async move {
            let body = vec![0xA5u8; BODY];
            let mut in_flight: VecDeque<(u32, Instant)> = VecDeque::new();
            let mut latencies = Vec::new();
            let mut accepted = 0u64;
            for _ in 0..IN_FLIGHT {
                let at = Instant::now();
                let id = c.send_request(envelope(&to, &body)).await;
                in_flight.push_back((id, at));
            }
            while let Some((want, at)) = in_flight.pop_front() {
                // Pushes (e.g. "prekeys low" after login) are skipped.
                let (id, result) = loop {
                    match c.frame().await.unwrap() {
                        ServerFrame::Reply { id, result } => break (id, result),
                        ServerFrame::Push(_) => {}
                        other => panic!("unexpected {other:?}"),
                    }
                };
                assert_eq!(id, want, "replies come in order");
                assert!(matches!(result, Ok(Reply::Accepted { .. })), "{result:?}");
                let now = Instant::now();
                if now >= warm_end && now < end {
                    accepted += 1;
                    latencies.push(u32::try_from((now - at).as_micros()).unwrap_or(u32::MAX));
                }
                if now < end {
                    let at = Instant::now();
                    let id = c.send_request(envelope(&to, &body)).await;
                    in_flight.push_back((id, at));
                }
            }
            close(&c);
            (accepted, latencies)
        });
    }
    let mut accepted = 0;
    let mut latencies = Vec::new();
    while let Some(r) = set.join_next().await {
        let (a, l) = r.unwrap();
        accepted += a;
        latencies.extend(l);
    }
    let cpu_s = cpu.await.unwrap();
    latencies.sort_unstable();
    let rate = accepted as f64 / MEASURE.as_secs_f64();
    drop(server);
    StoreRun {
        rate,
        p50_ms: percentile(&latencies, 0.5) / 1000.0,
        p99_ms: percentile(&latencies, 0.99) / 1000.0,
        cpu_s,
        per_cpu_s: accepted as f64 / cpu_s,
    }
}

fn envelope(to: &str, body: &[u8]) -> Request {
    Request::Send(OutgoingEnvelope {
        to: to.to_owned(),
        to_device: DEFAULT_DEVICE,
        id: common::client_message_id(),
        body: body.to_vec(),
    })
}

/// One redis-benchmark LPUSH run against a fresh redis-server with
/// `appendfsync always`; None when redis is not installed.
fn redis_lpush(pipeline: u32) -> Option<StoreRun> {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let port_s = port.to_string();
    let mut cmd = if has_taskset() {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", "redis-server"]);
        c
    } else {
        Command::new("redis-server")
    };
    cmd.args([
        "--bind",
        "127.0.0.1",
        "--port",
        &port_s,
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--daemonize",
        "no",
        "--dir",
    ])
    .arg(dir.path())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().ok()?;
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let child = Kill(child);
    let cpu0 = cpu_seconds(pid);
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port_s])
        .args(["-c", &SENDERS.to_string(), "-n", "200000", "-d"])
        .arg(BODY.to_string())
        .args(["-t", "lpush", "-P", &pipeline.to_string(), "--csv"])
        .output()
        .ok()?;
    let cpu_s = cpu_seconds(pid) - cpu0;
    drop(child);
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text.lines().find(|l| l.starts_with("\"LPUSH"))?;
    let f: Vec<f64> = line
        .split(',')
        .skip(1)
        .map(|s| s.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    Some(StoreRun {
        rate: f[0],
        p50_ms: f[3],
        p99_ms: f[5],
        cpu_s,
        per_cpu_s: 200_000.0 / cpu_s,
    })
}

// ----------------------------------------------------------------- idle

async fn idle_scenario() {
    println!();
    println!(
        "== idle: {IDLE_CONNS} connections held from one client endpoint (one UDP socket, so the \
         fd limit does not apply), server RSS delta per connection, {RUNS} rounds, each on a fresh server process"
    );
    println!(
        "   (per-connection slot sizes: Push {} B; the push queue holds boxed pushes, so a \
         32-slot tokio mpsc block is {} B instead of {} B; replies are written directly)",
        std::mem::size_of::<messenger_proto::msg::Push>(),
        32 * std::mem::size_of::<Box<messenger_proto::msg::Push>>(),
        32 * std::mem::size_of::<messenger_proto::msg::Push>(),
    );
    let local = tokio::task::LocalSet::new();
    let ours = local.run_until(idle_ours()).await;
    let local = tokio::task::LocalSet::new();
    let bare = local.run_until(idle_bare()).await;
    let o = median(&ours);
    let b = median(&bare);
    println!(
        "   ours (registered, logged in, control stream open): median {o:.0} B/conn (rounds {})",
        spread(&ours)
    );
    println!(
        "   bare quinn probe (same TLS + TransportConfig, one bidi stream held): median {b:.0} \
         B/conn (rounds {})",
        spread(&bare)
    );
    println!(
        "   difference ours - bare: {:.0} B per connection (goal <= 4096)",
        o - b
    );
}

async fn settle(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_bytes(pid)
}

/// One round per fresh server process: after connections close, glibc
/// keeps their memory for reuse, so a second round on the same process
/// would under-count.
async fn idle_ours() -> Vec<f64> {
    let people: Vec<Arc<Person>> = (0..IDLE_CONNS)
        .map(|i| Arc::new(person(format!("idle{i}"))))
        .collect();
    let mut per_conn = Vec::new();
    for round in 0..RUNS {
        let server = ServerChild::spawn_env("ours", &[]);
        let endpoint = client_endpoint(&server.fingerprint);
        let addr = server.addr;
        let t = Instant::now();
        {
            let people = people.clone();
            let e = endpoint.clone();
            bounded_local(IDLE_CONNS, CONNECT_CONCURRENCY, move |i| {
                let p = Arc::clone(&people[i]);
                let e = e.clone();
                async move {
                    let c = register(&e, addr, &p).await;
                    close(&c);
                }
            })
            .await;
        }
        let registered = t.elapsed().as_secs_f64();
        let before = settle(server.pid).await;
        let t = Instant::now();
        let people = people.clone();
        let e = endpoint.clone();
        let clients = bounded_local(IDLE_CONNS, CONNECT_CONCURRENCY, move |i| {
            let p = Arc::clone(&people[i]);
            let e = e.clone();
            async move {
                let mut c = open(&e, addr).await;
                login(&mut c, &p).await;
                c
            }
        })
        .await;
        let took = t.elapsed().as_secs_f64();
        let after = settle(server.pid).await;
        let alive = clients
            .iter()
            .filter(|c| c.conn.close_reason().is_none())
            .count();
        let d = (after as f64 - before as f64) / IDLE_CONNS as f64;
        println!(
            "   ours round {}: registered {IDLE_CONNS} users in {registered:.1} s (those \
             connections closed), then {alive} alive, connected+logged in at {:.0} conn/s, RSS \
             {:.1} -> {:.1} MiB, {d:.0} B/conn",
            round + 1,
            IDLE_CONNS as f64 / took,
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
        per_conn.push(d);
        for c in &clients {
            close(c);
        }
        drop(clients);
        drop(server);
    }
    per_conn
}

async fn idle_bare() -> Vec<f64> {
    let mut per_conn = Vec::new();
    for round in 0..RUNS {
        let server = ServerChild::spawn_env("bare", &[]);
        let endpoint = client_endpoint(&server.fingerprint);
        let addr = server.addr;
        let before = settle(server.pid).await;
        let t = Instant::now();
        let e = endpoint.clone();
        let clients = bounded_local(IDLE_CONNS, CONNECT_CONCURRENCY, move |_| {
            let e = e.clone();
            async move {
                let conn = support::connect_raw(&e, addr).await.unwrap();
                let (mut send, recv) = conn.open_bi().await.unwrap();
                send.write_all(&[0]).await.unwrap();
                (conn, send, recv)
            }
        })
        .await;
        let took = t.elapsed().as_secs_f64();
        let after = settle(server.pid).await;
        let d = (after as f64 - before as f64) / IDLE_CONNS as f64;
        println!(
            "   bare round {}: connected at {:.0} conn/s, RSS {:.1} -> {:.1} MiB, {d:.0} B/conn",
            round + 1,
            IDLE_CONNS as f64 / took,
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
        per_conn.push(d);
        for (c, _, _) in &clients {
            c.close(0u32.into(), b"bye");
        }
        drop(clients);
        drop(server);
    }
    per_conn
}

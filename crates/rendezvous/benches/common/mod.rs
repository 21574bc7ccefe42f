//! Pieces shared by the end-to-end bench binaries (`server`, `relay`):
//! CPU pinning and `/proc` readings, the server child process, test users,
//! and the statistics printed. Each bench declares `mod support;` (the
//! network tests' client) at its root; this module uses it from there.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    unreachable_pub,
    dead_code
)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use messenger_crypto::identity::IdentityKeyPair;
use messenger_crypto::prekey::{OneTimePrekeyPair, PrekeyIdCounter, SignedPrekeyPair};
use messenger_proto::msg::{Login, Register, Reply, Request};

use crate::support::{self, TestClient};

// ---------------------------------------------------------------- machine

/// Whether `BENCH_NO_PIN` asks for nothing to be pinned: the server and
/// the load generator then share both CPUs (not the rule of
/// performance.md §5; for comparison only).
fn unpinned() -> bool {
    std::env::var_os("BENCH_NO_PIN").is_some()
}

/// Whether processes are pinned: `taskset` exists and `BENCH_NO_PIN` is
/// not set.
pub fn has_taskset() -> bool {
    if unpinned() {
        return false;
    }
    Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pins this process (all its threads) to CPU 0 when `taskset` exists.
pub fn pin_self() {
    if has_taskset() {
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", "0", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        println!(
            "load generator pinned to CPU 0: {ok}; server child pinned to CPU 1 (taskset -c 1)"
        );
    } else if unpinned() {
        println!("BENCH_NO_PIN set: nothing pinned (server and load generator share the CPUs)");
    } else {
        println!("taskset not found: nothing pinned");
    }
}

pub fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!("machine: {cpus} CPU(s) available to this pinned process, {model}");
}

/// The 1-minute load average, to note how busy the box was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// The system-wide count of UDP datagrams dropped because a socket's
/// receive buffer was full (`Udp: RcvbufErrors` in `/proc/net/snmp`).
pub fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Datagrams dropped so far by the IPv4 UDP socket bound to local `port`
/// (the `drops` column of `/proc/net/udp`), if there is one.
pub fn udp_socket_drops(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let want = format!(":{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1)?.ends_with(&want)).then(|| f.last()?.parse().ok())?
    })
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A message id as the client makes one (`messenger-client`'s
/// `engine::message_id`): the send time in milliseconds since the Unix
/// epoch, big-endian, then 8 random bytes. The server's dedupe index is
/// keyed by it first, so the bench must not use friendlier ids than real
/// clients do.
pub fn client_message_id() -> [u8; 16] {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&millis.to_be_bytes());
    id[8..].copy_from_slice(&rand::random::<[u8; 8]>());
    id
}

/// utime + stime of `pid` in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / clk_tck()
}

/// Resident set of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A command pinned to CPU 1 with `taskset` when it exists (`taskset`
/// execs the program, so the child's pid is the program's).
pub fn pinned_command(program: &std::path::Path) -> Command {
    pinned_command_wrapped(program, &[])
}

/// [`pinned_command`] with `program` run under `wrap` (a profiler and its
/// arguments, e.g. from `BENCH_SERVER_WRAP`), pinned too.
pub fn pinned_command_wrapped(program: &std::path::Path, wrap: &[String]) -> Command {
    if has_taskset() {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).args(wrap).arg(program);
        c
    } else if let Some((first, rest)) = wrap.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg(program);
        c
    } else {
        Command::new(program)
    }
}

// ---------------------------------------------------------- server child

/// In the child: exit when the parent's end of our stdin closes, and after
/// `lifetime` at the latest.
pub fn die_with_parent(lifetime: Duration) {
    std::thread::spawn(|| {
        let mut byte = [0u8; 1];
        let _ = std::io::stdin().read(&mut byte);
        std::process::exit(0);
    });
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        std::process::exit(2);
    });
}

/// This bench binary re-executed with `BENCH_ROLE=server`, `BENCH_MODE`,
/// `BENCH_DATA` (a temp dir, deleted on drop) and `env`, pinned to CPU 1.
/// The child prints `listening on <addr>` and `certificate <fingerprint>`.
/// `BENCH_SERVER_WRAP="heaptrack -o /tmp/h"` runs it under a profiler,
/// whose own output lines are skipped (RSS and CPU figures of such a run
/// are not comparable).
pub struct ServerChild {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub fingerprint: String,
    _dir: tempfile::TempDir,
}

impl ServerChild {
    pub fn spawn_env(mode: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let wrap: Vec<String> = std::env::var("BENCH_SERVER_WRAP")
            .map(|w| w.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let mut cmd = pinned_command_wrapped(&exe, &wrap);
        cmd.env("BENCH_ROLE", "server")
            .env("BENCH_MODE", mode)
            .env("BENCH_DATA", dir.path().join("data"))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap();
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut wanted = |prefix: &str| loop {
            let line = lines.next().unwrap().unwrap();
            if line.starts_with(prefix) {
                break line;
            }
        };
        let addr = wanted("listening on ");
        let cert = wanted("certificate ");
        // Keep draining stdout so the child never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            pid,
            addr: addr.trim_start_matches("listening on ").parse().unwrap(),
            fingerprint: cert.trim_start_matches("certificate ").to_owned(),
            _dir: dir,
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback TCP port (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Waits (bounded) until something accepts TCP connections on `port`;
/// false if `child` exits first or 10 s pass.
pub fn wait_for_port(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

// ---------------------------------------------------------------- clients

pub struct Person {
    pub name: String,
    pub id: IdentityKeyPair,
    pub register: Register,
}

/// A user with keys and one one-time prekey.
pub fn person(name: String) -> Person {
    person_with(name, 1)
}

/// A user with keys and `one_time_prekeys` one-time prekeys.
pub fn person_with(name: String, one_time_prekeys: u32) -> Person {
    let mut rng = rand::rng();
    let id = IdentityKeyPair::generate(&mut rng);
    let spk = SignedPrekeyPair::generate(&id, &mut PrekeyIdCounter::new(), &mut rng).unwrap();
    let opks =
        OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::new(), one_time_prekeys, &mut rng)
            .unwrap();
    let register = Register {
        username: name.clone(),
        identity: id.public().to_bytes(),
        signed_prekey: spk.public().to_bytes(),
        one_time_prekeys: opks.iter().map(|k| k.public().to_bytes()).collect(),
        invite: None,
    };
    Person { name, id, register }
}

/// Handshake, control stream, preface and hello.
pub async fn open(endpoint: &quinn::Endpoint, addr: SocketAddr) -> TestClient {
    let conn = support::connect_raw(endpoint, addr).await.unwrap();
    TestClient::on(endpoint.clone(), conn).await
}

/// A new connection on which `p` registers.
pub async fn register(endpoint: &quinn::Endpoint, addr: SocketAddr, p: &Person) -> TestClient {
    let mut c = open(endpoint, addr).await;
    let r = c.request(Request::Register(p.register.clone())).await;
    assert_eq!(r, Ok(Reply::Ok), "register {}", p.name);
    c
}

/// `Login` with the channel-binding signature over this connection's
/// nonce and exporter.
pub async fn login(c: &mut TestClient, p: &Person) {
    let sig = p.id.sign_login(&c.hello.nonce, &c.exporter());
    let r = c
        .request(Request::Login(Login {
            username: p.name.clone(),
            signature: sig.to_vec(),
        }))
        .await;
    assert!(matches!(r, Ok(Reply::LoggedIn { .. })), "{r:?}");
}

pub fn close(c: &TestClient) {
    c.conn.close(0u32.into(), b"bye");
}

pub fn client_endpoint(fingerprint: &str) -> quinn::Endpoint {
    support::client_endpoint(fingerprint)
}

/// A client endpoint like [`client_endpoint`] whose UDP socket asks for
/// `buffer` bytes of send and receive buffer (the kernel caps it at
/// `net.core.{r,w}mem_max`); returns the receive buffer granted too.
pub fn client_endpoint_buffered(fingerprint: &str, buffer: usize) -> (quinn::Endpoint, usize) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let state = quinn::udp::UdpSocketState::new((&socket).into()).unwrap();
    let _ = state.set_recv_buffer_size((&socket).into(), buffer);
    let _ = state.set_send_buffer_size((&socket).into(), buffer);
    let granted = state.recv_buffer_size((&socket).into()).unwrap_or(0);
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let tls = messenger_rendezvous::pin::pinned_client_config(fingerprint).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    (endpoint, granted)
}

/// Runs `f(i)` for `0..n` with at most `concurrency` at once, in this
/// (single-thread) runtime's `LocalSet`.
pub async fn bounded_local<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + 'static,
    T: 'static,
{
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < n || !set.is_empty() {
        while next < n && set.len() < concurrency {
            let fut = f(next);
            let i = next;
            set.spawn_local(async move { (i, fut.await) });
            next += 1;
        }
        let (i, v) = set.join_next().await.unwrap().unwrap();
        out[i] = Some(v);
    }
    out.into_iter().map(Option::unwrap).collect()
}

// ------------------------------------------------------------- statistics

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i])
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

pub fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}–{max:.0}")
}

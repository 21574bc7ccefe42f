//! Helpers for tests against the real server (`app::start`: the service
//! and store behind the network layer) on 127.0.0.1: start-up, people with
//! real keys, registration, channel-bound login, signed rosters.

use std::net::SocketAddr;
use std::time::Duration;

use messenger_crypto::identity::IdentityKeyPair;
use messenger_crypto::prekey::{OneTimePrekeyPair, PrekeyIdCounter, SignedPrekeyPair};
use messenger_proto::msg::{Login, OutgoingEnvelope, Register, Reply, Request, SignedRoster};
use messenger_rendezvous::app::{self, Running};
use messenger_rendezvous::limits::Limits;
use messenger_rendezvous::rate::Rate;
use messenger_rendezvous::server::ServerConfig;
use messenger_rendezvous::service::ServiceConfig;
use messenger_rendezvous::store::StoreOptions;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tempfile::TempDir;

use super::TestClient;

/// Rates high enough that only the limit a test sets is ever reached.
pub fn fast_service() -> ServiceConfig {
    ServiceConfig {
        send_rate: Rate::per(1_000_000, Duration::from_secs(1), 1_000_000),
        bundle_rate: Rate::per(1_000_000, Duration::from_secs(1), 1_000_000),
        request_rate: Rate::per(1_000_000, Duration::from_secs(1), 1_000_000),
        ..ServiceConfig::default()
    }
}

/// A temporary directory in memory when the system has one: every stored
/// envelope is an `fsync`, and tmpfs keeps that fast.
pub fn temp_dir() -> TempDir {
    if std::path::Path::new("/dev/shm").is_dir()
        && let Ok(dir) = tempfile::tempdir_in("/dev/shm")
    {
        return dir;
    }
    tempfile::tempdir().unwrap()
}

/// The real server on 127.0.0.1:0 with these settings, data in `dir`.
pub fn start_with(
    dir: &TempDir,
    limits: Limits,
    service: ServiceConfig,
    store: StoreOptions,
) -> Running {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    config.limits = limits;
    app::start(config, service, store).unwrap()
}

/// [`start_with`] the [`fast_service`] and the default store.
pub fn start_app(limits: Limits, dir: &TempDir) -> Running {
    start_with(dir, limits, fast_service(), StoreOptions::default())
}

/// The running server's address and certificate fingerprint.
pub fn address(running: &Running) -> (SocketAddr, String) {
    (
        running.handle.local_addr(),
        running.handle.fingerprint().to_owned(),
    )
}

pub struct Person {
    pub name: String,
    pub id: IdentityKeyPair,
    pub spk: SignedPrekeyPair,
    pub opks: Vec<OneTimePrekeyPair>,
    pub counter: PrekeyIdCounter,
}

/// A user with `opks` one-time prekeys, made from `seed`.
pub fn person_with(name: &str, seed: u64, opks: u32) -> Person {
    let mut rng = StdRng::seed_from_u64(seed);
    let id = IdentityKeyPair::generate(&mut rng);
    let mut counter = PrekeyIdCounter::new();
    let spk = SignedPrekeyPair::generate(&id, &mut counter, &mut rng).unwrap();
    let opks = OneTimePrekeyPair::generate_batch(&mut counter, opks, &mut rng).unwrap();
    Person {
        name: name.to_owned(),
        id,
        spk,
        opks,
        counter,
    }
}

/// A user with five one-time prekeys.
pub fn person(name: &str, seed: u64) -> Person {
    person_with(name, seed, 5)
}

pub fn register_fields(p: &Person) -> Register {
    Register {
        username: p.name.clone(),
        identity: p.id.public().to_bytes(),
        signed_prekey: p.spk.public().to_bytes(),
        one_time_prekeys: p.opks.iter().map(|k| k.public().to_bytes()).collect(),
        invite: None,
    }
}

pub fn register(p: &Person) -> Request {
    Request::Register(register_fields(p))
}

/// `p`'s login, signed over `c`'s nonce and channel binding.
pub fn login_request(c: &TestClient, p: &Person) -> Request {
    let sig = p.id.sign_login(&c.hello.nonce, &c.exporter());
    Request::Login(Login {
        username: p.name.clone(),
        signature: sig.to_vec(),
    })
}

/// Logs `p` in on `c`; returns the `LoggedIn` reply.
pub async fn login(c: &mut TestClient, p: &Person) -> Reply {
    let r = c.request(login_request(c, p)).await;
    assert!(matches!(r, Ok(Reply::LoggedIn { .. })), "{r:?}");
    r.unwrap()
}

/// A new connection logged in as `p` (registered already).
pub async fn logged_in(addr: SocketAddr, fp: &str, p: &Person) -> TestClient {
    let mut c = TestClient::connect(addr, fp).await;
    login(&mut c, p).await;
    c
}

pub async fn registered_and_logged_in(addr: SocketAddr, fp: &str, p: &Person) -> TestClient {
    let mut c = TestClient::connect(addr, fp).await;
    assert_eq!(c.request(register(p)).await, Ok(Reply::Ok));
    login(&mut c, p).await;
    c
}

/// Registers each of `people` on one short-lived connection.
pub async fn register_all(addr: SocketAddr, fp: &str, people: &[&Person]) {
    let mut c = TestClient::connect(addr, fp).await;
    for p in people {
        assert_eq!(c.request(register(p)).await, Ok(Reply::Ok), "{}", p.name);
    }
    c.conn.close(0u32.into(), b"done");
}

/// `a` (logged in as `a_name`) asks `b_name` to be friends and `b` accepts.
pub async fn make_friends(a: &mut TestClient, a_name: &str, b: &mut TestClient, b_name: &str) {
    let asked = a
        .request(Request::FriendRequest {
            username: b_name.to_owned(),
        })
        .await;
    assert_eq!(asked, Ok(Reply::Ok));
    let accepted = b
        .request(Request::FriendAccept {
            username: a_name.to_owned(),
        })
        .await;
    assert_eq!(accepted, Ok(Reply::Ok));
}

/// A roster of `members` (sorted here) signed by `owner`.
pub fn roster(owner: &Person, group: &str, version: u64, members: &[&str]) -> SignedRoster {
    super::roster::signed_roster(&owner.name, &owner.id, group, version, members)
}

/// A 1:1 envelope with id `[id; 16]`.
pub fn send(to: &str, id: u8, body: &[u8]) -> Request {
    Request::Send(OutgoingEnvelope {
        to: to.into(),
        to_device: 1,
        id: [id; 16],
        body: body.to_vec(),
    })
}

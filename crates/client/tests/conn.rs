//! The client connection against a real rendezvous server started in this
//! process (`messenger_rendezvous::app`, temporary data directory,
//! 127.0.0.1, port 0): pinning and trust on first use, the pinned
//! certificate served with another key (T-44), an unreachable address,
//! register + login + requests, pushes while requests are outstanding, typed
//! server errors, and a connection replaced by a second login.
//!
//! Every wait is bounded by [`WAIT`]; servers stop when their handles drop.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    unreachable_pub
)]

use std::sync::Arc;
use std::time::Duration;

use messenger_client::conn::{
    ClosedReason, ConnError, ConnectOptions, Connection, LoggedIn, PinPolicy,
};
use messenger_crypto::identity::{IdentityKeyPair, Username};
use messenger_crypto::prekey::{OneTimePrekeyPair, PrekeyIdCounter, SignedPrekeyPair};
use messenger_proto::ErrorCode;
use messenger_proto::msg::{Push, Register, Reply, Request};
use messenger_rendezvous::app::{self, Running};
use messenger_rendezvous::limits::Limits;
use messenger_rendezvous::net::quinn_config;
use messenger_rendezvous::server::ServerConfig;
use messenger_rendezvous::service::ServiceConfig;
use messenger_rendezvous::store::StoreOptions;
use messenger_rendezvous::tls::ServerIdentity;
use messenger_transport::certificate_fingerprint;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// One-time prekeys per test user: above the server's low-water mark, so
/// logins do not push `PrekeysLow`.
const OPKS: u32 = 25;

struct Server {
    running: Running,
    _dir: TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
        let running =
            app::start(config, ServiceConfig::default(), StoreOptions::default()).unwrap();
        Self { running, _dir: dir }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.running.handle.local_addr()
    }

    fn fingerprint(&self) -> String {
        self.running.handle.fingerprint().to_owned()
    }

    fn pin(&self) -> PinPolicy {
        PinPolicy::Pinned(self.fingerprint())
    }

    async fn connect(&self) -> Connection {
        timeout(
            WAIT,
            Connection::connect(self.addr(), &self.pin(), &ConnectOptions::default()),
        )
        .await
        .unwrap()
        .unwrap()
    }
}

struct User {
    name: Username,
    id: IdentityKeyPair,
}

impl User {
    fn new(name: &str, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Self {
            name: Username::parse(name).unwrap(),
            id: IdentityKeyPair::generate(&mut rng),
        }
    }

    fn register(&self, seed: u64) -> Request {
        let mut rng = StdRng::seed_from_u64(seed);
        let spk =
            SignedPrekeyPair::generate(&self.id, &mut PrekeyIdCounter::new(), &mut rng).unwrap();
        let opks =
            OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::new(), OPKS, &mut rng).unwrap();
        Request::Register(Register {
            username: self.name.as_str().to_owned(),
            identity: self.id.public().to_bytes(),
            signed_prekey: spk.public().to_bytes(),
            one_time_prekeys: opks.iter().map(|k| k.public().to_bytes()).collect(),
            invite: None,
        })
    }
}

async fn ask(conn: &Connection, request: Request) -> Result<Reply, ConnError> {
    timeout(WAIT, conn.request(request)).await.unwrap()
}

async fn login(server: &Server, user: &User) -> Connection {
    let conn = server.connect().await;
    let logged_in = timeout(WAIT, conn.login(&user.name, &user.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(logged_in.prekeys, OPKS);
    conn
}

/// Reads pushes until one satisfies `wanted`; returns it.
async fn push_where(pushes: &mut mpsc::Receiver<Push>, wanted: impl Fn(&Push) -> bool) -> Push {
    timeout(WAIT, async {
        loop {
            let push = pushes.recv().await.expect("push channel open");
            if wanted(&push) {
                return push;
            }
        }
    })
    .await
    .expect("the push arrives in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_use_learns_the_printed_fingerprint_then_register_login_and_request() {
    let server = Server::start();
    let conn = timeout(
        WAIT,
        Connection::connect(
            server.addr(),
            &PinPolicy::TrustOnFirstUse,
            &ConnectOptions::default(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    // The fingerprint the server prints is the one learned.
    assert_eq!(conn.fingerprint(), server.fingerprint());
    assert_eq!(conn.server_key(), server.running.server_key);

    let alice = User::new("Alice", 1);
    assert_eq!(ask(&conn, alice.register(2)).await.unwrap(), Reply::Ok);
    let logged_in = timeout(WAIT, conn.login(&alice.name, &alice.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(logged_in.pending, 0);
    assert_eq!(logged_in.prekeys, OPKS);
    match ask(&conn, Request::Users).await.unwrap() {
        Reply::Users { users } => {
            let names: Vec<_> = users.iter().map(|u| u.username.as_str()).collect();
            assert_eq!(names, ["alice"]);
            assert_eq!(users[0].identity, alice.id.public().to_bytes());
        }
        other => panic!("unexpected {other:?}"),
    }
    timeout(WAIT, conn.close()).await.unwrap();

    // Pinned to what was learned, a second connection works too.
    let again = server.connect().await;
    assert_eq!(again.fingerprint(), server.fingerprint());
    timeout(WAIT, again.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_a_mismatch_with_both_fingerprints() {
    let server = Server::start();
    let wrong = certificate_fingerprint(b"some other certificate");
    let error = timeout(
        WAIT,
        Connection::connect(
            server.addr(),
            &PinPolicy::Pinned(wrong.clone()),
            &ConnectOptions::default(),
        ),
    )
    .await
    .unwrap()
    .unwrap_err();
    match &error {
        ConnError::CertificateMismatch { expected, actual } => {
            assert_eq!(*expected, wrong);
            assert_eq!(*actual, server.fingerprint());
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = error.to_string();
    assert!(
        text.contains(&wrong) && text.contains(&server.fingerprint()),
        "{text}"
    );

    // A malformed pin never reaches the network.
    let error = Connection::connect(
        server.addr(),
        &PinPolicy::Pinned("SHA256:short".into()),
        &ConnectOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, ConnError::BadPin(_)), "{error:?}");
}

/// Serves a fixed certificate with a fixed key, whether or not they match.
#[derive(Debug)]
struct Impostor(Arc<CertifiedKey>);

impl ResolvesServerCert for Impostor {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// T-44: the pinned certificate, served by someone without its key, is
/// refused as not proven, pinned or on first use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pinned_certificate_with_another_key_is_not_proven() {
    let dir = tempfile::tempdir().unwrap();
    let real = ServerIdentity::load_or_create(&dir.path().join("real")).unwrap();
    let stranger = ServerIdentity::load_or_create(&dir.path().join("stranger")).unwrap();
    let key =
        rustls::crypto::ring::sign::any_supported_type(&stranger.key_der().to_rustls()).unwrap();
    let certified = CertifiedKey::new(vec![real.cert_der().clone()], key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Impostor(Arc::new(certified))));
    tls.alpn_protocols = vec![messenger_proto::ALPN.to_vec()];
    let config = quinn_config(tls, &Limits::default()).unwrap();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accepting = endpoint.clone();
    let acceptor = tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            if let Ok(connecting) = incoming.accept() {
                let _ = connecting.await;
            }
        }
    });

    for pin in [
        PinPolicy::Pinned(real.fingerprint().to_owned()),
        PinPolicy::TrustOnFirstUse,
    ] {
        let error = timeout(
            WAIT,
            Connection::connect(addr, &pin, &ConnectOptions::default()),
        )
        .await
        .unwrap()
        .unwrap_err();
        match &error {
            ConnError::NotProven { fingerprint } => assert_eq!(fingerprint, real.fingerprint()),
            other => panic!("{pin:?}: unexpected {other:?}"),
        }
        assert!(
            error.to_string().contains("did not prove it holds its key"),
            "{error}"
        );
    }
    endpoint.close(0u32.into(), b"");
    acceptor.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_unreachable_within_the_timeout() {
    // A port that was free a moment ago: nothing answers there.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    drop(socket);
    let mut options = ConnectOptions::default();
    options.connect_timeout = Duration::from_millis(300);
    let error = timeout(
        WAIT,
        Connection::connect(addr, &PinPolicy::TrustOnFirstUse, &options),
    )
    .await
    .expect("gives up within its own timeout")
    .unwrap_err();
    match &error {
        ConnError::Unreachable { addr: got } => assert_eq!(*got, addr),
        other => panic!("unexpected {other:?}"),
    }
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_come_back_typed() {
    let server = Server::start();
    let conn = server.connect().await;
    // Before login.
    let error = ask(&conn, Request::Users).await.unwrap_err();
    assert!(
        matches!(error, ConnError::Server(ErrorCode::NotAuthenticated)),
        "{error:?}"
    );
    assert!(error.to_string().contains("not logged in"), "{error}");
    // A login for nobody.
    let ghost = User::new("ghost", 3);
    let error = timeout(WAIT, conn.login(&ghost.name, &ghost.id))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(error, ConnError::Server(ErrorCode::UserNotExist)),
        "{error:?}"
    );
    // A login with the wrong key.
    let alice = User::new("alice", 4);
    assert_eq!(ask(&conn, alice.register(5)).await.unwrap(), Reply::Ok);
    let error = timeout(WAIT, conn.login(&alice.name, &ghost.id))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(error, ConnError::Server(ErrorCode::BadSignature)),
        "{error:?}"
    );
    // Registering the same name again.
    let error = ask(&conn, alice.register(6)).await.unwrap_err();
    assert!(
        matches!(error, ConnError::Server(ErrorCode::UserExists)),
        "{error:?}"
    );
    // The connection still works after errors.
    let logged_in: LoggedIn = timeout(WAIT, conn.login(&alice.name, &alice.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(logged_in.prekeys, OPKS);
    timeout(WAIT, conn.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_arrive_while_requests_are_outstanding() {
    let server = Server::start();
    let alice = User::new("alice", 10);
    let bob = User::new("bob", 11);
    {
        let setup = server.connect().await;
        assert_eq!(ask(&setup, alice.register(12)).await.unwrap(), Reply::Ok);
        assert_eq!(ask(&setup, bob.register(13)).await.unwrap(), Reply::Ok);
        timeout(WAIT, setup.close()).await.unwrap();
    }
    let a = Arc::new(login(&server, &alice).await);
    let mut a_pushes = a.take_pushes().unwrap();
    assert!(a.take_pushes().is_none(), "the receiver is handed out once");
    let b = login(&server, &bob).await;
    let mut b_pushes = b.take_pushes().unwrap();

    // Alice keeps many requests in flight from several tasks while Bob's
    // friend request reaches her as a push; every reply must go to the
    // task that asked (a prekey status for one, a friend list for the other).
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..32 {
        let a = Arc::clone(&a);
        tasks.spawn(async move {
            let request = if i % 2 == 0 {
                Request::PrekeyStatus
            } else {
                Request::FriendList
            };
            let reply = a.request(request).await.unwrap();
            match (i % 2, reply) {
                (0, Reply::PrekeyStatus { remaining, .. }) => assert_eq!(remaining, OPKS),
                (1, Reply::Friends { .. }) => {}
                (_, other) => panic!("request {i} got {other:?}"),
            }
        });
    }
    let request = Request::FriendRequest {
        username: "alice".into(),
    };
    assert_eq!(ask(&b, request).await.unwrap(), Reply::Ok);
    let push = push_where(&mut a_pushes, |p| matches!(p, Push::FriendRequest { .. })).await;
    assert_eq!(push, Push::FriendRequest { from: "bob".into() });
    while let Some(done) = timeout(WAIT, tasks.join_next()).await.unwrap() {
        done.unwrap();
    }

    // Friends now: Bob hears the answer, then each sees the other's
    // presence, with the identity key, across Bob's reconnect.
    let accept = Request::FriendAccept {
        username: "bob".into(),
    };
    assert_eq!(ask(&a, accept).await.unwrap(), Reply::Ok);
    let answer = push_where(&mut b_pushes, |p| matches!(p, Push::FriendAnswer { .. })).await;
    assert_eq!(
        answer,
        Push::FriendAnswer {
            from: "alice".into(),
            accepted: true
        }
    );
    timeout(WAIT, b.close()).await.unwrap();
    let offline = push_where(&mut a_pushes, |p| {
        matches!(p, Push::Presence { online: false, .. })
    })
    .await;
    assert!(matches!(offline, Push::Presence { ref username, .. } if username == "bob"));
    let b = login(&server, &bob).await;
    let online = push_where(&mut a_pushes, |p| {
        matches!(p, Push::Presence { online: true, .. })
    })
    .await;
    assert_eq!(
        online,
        Push::Presence {
            username: "bob".into(),
            online: true,
            identity: bob.id.public().to_bytes(),
        }
    );
    timeout(WAIT, b.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_login_replaces_the_first_connection() {
    let server = Server::start();
    let alice = User::new("alice", 20);
    let first = server.connect().await;
    assert_eq!(ask(&first, alice.register(21)).await.unwrap(), Reply::Ok);
    timeout(WAIT, first.login(&alice.name, &alice.id))
        .await
        .unwrap()
        .unwrap();
    let mut pushes = first.take_pushes().unwrap();
    assert_eq!(first.close_reason(), None);

    let second = login(&server, &alice).await;

    // The first connection hears why, then ends.
    assert_eq!(
        push_where(&mut pushes, |_| true).await,
        Push::Replaced,
        "the Replaced push comes first"
    );
    assert!(
        timeout(WAIT, pushes.recv()).await.unwrap().is_none(),
        "the push channel ends with the connection"
    );
    let reason = timeout(WAIT, first.closed()).await.unwrap();
    assert_eq!(reason, ClosedReason::Replaced);
    assert_eq!(first.close_reason(), Some(ClosedReason::Replaced));
    let error = ask(&first, Request::Users).await.unwrap_err();
    match &error {
        ConnError::Closed { reason } => assert_eq!(*reason, ClosedReason::Replaced),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        error
            .to_string()
            .contains("logged in on another connection"),
        "{error}"
    );

    // The second connection is the live one.
    assert!(matches!(
        ask(&second, Request::Users).await.unwrap(),
        Reply::Users { .. }
    ));
    timeout(WAIT, second.close()).await.unwrap();
    timeout(WAIT, first.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shutting_down_closes_with_that_reason() {
    let server = Server::start();
    let conn = server.connect().await;
    let mut pushes = conn.take_pushes().unwrap();
    let Server { running, _dir } = server;
    timeout(WAIT, running.handle.shutdown()).await.unwrap();
    assert!(timeout(WAIT, pushes.recv()).await.unwrap().is_none());
    assert_eq!(
        timeout(WAIT, conn.closed()).await.unwrap(),
        ClosedReason::ShuttingDown
    );
    let error = ask(&conn, Request::Users).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnError::Closed {
                reason: ClosedReason::ShuttingDown
            }
        ),
        "{error:?}"
    );
}

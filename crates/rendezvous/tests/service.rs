//! The service over a real store in a temporary directory: every request
//! kind, the authorisation rules and the pushes, without sockets. (The
//! network layer and the real binary are tested on their own.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "support/roster.rs"]
mod roster;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use messenger_crypto::identity::{IdentityKeyPair, SigningContext};
use messenger_crypto::prekey::{OneTimePrekeyPair, PrekeyIdCounter, SignedPrekeyPair};
use messenger_proto::ErrorCode;
use messenger_proto::msg::{
    Login, OutgoingEnvelope, Push, Register, Reply, Request, SignedAnnouncement, SignedRoster,
    UserInfo, announcement_signed_bytes,
};
use messenger_rendezvous::rate::Rate;
use messenger_rendezvous::service::{
    Clock, LIVE_SEQ_BIT, PushTarget, Service, ServiceConfig, Session, USERS_PAGE,
};
use messenger_rendezvous::store::{Store, StoreOptions};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc;

#[derive(Clone)]
struct Pushes(mpsc::UnboundedSender<Push>);

impl PushTarget for Pushes {
    fn push(&self, push: Push) -> bool {
        self.0.send(push).is_ok()
    }
    fn close(&self, _reason: &'static str) {}
}

struct User {
    name: String,
    id: IdentityKeyPair,
    opks: Vec<OneTimePrekeyPair>,
    spk: SignedPrekeyPair,
}

fn user(name: &str, seed: u64, opks: u32) -> User {
    let mut rng = StdRng::seed_from_u64(seed);
    let id = IdentityKeyPair::generate(&mut rng);
    let spk = SignedPrekeyPair::generate(&id, &mut PrekeyIdCounter::new(), &mut rng).unwrap();
    let opks =
        OneTimePrekeyPair::generate_batch(&mut PrekeyIdCounter::new(), opks, &mut rng).unwrap();
    User {
        name: name.into(),
        id,
        opks,
        spk,
    }
}

fn register(u: &User) -> Request {
    Request::Register(Register {
        username: u.name.clone(),
        identity: u.id.public().to_bytes(),
        signed_prekey: u.spk.public().to_bytes(),
        one_time_prekeys: u.opks.iter().map(|k| k.public().to_bytes()).collect(),
        invite: None,
    })
}

struct World {
    service: Arc<Service<Pushes>>,
    _dir: tempfile::TempDir,
    next_conn: AtomicU64,
    now: Arc<AtomicU64>,
    server: IdentityKeyPair,
}

struct Conn {
    session: Session<Pushes>,
    pushes: mpsc::UnboundedReceiver<Push>,
    nonce: [u8; 32],
    exporter: [u8; 32],
}

fn fast_config() -> ServiceConfig {
    ServiceConfig {
        send_rate: Rate::per(100_000, Duration::from_secs(1), 100_000),
        bundle_rate: Rate::per(100_000, Duration::from_secs(1), 100_000),
        request_rate: Rate::per(100_000, Duration::from_secs(1), 100_000),
        // Recipients in these tests acknowledge only when a test says so.
        live_grace: Duration::from_millis(200),
        ..ServiceConfig::default()
    }
}

impl World {
    fn new(config: ServiceConfig) -> Self {
        Self::with_store(config, StoreOptions::default())
    }

    fn with_store(config: ServiceConfig, options: StoreOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), options).unwrap();
        Self::on(config, dir, store)
    }

    /// A service over a store whose `fsync`s `fault` controls.
    fn with_fault(config: ServiceConfig, fault: &Arc<common::Fault>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            common::open_faulty(&dir.path().join("db.redb"), fault, StoreOptions::default())
                .unwrap();
        Self::on(config, dir, store)
    }

    fn on(config: ServiceConfig, dir: tempfile::TempDir, store: Store) -> Self {
        let now = Arc::new(AtomicU64::new(1_700_000_000_000));
        let clock_now = Arc::clone(&now);
        let clock: Clock = Arc::new(move || clock_now.load(Ordering::SeqCst));
        let server = IdentityKeyPair::generate(&mut StdRng::seed_from_u64(999));
        let key = server.identity_key().to_bytes();
        Self {
            service: Arc::new(Service::new(store, config, Some(key), clock)),
            _dir: dir,
            next_conn: AtomicU64::new(1),
            now,
            server,
        }
    }

    fn connect(&self) -> Conn {
        let n = self.next_conn.fetch_add(1, Ordering::SeqCst);
        let mut nonce = [0u8; 32];
        nonce[..8].copy_from_slice(&n.to_be_bytes());
        let mut exporter = [0xEE; 32];
        exporter[..8].copy_from_slice(&n.to_be_bytes());
        let (tx, rx) = mpsc::unbounded_channel();
        Conn {
            session: self.service.connect(n, nonce, exporter, Pushes(tx)),
            pushes: rx,
            nonce,
            exporter,
        }
    }

    async fn ask(&self, c: &mut Conn, r: Request) -> Result<Reply, ErrorCode> {
        self.service.handle(&mut c.session, r).await
    }

    async fn login(&self, u: &User) -> Conn {
        let mut c = self.connect();
        let sig = u.id.sign_login(&c.nonce, &c.exporter);
        let r = self
            .ask(
                &mut c,
                Request::Login(Login {
                    username: u.name.clone(),
                    signature: sig.to_vec(),
                }),
            )
            .await;
        assert!(matches!(r, Ok(Reply::LoggedIn { .. })), "{r:?}");
        c
    }

    async fn registered(&self, u: &User) {
        let mut c = self.connect();
        assert_eq!(self.ask(&mut c, register(u)).await, Ok(Reply::Ok));
    }

    /// Alice and bob (made from these seeds, no one-time prekeys),
    /// registered and logged in.
    async fn alice_and_bob(&self, alice_seed: u64, bob_seed: u64) -> (Conn, Conn) {
        let (alice, bob) = (user("alice", alice_seed, 0), user("bob", bob_seed, 0));
        self.registered(&alice).await;
        self.registered(&bob).await;
        (self.login(&alice).await, self.login(&bob).await)
    }
}

fn drain(c: &mut Conn) -> Vec<Push> {
    let mut out = Vec::new();
    while let Ok(p) = c.pushes.try_recv() {
        out.push(p);
    }
    out
}

fn send(to: &str, id: u8, body: &[u8]) -> Request {
    Request::Send(OutgoingEnvelope {
        to: to.into(),
        to_device: 1,
        id: [id; 16],
        body: body.to_vec(),
    })
}

fn group_send(group: &str, id: u8, body: &[u8]) -> Request {
    Request::GroupSend {
        group: group.into(),
        id: [id; 16],
        body: body.to_vec(),
    }
}

/// A roster of `members` (sorted here) signed by `owner`.
fn roster(owner: &User, group: &str, version: u64, members: &[&str]) -> SignedRoster {
    roster::signed_roster(&owner.name, &owner.id, group, version, members)
}

fn named(r: fn(String) -> Request, n: &str) -> Request {
    r(n.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_channel_bound_login() {
    let w = World::new(fast_config());
    let alice = user("Alice", 1, 5);
    w.registered(&alice).await;
    // Names are unique ignoring case.
    let mut c = w.connect();
    let dup = user("ALICE", 2, 0);
    assert_eq!(
        w.ask(&mut c, register(&dup)).await,
        Err(ErrorCode::UserExists)
    );

    // A login signature made for another connection's exporter fails (T-34).
    let mut first = w.connect();
    let mut second = w.connect();
    let sig = alice.id.sign_login(&first.nonce, &first.exporter);
    let login = |sig: Vec<u8>| {
        Request::Login(Login {
            username: "alice".into(),
            signature: sig,
        })
    };
    assert_eq!(
        w.ask(&mut second, login(sig.to_vec())).await,
        Err(ErrorCode::BadSignature)
    );
    assert!(matches!(
        w.ask(&mut first, login(sig.to_vec())).await,
        Ok(Reply::LoggedIn {
            pending: 0,
            prekeys: 5
        })
    ));
    // The same nonce cannot log in twice on one connection.
    assert_eq!(
        w.ask(&mut first, login(sig.to_vec())).await,
        Err(ErrorCode::BadRequest)
    );
    // Unknown user.
    let mut c = w.connect();
    let r = w
        .ask(
            &mut c,
            Request::Login(Login {
                username: "nobody".into(),
                signature: vec![0; 64],
            }),
        )
        .await;
    assert_eq!(r, Err(ErrorCode::UserNotExist));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_refused() {
    let w = World::new(fast_config());
    let mallory = user("mallory", 3, 1);
    let other = user("other", 4, 0);
    let mut c = w.connect();
    let base = || match register(&mallory) {
        Request::Register(r) => r,
        _ => unreachable!(),
    };
    // A signed prekey signed by someone else.
    let mut r = base();
    r.signed_prekey = other.spk.public().to_bytes();
    assert_eq!(
        w.ask(&mut c, Request::Register(r)).await,
        Err(ErrorCode::BadSignature)
    );
    // A flipped bit in the identity binding signature.
    let mut r = base();
    r.identity[100] ^= 1;
    assert_eq!(
        w.ask(&mut c, Request::Register(r)).await,
        Err(ErrorCode::BadSignature)
    );
    // A bad name.
    let mut r = base();
    r.username = "no spaces".into();
    assert_eq!(
        w.ask(&mut c, Request::Register(r)).await,
        Err(ErrorCode::BadRequest)
    );
    // Duplicate prekey ids in one upload.
    let mut r = base();
    r.one_time_prekeys.push(r.one_time_prekeys[0].clone());
    assert_eq!(
        w.ask(&mut c, Request::Register(r)).await,
        Err(ErrorCode::BadRequest)
    );
    // Nothing was created.
    assert!(w.service.store().account("mallory").unwrap().is_none());
}

/// X25519 keys no honest client publishes: the low-order points (the
/// all-zero key among them), a torsioned point (a proper key plus a point of
/// order 8), and a point on the twist.
fn weak_dh_keys() -> Vec<[u8; 32]> {
    use curve25519_dalek::constants::{EIGHT_TORSION, X25519_LOW_ORDER_POINTS};
    use curve25519_dalek::{EdwardsPoint, Scalar};
    let mut keys: Vec<[u8; 32]> = X25519_LOW_ORDER_POINTS
        .iter()
        .map(|p| p.to_bytes())
        .filter(|k| k[31] & 0x80 == 0)
        .collect();
    let proper = EdwardsPoint::mul_base(&Scalar::from(0x5eed_u64 * 8));
    keys.push((proper + EIGHT_TORSION[1]).to_montgomery().to_bytes());
    // u = 2 is not on Curve25519 (u^3 + 486662 u^2 + u is not a square).
    let mut twist = [0u8; 32];
    twist[0] = 2;
    keys.push(twist);
    keys
}

/// "Refuses weak keys": a published X25519 key (the identity's, the signed
/// prekey's, a one-time prekey's) that is low-order, torsioned or on the
/// twist is refused at registration, upload and rotation, each validly
/// signed so that only the key's weakness is left to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weak_published_keys_refused() {
    let w = World::new(fast_config());
    let mallory = user("mallory", 3, 1);
    let mut c = w.connect();
    let base = || match register(&mallory) {
        Request::Register(r) => r,
        _ => unreachable!(),
    };
    let signed_prekey = |id: u32, key: &[u8; 32]| {
        let mut msg = id.to_be_bytes().to_vec();
        msg.extend_from_slice(key);
        let mut spk = msg.clone();
        spk.extend_from_slice(&mallory.id.sign(SigningContext::SignedPrekey, &msg));
        spk
    };
    let weak = weak_dh_keys();
    assert_eq!(weak.len(), 9, "{weak:?}");
    for key in &weak {
        // The identity's X25519 key, bound by a valid signature.
        let mut r = base();
        r.identity[33..65].copy_from_slice(key);
        let binding = mallory.id.sign(SigningContext::X25519Identity, key);
        r.identity[65..129].copy_from_slice(&binding);
        assert_eq!(
            w.ask(&mut c, Request::Register(r)).await,
            Err(ErrorCode::BadRequest),
            "identity key {key:02x?}"
        );
        let mut r = base();
        r.signed_prekey = signed_prekey(7, key);
        assert_eq!(
            w.ask(&mut c, Request::Register(r)).await,
            Err(ErrorCode::BadRequest),
            "signed prekey {key:02x?}"
        );
        let mut r = base();
        let mut opk = 9u32.to_be_bytes().to_vec();
        opk.extend_from_slice(key);
        r.one_time_prekeys.push(opk);
        assert_eq!(
            w.ask(&mut c, Request::Register(r)).await,
            Err(ErrorCode::BadRequest),
            "one-time prekey {key:02x?}"
        );
    }
    assert!(w.service.store().account("mallory").unwrap().is_none());

    // Registered with good keys, mallory can add no weak one either.
    assert_eq!(w.ask(&mut c, register(&mallory)).await, Ok(Reply::Ok));
    let mut c = w.login(&mallory).await;
    for key in &weak {
        let mut opk = 1_000u32.to_be_bytes().to_vec();
        opk.extend_from_slice(key);
        assert_eq!(
            w.ask(
                &mut c,
                Request::UploadPrekeys {
                    one_time_prekeys: vec![opk]
                }
            )
            .await,
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            w.ask(
                &mut c,
                Request::RotateSignedPrekey {
                    signed_prekey: signed_prekey(1_000, key)
                }
            )
            .await,
            Err(ErrorCode::BadRequest)
        );
    }
    // The same requests with a proper key pass, so the refusals above were
    // about the key alone.
    let proper = user("proper", 5, 1);
    let good = proper.opks[0].public().to_bytes()[4..].to_vec();
    let good: [u8; 32] = good.try_into().unwrap();
    assert!(matches!(
        w.ask(
            &mut c,
            Request::RotateSignedPrekey {
                signed_prekey: signed_prekey(1_000, &good)
            }
        )
        .await,
        Ok(Reply::Ok)
    ));
}

/// T-32: every request kind before login is refused, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_login_refused() {
    let w = World::new(fast_config());
    let bob = user("bob", 5, 3);
    w.registered(&bob).await;
    let mut c = w.connect();
    let requests = vec![
        named(|username| Request::FetchBundle { username }, "bob"),
        Request::PrekeyStatus,
        Request::UploadPrekeys {
            one_time_prekeys: vec![],
        },
        Request::RotateSignedPrekey {
            signed_prekey: bob.spk.public().to_bytes(),
        },
        send("bob", 1, b"x"),
        group_send("g", 0, b"x"),
        Request::Pull { after: 0, max: 10 },
        Request::Ack { seqs: vec![1] },
        Request::Users,
        named(|username| Request::FriendRequest { username }, "bob"),
        named(|username| Request::FriendAccept { username }, "bob"),
        named(|username| Request::FriendDecline { username }, "bob"),
        named(|username| Request::FriendRemove { username }, "bob"),
        Request::FriendList,
        Request::GroupCreate(roster(&bob, "g", 1, &["bob"])),
        named(|group| Request::GroupJoin { group }, "g"),
        Request::GroupUpdate(roster(&bob, "g", 2, &["bob"])),
        named(|group| Request::GroupLeave { group }, "g"),
        named(|group| Request::GroupMembers { group }, "g"),
        Request::MyGroups,
        named(|username| Request::Lookup { username }, "bob"),
        Request::UsersAfter { after: None },
    ];
    for r in requests {
        let shown = format!("{r:?}");
        assert_eq!(
            w.ask(&mut c, r).await,
            Err(ErrorCode::NotAuthenticated),
            "{shown}"
        );
    }
    assert_eq!(w.service.store().one_time_prekey_count("bob").unwrap(), 3);
    assert!(w.service.store().group("g").unwrap().is_none());
}

/// T-39 at the service: 100 one-time prekeys, 32 concurrent fetchers × 5:
/// each handed out exactly once, then bundles without one; the owner is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_prekeys_handed_out_once_under_concurrency() {
    let w = Arc::new(World::new(fast_config()));
    let bob = user("bob", 6, 100);
    w.registered(&bob).await;
    let mut bob_conn = w.login(&bob).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let w = Arc::clone(&w);
        let fetcher = user(&format!("f{i}"), 100 + i, 0);
        tasks.push(tokio::spawn(async move {
            w.registered(&fetcher).await;
            let mut c = w.login(&fetcher).await;
            let mut got = Vec::new();
            for _ in 0..5 {
                let r = w
                    .ask(
                        &mut c,
                        named(|username| Request::FetchBundle { username }, "bob"),
                    )
                    .await;
                match r {
                    Ok(Reply::Bundle {
                        one_time_prekey, ..
                    }) => got.push(one_time_prekey),
                    other => panic!("{other:?}"),
                }
            }
            got
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut without = 0;
    for t in tasks {
        for opk in t.await.unwrap() {
            match opk {
                Some(bytes) => {
                    let id = messenger_crypto::prekey::OneTimePrekey::from_bytes(&bytes)
                        .unwrap()
                        .id();
                    assert!(ids.insert(id), "one-time prekey {id} handed out twice");
                }
                None => without += 1,
            }
        }
    }
    assert_eq!(ids.len(), 100);
    assert_eq!(without, 60);
    assert!(
        drain(&mut bob_conn)
            .iter()
            .any(|p| matches!(p, Push::PrekeysLow { .. }))
    );
    let r = w.ask(&mut bob_conn, Request::PrekeyStatus).await;
    assert_eq!(
        r,
        Ok(Reply::PrekeyStatus {
            remaining: 0,
            low: true
        })
    );
}

/// T-40: one requester cannot drain someone's prekeys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_fetches_rate_limited_per_requester() {
    let w = World::new(ServiceConfig {
        bundle_rate: Rate::per(30, Duration::from_secs(60), 10),
        ..fast_config()
    });
    let bob = user("bob", 7, 50);
    let eve = user("eve", 8, 0);
    let carol = user("carol", 9, 0);
    for u in [&bob, &eve, &carol] {
        w.registered(u).await;
    }
    let fetch = || named(|username| Request::FetchBundle { username }, "bob");
    let mut e = w.login(&eve).await;
    let mut ok = 0;
    for _ in 0..40 {
        match w.ask(&mut e, fetch()).await {
            Ok(Reply::Bundle { .. }) => ok += 1,
            Err(ErrorCode::RateLimited) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ok, 10, "burst of 10, no time passed");
    assert_eq!(w.service.store().one_time_prekey_count("bob").unwrap(), 40);
    // Another requester is not affected.
    let mut c = w.login(&carol).await;
    assert!(matches!(
        w.ask(&mut c, fetch()).await,
        Ok(Reply::Bundle { .. })
    ));
    // Two seconds later one more token (30 per minute).
    w.now.fetch_add(2_000, Ordering::SeqCst);
    assert!(matches!(
        w.ask(&mut e, fetch()).await,
        Ok(Reply::Bundle { .. })
    ));
    assert_eq!(w.ask(&mut e, fetch()).await, Err(ErrorCode::RateLimited));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_forward_with_acks_and_dedupe() {
    let w = World::new(fast_config());
    let (alice, bob) = (user("alice", 10, 0), user("bob", 11, 0));
    w.registered(&alice).await;
    w.registered(&bob).await;
    let mut a = w.login(&alice).await;
    // Bob offline: three envelopes wait, in order.
    for i in 1..=3u8 {
        let r = w.ask(&mut a, send("bob", i, &[i; 10])).await;
        assert!(
            matches!(
                r,
                Ok(Reply::Accepted {
                    duplicate: false,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    // A resend of the same id is stored once.
    assert!(matches!(
        w.ask(&mut a, send("bob", 2, &[2; 10])).await,
        Ok(Reply::Accepted {
            duplicate: true,
            ..
        })
    ));
    assert_eq!(
        w.ask(&mut a, send("nobody", 9, b"x")).await,
        Err(ErrorCode::UserNotExist)
    );
    let huge = vec![0u8; messenger_proto::msg::MAX_BODY_LEN + 1];
    assert_eq!(
        w.ask(&mut a, send("bob", 9, &huge)).await,
        Err(ErrorCode::TooLarge)
    );

    let pull = || Request::Pull { after: 0, max: 10 };
    let mut b = w.login(&bob).await;
    let Ok(Reply::Envelopes { envelopes, more }) = w.ask(&mut b, pull()).await else {
        panic!()
    };
    assert!(!more);
    let bodies: Vec<_> = envelopes.iter().map(|e| e.body[0]).collect();
    assert_eq!(bodies, vec![1, 2, 3]);
    assert!(envelopes.iter().all(|e| e.from == "alice"));
    // Alice cannot acknowledge (delete) Bob's envelopes.
    let seqs: Vec<u64> = envelopes.iter().map(|e| e.seq).collect();
    assert_eq!(
        w.ask(&mut a, Request::Ack { seqs: seqs.clone() }).await,
        Ok(Reply::Ok)
    );
    let Ok(Reply::Envelopes {
        envelopes: still, ..
    }) = w.ask(&mut b, pull()).await
    else {
        panic!()
    };
    assert_eq!(still.len(), 3);
    assert_eq!(w.ask(&mut b, Request::Ack { seqs }).await, Ok(Reply::Ok));
    let Ok(Reply::Envelopes {
        envelopes: none, ..
    }) = w.ask(&mut b, pull()).await
    else {
        panic!()
    };
    assert!(none.is_empty());

    // A mailbox larger than one frame is pulled in several replies, each
    // within the frame limit.
    for i in 0..300u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        id[15] = 0xAA;
        let r = w
            .ask(
                &mut a,
                Request::Send(OutgoingEnvelope {
                    to: "bob".into(),
                    to_device: 1,
                    id,
                    body: vec![0x5A; 4096],
                }),
            )
            .await;
        assert!(matches!(r, Ok(Reply::Accepted { .. })), "{r:?}");
    }
    let (mut after, mut total, mut replies) = (0, 0, 0);
    loop {
        let reply = w
            .ask(&mut b, Request::Pull { after, max: 256 })
            .await
            .unwrap();
        let frame = messenger_proto::encode(&messenger_proto::msg::ServerFrame::Reply {
            id: 1,
            result: Ok(reply.clone()),
        });
        assert!(frame.is_ok(), "a pull reply must fit one frame");
        let Reply::Envelopes { envelopes, more } = reply else {
            panic!()
        };
        total += envelopes.len();
        replies += 1;
        after = envelopes.last().map_or(after, |e| e.seq);
        if !more {
            break;
        }
    }
    assert_eq!(total, 300);
    assert!(replies >= 5, "{replies} replies for 1.2 MB");
    let all: Vec<u64> = (0..=after).collect();
    w.ask(
        &mut b,
        Request::Ack {
            seqs: all[..1000.min(all.len())].to_vec(),
        },
    )
    .await
    .unwrap();

    // Online: pushed at once.
    drain(&mut b);
    w.ask(&mut a, send("bob", 4, b"live")).await.unwrap();
    let pushes = drain(&mut b);
    assert!(
        pushes
            .iter()
            .any(|p| matches!(p, Push::Envelope(e) if e.body == b"live" && e.from == "alice"))
    );
}

/// T-38 at the service: a sender above its rate gets `rate_limited`; others are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rate_limited() {
    let w = World::new(ServiceConfig {
        send_rate: Rate::per(5, Duration::from_secs(1), 5),
        ..fast_config()
    });
    let (alice, bob, carol) = (
        user("alice", 12, 0),
        user("bob", 13, 0),
        user("carol", 14, 0),
    );
    for u in [&alice, &bob, &carol] {
        w.registered(u).await;
    }
    let mut a = w.login(&alice).await;
    let mut accepted = 0;
    for i in 0..50u8 {
        match w.ask(&mut a, send("bob", i, b"x")).await {
            Ok(Reply::Accepted { .. }) => accepted += 1,
            Err(ErrorCode::RateLimited) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(accepted, 5);
    let mut c = w.login(&carol).await;
    assert!(matches!(
        w.ask(&mut c, send("bob", 1, b"y")).await,
        Ok(Reply::Accepted { .. })
    ));
    // The limit is the user's, not the connection's or the path's: a new
    // login, and pipelined sends (which take the token through the bucket
    // the session holds since login), find it spent too.
    let mut a2 = w.login(&alice).await;
    for i in 100..110u8 {
        let pipelined = w.service.begin(&mut a2.session, send("bob", i, b"z")).await;
        assert_eq!(pipelined.await, Err(ErrorCode::RateLimited), "send {i}");
    }
    // Carol's pipelined sends share her bucket with her earlier one: four
    // more fit in her burst of five, not five.
    let mut pipelined = 0;
    for i in 2..20u8 {
        let reply = w.service.begin(&mut c.session, send("bob", i, b"w")).await;
        if matches!(reply.await, Ok(Reply::Accepted { .. })) {
            pipelined += 1;
        }
    }
    assert_eq!(pipelined, 4);
}

/// A group send costs the sender's send rate by its fan-out: 1 token, plus
/// one per 20 other members. In a lobby of 41 a post costs 3, so a burst of
/// 10 allows three posts where it allows ten 1:1 sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_sends_cost_the_send_rate_by_their_fan_out() {
    let w = World::new(ServiceConfig {
        send_rate: Rate::per(1, Duration::from_secs(3_600), 10),
        ..fast_config()
    });
    let mut members = Vec::new();
    for i in 0..41u64 {
        let u = user(&format!("m{i}"), 200 + i, 0);
        w.registered(&u).await;
        let mut c = w.login(&u).await;
        assert_eq!(
            w.ask(&mut c, named(|group| Request::GroupJoin { group }, "lobby"))
                .await,
            Ok(Reply::Ok)
        );
        members.push(c);
    }
    let (first, rest) = members.split_at_mut(1);
    let mut posted = 0;
    for i in 0..10u8 {
        match w
            .ask(&mut first[0], group_send("lobby", i, b"hi all"))
            .await
        {
            Ok(Reply::Accepted { .. }) => posted += 1,
            Err(ErrorCode::RateLimited) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(posted, 3);
    // The same burst allows ten 1:1 sends.
    let mut sent = 0;
    for i in 0..20u8 {
        if matches!(
            w.ask(&mut rest[0], send("m2", i, b"x")).await,
            Ok(Reply::Accepted { .. })
        ) {
            sent += 1;
        }
    }
    assert_eq!(sent, 10);
}

/// An answer to a friend request, or the end of a friendship, made while
/// the user told is offline reaches them at their next login, once; one
/// made while they are online is pushed then and not again at the next
/// login; of several notices from one user only the latest is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friend_notices_reach_an_offline_user_at_login() {
    let w = World::new(fast_config());
    let (alice, bob, carol) = (
        user("alice", 70, 0),
        user("bob", 71, 0),
        user("carol", 72, 0),
    );
    for u in [&alice, &bob, &carol] {
        w.registered(u).await;
    }
    let req = |n: &str| named(|username| Request::FriendRequest { username }, n);
    let mut a = w.login(&alice).await;
    assert_eq!(w.ask(&mut a, req("bob")).await, Ok(Reply::Ok));
    assert_eq!(w.ask(&mut a, req("carol")).await, Ok(Reply::Ok));
    w.service.disconnect(&a.session);
    let mut b = w.login(&bob).await;
    let mut c = w.login(&carol).await;
    let accept = named(|username| Request::FriendAccept { username }, "alice");
    let decline = named(|username| Request::FriendDecline { username }, "alice");
    assert_eq!(w.ask(&mut b, accept).await, Ok(Reply::Ok));
    assert_eq!(w.ask(&mut c, decline).await, Ok(Reply::Ok));
    let answers = |pushes: Vec<Push>| {
        let mut got: Vec<(String, bool)> = pushes
            .into_iter()
            .filter_map(|p| match p {
                Push::FriendAnswer { from, accepted } => Some((from, accepted)),
                _ => None,
            })
            .collect();
        got.sort();
        got
    };
    let removals = |pushes: &[Push]| -> Vec<String> {
        pushes
            .iter()
            .filter_map(|p| match p {
                Push::FriendRemoved { from } => Some(from.clone()),
                _ => None,
            })
            .collect()
    };
    // A login whose pushes cannot be queued (its connection already gone)
    // does not use the answers up.
    let mut gone = w.connect();
    gone.pushes.close();
    let sig = alice.id.sign_login(&gone.nonce, &gone.exporter);
    let login = Request::Login(Login {
        username: "alice".into(),
        signature: sig.to_vec(),
    });
    assert!(matches!(
        w.ask(&mut gone, login).await,
        Ok(Reply::LoggedIn { .. })
    ));
    w.service.disconnect(&gone.session);
    let mut a = w.login(&alice).await;
    assert_eq!(
        answers(drain(&mut a)),
        [("bob".to_owned(), true), ("carol".to_owned(), false)]
    );
    // Told once.
    w.service.disconnect(&a.session);
    let mut a = w.login(&alice).await;
    assert_eq!(answers(drain(&mut a)), []);
    // Online now: pushed at once, and not kept for the next login.
    assert_eq!(w.ask(&mut a, req("carol")).await, Ok(Reply::Ok));
    let accept = named(|username| Request::FriendAccept { username }, "alice");
    assert_eq!(w.ask(&mut c, accept).await, Ok(Reply::Ok));
    assert_eq!(answers(drain(&mut a)), [("carol".to_owned(), true)]);
    w.service.disconnect(&a.session);
    let mut a = w.login(&alice).await;
    assert_eq!(answers(drain(&mut a)), []);

    // Removed while online: pushed at once, not told again.
    let remove = named(|username| Request::FriendRemove { username }, "alice");
    assert_eq!(w.ask(&mut c, remove.clone()).await, Ok(Reply::Ok));
    assert_eq!(removals(&drain(&mut a)), ["carol"]);
    w.service.disconnect(&a.session);
    let mut a = w.login(&alice).await;
    assert_eq!(removals(&drain(&mut a)), Vec::<String>::new());
    // Removed while offline: told at the next login, once.
    w.service.disconnect(&a.session);
    assert_eq!(w.ask(&mut b, remove.clone()).await, Ok(Reply::Ok));
    let mut a = w.login(&alice).await;
    let told = drain(&mut a);
    assert_eq!(removals(&told), ["bob"]);
    assert_eq!(answers(told), []);
    w.service.disconnect(&a.session);
    let mut a = w.login(&alice).await;
    assert_eq!(removals(&drain(&mut a)), Vec::<String>::new());
    // Accepted, then removed, both while offline: only the latest.
    assert_eq!(w.ask(&mut a, req("bob")).await, Ok(Reply::Ok));
    w.service.disconnect(&a.session);
    let accept = named(|username| Request::FriendAccept { username }, "alice");
    assert_eq!(w.ask(&mut b, accept).await, Ok(Reply::Ok));
    assert_eq!(w.ask(&mut b, remove).await, Ok(Reply::Ok));
    let mut a = w.login(&alice).await;
    let told = drain(&mut a);
    assert_eq!(removals(&told), ["bob"]);
    assert_eq!(answers(told), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friends_and_presence() {
    let w = World::new(fast_config());
    let (alice, bob) = (user("alice", 15, 0), user("bob", 16, 0));
    w.registered(&alice).await;
    w.registered(&bob).await;
    let req = |n: &str| named(|username| Request::FriendRequest { username }, n);
    let mut a = w.login(&alice).await;
    // A request while bob is offline; he sees it at login.
    assert_eq!(w.ask(&mut a, req("bob")).await, Ok(Reply::Ok));
    assert_eq!(
        w.ask(&mut a, req("nobody")).await,
        Err(ErrorCode::UserNotExist)
    );
    let mut b = w.login(&bob).await;
    assert!(
        drain(&mut b)
            .iter()
            .any(|p| matches!(p, Push::FriendRequest { from } if from == "alice"))
    );
    let accept = named(|username| Request::FriendAccept { username }, "alice");
    assert_eq!(w.ask(&mut b, accept).await, Ok(Reply::Ok));
    let to_alice = drain(&mut a);
    assert!(
        to_alice
            .iter()
            .any(|p| matches!(p, Push::FriendAnswer { from, accepted: true } if from == "bob"))
    );
    let bob_identity = bob.id.public().to_bytes();
    assert!(to_alice.iter().any(|p| matches!(p,
        Push::Presence { username, online: true, identity } if username == "bob" && *identity == bob_identity)));
    assert_eq!(
        w.ask(&mut a, req("bob")).await,
        Err(ErrorCode::AlreadyFriend)
    );
    let Ok(Reply::Friends { friends, .. }) = w.ask(&mut a, Request::FriendList).await else {
        panic!()
    };
    assert_eq!(friends.len(), 1);
    assert!(friends[0].online);
    // Bob leaves: alice is told; he comes back: alice is told.
    w.service.disconnect(&b.session);
    assert!(
        drain(&mut a).iter().any(
            |p| matches!(p, Push::Presence { username, online: false, .. } if username == "bob")
        )
    );
    let mut b2 = w.login(&bob).await;
    assert!(
        drain(&mut a).iter().any(
            |p| matches!(p, Push::Presence { username, online: true, .. } if username == "bob")
        )
    );
    // A second login replaces the first, which is told.
    let mut b3 = w.login(&bob).await;
    assert!(drain(&mut b2).contains(&Push::Replaced));
    let remove = || named(|username| Request::FriendRemove { username }, "bob");
    assert_eq!(w.ask(&mut a, remove()).await, Ok(Reply::Ok));
    assert!(
        drain(&mut b3)
            .iter()
            .any(|p| matches!(p, Push::FriendRemoved { from } if from == "alice"))
    );
    assert_eq!(w.ask(&mut a, remove()).await, Err(ErrorCode::NotFriend));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_owner_signed_and_fan_out() {
    let w = World::new(fast_config());
    let (alice, bob, carol, mallory) = (
        user("alice", 17, 0),
        user("bob", 18, 0),
        user("carol", 19, 0),
        user("mallory", 20, 0),
    );
    for u in [&alice, &bob, &carol, &mallory] {
        w.registered(u).await;
    }
    let mut a = w.login(&alice).await;
    let mut b = w.login(&bob).await;
    let mut m = w.login(&mallory).await;
    // T-75 at the server: a roster not signed by its owner is refused.
    let mut forged = roster(&alice, "club", 1, &["alice", "bob"]);
    forged.signature = mallory.id.sign(SigningContext::GroupRoster, b"x").to_vec();
    assert_eq!(
        w.ask(&mut a, Request::GroupCreate(forged)).await,
        Err(ErrorCode::BadSignature)
    );
    // Creating in someone else's name is refused.
    let r = w
        .ask(
            &mut m,
            Request::GroupCreate(roster(&alice, "club", 1, &["alice"])),
        )
        .await;
    assert_eq!(r, Err(ErrorCode::NotPermitted));
    let create = Request::GroupCreate(roster(&alice, "club", 1, &["alice", "bob"]));
    assert_eq!(w.ask(&mut a, create.clone()).await, Ok(Reply::Ok));
    assert_eq!(w.ask(&mut a, create).await, Err(ErrorCode::GroupExist));
    assert!(
        drain(&mut b)
            .iter()
            .any(|p| matches!(p, Push::GroupChanged(r) if r.group == "club"))
    );
    // Fan-out: one ciphertext to every other member.
    w.ask(&mut a, group_send("club", 1, b"grp")).await.unwrap();
    assert!(drain(&mut b).iter().any(
        |p| matches!(p, Push::Envelope(e) if e.group.as_deref() == Some("club") && e.body == b"grp")
    ));
    // Non-members can neither send nor read the roster.
    assert_eq!(
        w.ask(&mut m, group_send("club", 2, b"x")).await,
        Err(ErrorCode::NotInGroup)
    );
    let members = |g: &str| named(|group| Request::GroupMembers { group }, g);
    assert_eq!(
        w.ask(&mut m, members("club")).await,
        Err(ErrorCode::NotInGroup)
    );
    assert_eq!(
        w.ask(&mut m, group_send("none", 2, b"x")).await,
        Err(ErrorCode::GroupNotExist)
    );
    // A member cannot publish a roster; the owner's must increase the version.
    let r = w
        .ask(
            &mut b,
            Request::GroupUpdate(roster(&bob, "club", 2, &["alice", "bob", "mallory"])),
        )
        .await;
    assert_eq!(r, Err(ErrorCode::NotPermitted));
    let r = w
        .ask(
            &mut a,
            Request::GroupUpdate(roster(&alice, "club", 1, &["alice"])),
        )
        .await;
    assert_eq!(r, Err(ErrorCode::NotPermitted));
    // A join request reaches the owner, who adds carol.
    let mut c = w.login(&carol).await;
    let join = |g: &str| named(|group| Request::GroupJoin { group }, g);
    assert_eq!(w.ask(&mut c, join("club")).await, Ok(Reply::Ok));
    assert!(drain(&mut a).iter().any(|p| matches!(p,
        Push::GroupJoinRequest { group, username } if group == "club" && username == "carol")));
    let update = Request::GroupUpdate(roster(&alice, "club", 2, &["alice", "bob", "carol"]));
    assert_eq!(w.ask(&mut a, update).await, Ok(Reply::Ok));
    let Ok(Reply::Roster(r)) = w.ask(&mut c, members("club")).await else {
        panic!()
    };
    assert_eq!(r.members, vec!["alice", "bob", "carol"]);
    assert_eq!(r.version, 2);
    assert_eq!(
        w.ask(&mut b, Request::MyGroups).await,
        Ok(Reply::Groups {
            groups: vec!["club".into()]
        })
    );
    // Leaving asks the owner, who alone can sign the new roster.
    let leave = named(|group| Request::GroupLeave { group }, "club");
    assert_eq!(w.ask(&mut b, leave).await, Ok(Reply::Ok));
    assert!(
        drain(&mut a)
            .iter()
            .any(|p| matches!(p, Push::GroupLeaveRequest { username, .. } if username == "bob"))
    );

    // The lobby: anyone joins and posts.
    assert_eq!(w.ask(&mut m, join("lobby")).await, Ok(Reply::Ok));
    assert_eq!(w.ask(&mut b, join("lobby")).await, Ok(Reply::Ok));
    assert_eq!(
        w.ask(&mut b, join("lobby")).await,
        Err(ErrorCode::UserInGroup)
    );
    drain(&mut b);
    w.ask(&mut m, group_send("lobby", 3, b"hi all"))
        .await
        .unwrap();
    assert!(
        drain(&mut b)
            .iter()
            .any(|p| matches!(p, Push::Envelope(e) if e.group.as_deref() == Some("lobby")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_signed_by_the_server_key() {
    let w = World::new(fast_config());
    let (alice, bob) = (user("alice", 21, 0), user("bob", 22, 0));
    w.registered(&alice).await;
    w.registered(&bob).await;
    let mut a = w.login(&alice).await;
    let text = "maintenance at noon";
    let signed = announcement_signed_bytes(5, text);
    let good = SignedAnnouncement {
        issued_at: 5,
        text: text.into(),
        signature: w
            .server
            .sign(SigningContext::Announcement, &signed)
            .to_vec(),
    };
    // A signature by another key (a user's) is refused (T-77).
    let forged = SignedAnnouncement {
        signature: alice
            .id
            .sign(SigningContext::Announcement, &signed)
            .to_vec(),
        ..good.clone()
    };
    let mut op = w.connect();
    assert_eq!(
        w.ask(&mut op, Request::Announce(forged)).await,
        Err(ErrorCode::BadSignature)
    );
    assert_eq!(
        w.ask(&mut op, Request::Announce(good.clone())).await,
        Ok(Reply::Ok)
    );
    assert!(drain(&mut a).contains(&Push::Announcement(good.clone())));
    // Bob was offline: he gets it at his next login, once.
    let mut b = w.login(&bob).await;
    assert!(drain(&mut b).contains(&Push::Announcement(good.clone())));
    let mut b2 = w.login(&bob).await;
    assert!(!drain(&mut b2).contains(&Push::Announcement(good.clone())));
    // Alice saw it live; her cursor moves at her next login (at least once).
    let mut a2 = w.login(&alice).await;
    assert!(drain(&mut a2).contains(&Push::Announcement(good.clone())));
    let mut a3 = w.login(&alice).await;
    assert!(!drain(&mut a3).contains(&Push::Announcement(good)));
}

/// `users` lists everyone online by default, or only online friends under
/// the friends-only policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_policy() {
    for friends_only in [false, true] {
        let w = World::new(ServiceConfig {
            users_policy: if friends_only {
                messenger_rendezvous::service::UsersPolicy::FriendsOnly
            } else {
                messenger_rendezvous::service::UsersPolicy::Everyone
            },
            ..fast_config()
        });
        let (alice, bob, carol) = (
            user("alice", 30, 0),
            user("bob", 31, 0),
            user("carol", 32, 0),
        );
        for u in [&alice, &bob, &carol] {
            w.registered(u).await;
        }
        let mut a = w.login(&alice).await;
        let mut b = w.login(&bob).await;
        let _c = w.login(&carol).await;
        let req = named(|username| Request::FriendRequest { username }, "bob");
        w.ask(&mut a, req).await.unwrap();
        let accept = named(|username| Request::FriendAccept { username }, "alice");
        w.ask(&mut b, accept).await.unwrap();
        let Ok(Reply::Users { users }) = w.ask(&mut a, Request::Users).await else {
            panic!()
        };
        let names: Vec<&str> = users.iter().map(|u| u.username.as_str()).collect();
        if friends_only {
            assert_eq!(names, ["alice", "bob"]);
        } else {
            assert_eq!(names, ["alice", "bob", "carol"]);
        }
        assert!(users.iter().all(|u| u.online && !u.identity.is_empty()));
    }
}

/// `UsersAfter` lists a page at a time in name order: `USERS_PAGE` users
/// and `more`, then the rest after the last name given (exclusive), no one
/// twice or left out; a page after the last name is empty. The older
/// `Users` answers the first page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_listed_a_page_at_a_time() {
    let w = World::new(fast_config());
    let n = USERS_PAGE + 40;
    let name = |i: usize| format!("u{i:05}");
    let mut conns = Vec::new();
    // Logged in out of name order, so the order is the server's doing.
    for i in (0..n).rev() {
        let u = user(&name(i), 20_000 + i as u64, 0);
        w.registered(&u).await;
        conns.push(w.login(&u).await);
    }
    let mut c = conns.pop().expect("users");
    let page = |after: Option<&str>| Request::UsersAfter {
        after: after.map(str::to_owned),
    };
    let Ok(Reply::UsersPage { users: first, more }) = w.ask(&mut c, page(None)).await else {
        panic!("no first page")
    };
    assert!(more);
    assert_eq!(first.len(), USERS_PAGE);
    let last = first.last().map(|u| u.username.clone()).unwrap_or_default();
    let Ok(Reply::UsersPage { users: rest, more }) = w.ask(&mut c, page(Some(&last))).await else {
        panic!("no second page")
    };
    assert!(!more);
    let listed: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|u| u.username.clone())
        .collect();
    assert_eq!(listed, (0..n).map(name).collect::<Vec<_>>());
    // `after` need not be an online name, and is exclusive.
    for after in ["u00001", "u00001x"] {
        let Ok(Reply::UsersPage { users, more }) = w.ask(&mut c, page(Some(after))).await else {
            panic!("no page")
        };
        assert!(more);
        assert_eq!(users.first().map(|u| u.username.as_str()), Some("u00002"));
    }
    assert_eq!(
        w.ask(&mut c, page(Some(&name(n - 1)))).await,
        Ok(Reply::UsersPage {
            users: Vec::new(),
            more: false
        })
    );
    // The older request: the first page.
    assert_eq!(
        w.ask(&mut c, Request::Users).await,
        Ok(Reply::Users { users: first })
    );
}

/// T-41 at the service: a recipient's mailbox quota (count, then bytes) is
/// answered `quota_exceeded`; acknowledging frees room; other mailboxes are
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_quotas() {
    let options = StoreOptions {
        mailbox_max_messages: 3,
        mailbox_max_bytes: 10_000,
        ..StoreOptions::default()
    };
    let w = World::with_store(fast_config(), options);
    let (alice, bob, carol) = (
        user("alice", 40, 0),
        user("bob", 41, 0),
        user("carol", 42, 0),
    );
    for u in [&alice, &bob, &carol] {
        w.registered(u).await;
    }
    let mut a = w.login(&alice).await;
    for i in 0..3u8 {
        assert!(matches!(
            w.ask(&mut a, send("bob", i, b"x")).await,
            Ok(Reply::Accepted { .. })
        ));
    }
    assert_eq!(
        w.ask(&mut a, send("bob", 9, b"x")).await,
        Err(ErrorCode::QuotaExceeded)
    );
    // Carol's mailbox is separate; a large body hits her byte quota.
    assert_eq!(
        w.ask(&mut a, send("carol", 1, &[0u8; 9_000]))
            .await
            .map(|_| ()),
        Ok(())
    );
    assert_eq!(
        w.ask(&mut a, send("carol", 2, &[0u8; 2_000])).await,
        Err(ErrorCode::QuotaExceeded)
    );
    // Bob acknowledges one: room for one more.
    let mut b = w.login(&bob).await;
    let Ok(Reply::Envelopes { envelopes, .. }) =
        w.ask(&mut b, Request::Pull { after: 0, max: 1 }).await
    else {
        panic!()
    };
    w.ask(
        &mut b,
        Request::Ack {
            seqs: vec![envelopes[0].seq],
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        w.ask(&mut a, send("bob", 10, b"x")).await,
        Ok(Reply::Accepted { .. })
    ));
    assert_eq!(
        w.ask(&mut a, send("bob", 11, b"x")).await,
        Err(ErrorCode::QuotaExceeded)
    );
}

/// A group send reaches the members with room in their mailboxes; a member
/// whose mailbox is full misses it. Only when every member's is full is
/// it refused (`quota_exceeded`, not a claim of a duplicate), and a resend
/// of an id some member already holds is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_sends_to_full_mailboxes() {
    let options = StoreOptions {
        mailbox_max_messages: 2,
        ..StoreOptions::default()
    };
    let w = World::with_store(fast_config(), options);
    let (alice, bob, carol) = (
        user("alice", 43, 0),
        user("bob", 44, 0),
        user("carol", 45, 0),
    );
    for u in [&alice, &bob, &carol] {
        w.registered(u).await;
    }
    let mut a = w.login(&alice).await;
    assert_eq!(
        w.ask(
            &mut a,
            Request::GroupCreate(roster(&alice, "crew", 1, &["alice", "bob", "carol"]))
        )
        .await,
        Ok(Reply::Ok)
    );
    // Bob's mailbox is filled by two direct sends.
    for i in 0..2u8 {
        assert!(matches!(
            w.ask(&mut a, send("bob", i, b"x")).await,
            Ok(Reply::Accepted { .. })
        ));
    }
    // Carol has room: stored for her, missed by bob.
    assert_eq!(
        w.ask(&mut a, group_send("crew", 10, b"g1")).await,
        Ok(Reply::Accepted {
            seq: 0,
            duplicate: false
        })
    );
    // Resent: carol holds it already, bob still has no room.
    assert_eq!(
        w.ask(&mut a, group_send("crew", 10, b"g1")).await,
        Ok(Reply::Accepted {
            seq: 0,
            duplicate: true
        })
    );
    // Now both are full: nobody would hold a new one.
    assert!(matches!(
        w.ask(&mut a, group_send("crew", 11, b"g2")).await,
        Ok(Reply::Accepted {
            duplicate: false,
            ..
        })
    ));
    assert_eq!(
        w.ask(&mut a, group_send("crew", 12, b"g3")).await,
        Err(ErrorCode::QuotaExceeded)
    );
    // What each holds.
    for (u, want) in [(&bob, vec![0u8, 1]), (&carol, vec![10, 11])] {
        let mut c = w.login(u).await;
        let Ok(Reply::Envelopes { envelopes, .. }) =
            w.ask(&mut c, Request::Pull { after: 0, max: 10 }).await
        else {
            panic!("pull")
        };
        let ids: Vec<u8> = envelopes.iter().map(|e| e.id[0]).collect();
        assert_eq!(ids, want, "{}", u.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_reads_the_directory_without_taking_a_prekey() {
    let w = World::new(fast_config());
    let (alice, bob) = (user("alice", 31, 0), user("bob", 32, 3));
    w.registered(&alice).await;
    w.registered(&bob).await;
    let mut a = w.login(&alice).await;
    let r = w
        .ask(
            &mut a,
            named(|username| Request::Lookup { username }, "BOB"),
        )
        .await;
    let Ok(Reply::User(info)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(info.username, "bob");
    assert_eq!(info.identity, bob.id.public().to_bytes());
    assert!(!info.online);
    let _b = w.login(&bob).await;
    let r = w
        .ask(
            &mut a,
            named(|username| Request::Lookup { username }, "bob"),
        )
        .await;
    assert!(
        matches!(r, Ok(Reply::User(UserInfo { online: true, .. }))),
        "{r:?}"
    );
    // The pool is untouched.
    let mut b2 = w.login(&bob).await;
    assert_eq!(
        w.ask(&mut b2, Request::PrekeyStatus).await,
        Ok(Reply::PrekeyStatus {
            remaining: 3,
            low: true
        })
    );
    let r = w
        .ask(
            &mut a,
            named(|username| Request::Lookup { username }, "nobody"),
        )
        .await;
    assert_eq!(r, Err(ErrorCode::UserNotExist));
    // Before login: refused.
    let mut anon = w.connect();
    let r = w
        .ask(
            &mut anon,
            named(|username| Request::Lookup { username }, "bob"),
        )
        .await;
    assert_eq!(r, Err(ErrorCode::NotAuthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_token_replaces_one_accounts_keys_once() {
    let invite_key = messenger_rendezvous::invite::invite_key(&[3u8; 64]);
    let config = ServiceConfig {
        invite_key: Some(invite_key.clone()),
        ..fast_config()
    };
    let w = World::new(config);
    let bob = user("bob", 41, 2);
    w.registered(&bob).await;
    let new_bob = user("bob", 42, 4);
    let with = |token: Option<String>| {
        let Request::Register(mut r) = register(&new_bob) else {
            unreachable!()
        };
        r.invite = token;
        Request::Register(r)
    };
    let mut c = w.connect();
    // Without a token, or with another user's or an invite token: refused.
    assert_eq!(w.ask(&mut c, with(None)).await, Err(ErrorCode::UserExists));
    let alice_token = messenger_rendezvous::invite::make_reset_token(&invite_key, "alice");
    assert_eq!(
        w.ask(&mut c, with(alice_token)).await,
        Err(ErrorCode::UserExists)
    );
    let token = messenger_rendezvous::invite::make_reset_token(&invite_key, "bob").unwrap();
    assert_eq!(
        w.ask(&mut c, with(Some(token.clone()))).await,
        Ok(Reply::Ok)
    );
    // Once only.
    assert_eq!(
        w.ask(&mut c, with(Some(token))).await,
        Err(ErrorCode::NotPermitted)
    );
    // The old key no longer logs in; the new one does, with the new pool.
    let mut old = w.connect();
    let sig = bob.id.sign_login(&old.nonce, &old.exporter);
    let r = w
        .ask(
            &mut old,
            Request::Login(Login {
                username: "bob".into(),
                signature: sig.to_vec(),
            }),
        )
        .await;
    assert_eq!(r, Err(ErrorCode::BadSignature));
    let mut b = w.login(&new_bob).await;
    assert!(matches!(
        w.ask(&mut b, Request::PrekeyStatus).await,
        Ok(Reply::PrekeyStatus { remaining: 4, .. })
    ));
    let mut a = w.connect();
    let alice = user("alice", 43, 0);
    assert_eq!(w.ask(&mut a, register(&alice)).await, Ok(Reply::Ok));
    let mut a = w.login(&alice).await;
    let r = w
        .ask(
            &mut a,
            named(|username| Request::FetchBundle { username }, "bob"),
        )
        .await;
    let Ok(Reply::Bundle { identity, .. }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(identity, new_bob.id.public().to_bytes());
}

/// Leaving a group. A member's leave request reaches the owner at once if
/// online, and is kept and repeated at each of the owner's logins until the
/// owner publishes a roster without that member. The owner cannot leave
/// (`not_permitted`): the signed roster always names its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_a_group_reaches_an_offline_owner_and_the_owner_cannot_leave() {
    let w = World::new(fast_config());
    let (alice, bob, carol) = (
        user("alice", 31, 0),
        user("bob", 32, 0),
        user("carol", 33, 0),
    );
    for u in [&alice, &bob, &carol] {
        w.registered(u).await;
    }
    let leave = |g: &str| named(|group| Request::GroupLeave { group }, g);
    let leave_requests = |pushes: &[Push]| -> Vec<String> {
        pushes
            .iter()
            .filter_map(|p| match p {
                Push::GroupLeaveRequest { group, username } if group == "club" => {
                    Some(username.clone())
                }
                _ => None,
            })
            .collect()
    };
    let mut a = w.login(&alice).await;
    let r = w
        .ask(
            &mut a,
            Request::GroupCreate(roster(&alice, "club", 1, &["alice", "bob", "carol"])),
        )
        .await;
    assert_eq!(r, Ok(Reply::Ok));
    // The owner cannot leave, and nothing changes.
    assert_eq!(
        w.ask(&mut a, leave("club")).await,
        Err(ErrorCode::NotPermitted)
    );
    // The owner goes offline; bob leaves meanwhile.
    w.service.disconnect(&a.session);
    drop(a);
    let mut b = w.login(&bob).await;
    assert_eq!(w.ask(&mut b, leave("club")).await, Ok(Reply::Ok));
    // Leaving twice is harmless; a non-member cannot.
    assert_eq!(w.ask(&mut b, leave("club")).await, Ok(Reply::Ok));
    assert_eq!(
        w.ask(&mut b, leave("nope")).await,
        Err(ErrorCode::GroupNotExist)
    );
    // At login the owner hears of it (once, however often bob asked).
    let mut a = w.login(&alice).await;
    assert_eq!(leave_requests(&drain(&mut a)), vec!["bob"]);
    // Still pending at the next login while the roster keeps bob.
    w.service.disconnect(&a.session);
    let mut a = w.login(&alice).await;
    assert_eq!(leave_requests(&drain(&mut a)), vec!["bob"]);
    // The owner publishes a roster without bob: the request is done.
    let r = w
        .ask(
            &mut a,
            Request::GroupUpdate(roster(&alice, "club", 2, &["alice", "carol"])),
        )
        .await;
    assert_eq!(r, Ok(Reply::Ok));
    w.service.disconnect(&a.session);
    let mut a = w.login(&alice).await;
    assert!(leave_requests(&drain(&mut a)).is_empty());
    // Bob, no longer a member, is told so.
    assert_eq!(
        w.ask(&mut b, leave("club")).await,
        Err(ErrorCode::NotInGroup)
    );
    let members = w
        .ask(
            &mut a,
            named(|group| Request::GroupMembers { group }, "club"),
        )
        .await;
    assert!(
        matches!(&members, Ok(Reply::Roster(r)) if r.members == ["alice", "carol"]),
        "{members:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_and_acks_go_through_the_group_commit_in_order() {
    let w = World::new(fast_config());
    let (alice, bob) = (user("alice", 30, 0), user("bob", 31, 0));
    w.registered(&alice).await;
    w.registered(&bob).await;
    let mut a = w.login(&alice).await;
    let mut b = w.login(&bob).await;
    drain(&mut a);
    drain(&mut b);
    assert!(Service::<Pushes>::pipelines(&Request::Ack {
        seqs: vec![1]
    }));
    // Several sends begun before any completes; each is pushed live to the
    // online recipient at once, in order, and stored in order once bob has
    // not acknowledged within the grace.
    let mut replies = Vec::new();
    for i in 1..=4u8 {
        replies.push(
            w.service
                .begin(&mut a.session, send("bob", i, &[i; 8]))
                .await,
        );
    }
    let mut seqs = Vec::new();
    for reply in replies {
        let Ok(Reply::Accepted {
            seq,
            duplicate: false,
        }) = reply.await
        else {
            panic!("not accepted")
        };
        seqs.push(seq);
    }
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "{seqs:?}");
    assert!(seqs.iter().all(|s| s & LIVE_SEQ_BIT == 0), "{seqs:?}");
    let pushed: Vec<(u64, u8)> = drain(&mut b)
        .into_iter()
        .filter_map(|p| match p {
            Push::Envelope(e) => Some((e.seq, e.body[0])),
            _ => None,
        })
        .collect();
    assert_eq!(
        pushed.iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(pushed.iter().all(|p| p.0 & LIVE_SEQ_BIT != 0), "{pushed:?}");
    let live: Vec<u64> = pushed.iter().map(|p| p.0).collect();
    // A pipelined ack: too many seqs is refused; a valid one deletes once
    // its commit is done, and another user's ack deletes nothing.
    let too_many = Request::Ack {
        seqs: vec![1; messenger_proto::msg::MAX_ACKS + 1],
    };
    assert_eq!(
        w.service.begin(&mut b.session, too_many).await.await,
        Err(ErrorCode::TooLarge)
    );
    let theirs = Request::Ack { seqs: seqs.clone() };
    assert_eq!(
        w.service.begin(&mut a.session, theirs).await.await,
        Ok(Reply::Ok)
    );
    assert_eq!(w.service.store().pending("bob", 0, 10).unwrap().len(), 4);
    // Acknowledging the delivery ids deletes the stored copies.
    let mine = Request::Ack {
        seqs: live[..3].to_vec(),
    };
    assert_eq!(
        w.service.begin(&mut b.session, mine).await.await,
        Ok(Reply::Ok)
    );
    let left = w.service.store().pending("bob", 0, 10).unwrap();
    assert_eq!(
        left.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![seqs[3]]
    );
    // Not logged in: refused before anything is queued.
    let mut anon = w.connect();
    assert_eq!(
        w.service
            .begin(
                &mut anon.session,
                Request::Ack {
                    seqs: vec![seqs[3]]
                }
            )
            .await
            .await,
        Err(ErrorCode::NotAuthenticated)
    );
}

/// The live envelopes pushed to `c` so far: (delivery id, first body byte).
fn live_pushes(c: &mut Conn) -> Vec<(u64, u8)> {
    drain(c)
        .into_iter()
        .filter_map(|p| match p {
            Push::Envelope(e) => Some((e.seq, e.body[0])),
            _ => None,
        })
        .collect()
}

/// Live delivery: an envelope for an online recipient is pushed at once
/// under a delivery id, its sender is answered only when the recipient
/// acknowledges that id, and nothing of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_is_answered_by_the_recipients_ack_and_never_stored() {
    let config = ServiceConfig {
        live_grace: Duration::from_secs(30),
        ..fast_config()
    };
    let w = World::new(config);
    let (alice, bob) = (user("alice", 40, 0), user("bob", 41, 0));
    w.registered(&alice).await;
    w.registered(&bob).await;
    let mut a = w.login(&alice).await;
    let mut b = w.login(&bob).await;
    drain(&mut a);
    drain(&mut b);
    let reply = w
        .service
        .begin(&mut a.session, send("bob", 1, &[7; 8]))
        .await;
    let reply = tokio::spawn(reply);
    let pushed = live_pushes(&mut b);
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    let (id, body) = pushed[0];
    assert!(id & LIVE_SEQ_BIT != 0 && body == 7, "{pushed:?}");
    assert!(w.service.store().pending("bob", 0, 10).unwrap().is_empty());
    // Unanswered until bob acknowledges; alice acknowledging bob's id
    // changes nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!reply.is_finished());
    assert_eq!(
        w.ask(&mut a, Request::Ack { seqs: vec![id] }).await,
        Ok(Reply::Ok)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!reply.is_finished());
    assert_eq!(
        w.ask(&mut b, Request::Ack { seqs: vec![id] }).await,
        Ok(Reply::Ok)
    );
    let answered = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("answered after the ack")
        .unwrap();
    assert_eq!(
        answered,
        Ok(Reply::Accepted {
            seq: id,
            duplicate: false
        })
    );
    assert!(w.service.store().pending("bob", 0, 10).unwrap().is_empty());
    assert_eq!(w.service.store().mailbox_usage("bob").unwrap().0, 0);
    // A second ack of the same id is harmless.
    assert_eq!(
        w.ask(&mut b, Request::Ack { seqs: vec![id] }).await,
        Ok(Reply::Ok)
    );
    // Delivery ids are never reused.
    let _unanswered = w
        .service
        .begin(&mut a.session, send("bob", 2, &[8; 8]))
        .await;
    let next = live_pushes(&mut b);
    assert!(next.len() == 1 && next[0].0 != id, "{next:?}");
}

/// No ack within the grace: the envelope is stored before the sender is
/// answered, and the recipient's later ack of the delivery id deletes the
/// stored copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_live_delivery_is_stored_after_the_grace() {
    let w = World::new(fast_config());
    let (mut a, mut b) = w.alice_and_bob(42, 43).await;
    drain(&mut b);
    let Ok(Reply::Accepted {
        seq,
        duplicate: false,
    }) = w.ask(&mut a, send("bob", 1, &[5; 8])).await
    else {
        panic!("not accepted")
    };
    assert_eq!(seq & LIVE_SEQ_BIT, 0, "answered with the mailbox seq");
    let stored = w.service.store().pending("bob", 0, 10).unwrap();
    assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![seq]);
    let pushed = live_pushes(&mut b);
    assert_eq!(pushed.len(), 1, "pushed once, live: {pushed:?}");
    assert_eq!(
        w.ask(
            &mut b,
            Request::Ack {
                seqs: vec![pushed[0].0]
            }
        )
        .await,
        Ok(Reply::Ok)
    );
    assert!(w.service.store().pending("bob", 0, 10).unwrap().is_empty());
}

/// The recipient's connection goes before it acknowledges: the sender is
/// answered once the envelope is stored (without waiting out the grace),
/// and the recipient finds it in the mailbox; if the recipient is already
/// back on a new connection, the stored copy is pushed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_delivery_to_a_connection_that_goes_is_stored() {
    let config = ServiceConfig {
        live_grace: Duration::from_secs(30),
        ..fast_config()
    };
    let w = World::new(config);
    let (alice, bob) = (user("alice", 44, 0), user("bob", 45, 0));
    w.registered(&alice).await;
    w.registered(&bob).await;
    let mut a = w.login(&alice).await;
    let mut b = w.login(&bob).await;
    drain(&mut b);

    // Disconnect.
    let reply = tokio::spawn(
        w.service
            .begin(&mut a.session, send("bob", 1, &[1; 8]))
            .await,
    );
    assert_eq!(live_pushes(&mut b).len(), 1);
    w.service.disconnect(&b.session);
    let answered = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("answered well before the grace")
        .unwrap();
    let Ok(Reply::Accepted { seq: first, .. }) = answered else {
        panic!("{answered:?}")
    };
    assert_eq!(first & LIVE_SEQ_BIT, 0);

    // Replaced by a new login while the delivery waits.
    let mut b2 = w.login(&bob).await;
    drain(&mut b2);
    let reply = tokio::spawn(
        w.service
            .begin(&mut a.session, send("bob", 2, &[2; 8]))
            .await,
    );
    assert_eq!(live_pushes(&mut b2).len(), 1);
    let mut b3 = w.login(&bob).await;
    let answered = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("answered well before the grace")
        .unwrap();
    let Ok(Reply::Accepted { seq: second, .. }) = answered else {
        panic!("{answered:?}")
    };
    assert_eq!(second & LIVE_SEQ_BIT, 0);
    let again: Vec<(u64, u8)> = live_pushes(&mut b3);
    assert!(again.contains(&(second, 2)), "{again:?}");
    let waiting: Vec<u64> = w
        .service
        .store()
        .pending("bob", 0, 10)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(waiting, vec![first, second]);
}

/// A recipient that never acknowledges fills its live window; further
/// envelopes take the stored path at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_live_window_sends_envelopes_to_the_mailbox() {
    let config = ServiceConfig {
        live_grace: Duration::from_secs(30),
        live_window: 2,
        ..fast_config()
    };
    let w = World::new(config);
    let (mut a, mut b) = w.alice_and_bob(46, 47).await;
    drain(&mut b);
    let mut waiting = Vec::new();
    for i in 1..=2u8 {
        waiting.push(tokio::spawn(
            w.service
                .begin(&mut a.session, send("bob", i, &[i; 8]))
                .await,
        ));
    }
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        w.ask(&mut a, send("bob", 3, &[3; 8])),
    )
    .await
    .expect("the third is stored, not held");
    let Ok(Reply::Accepted { seq, .. }) = third else {
        panic!("{third:?}")
    };
    assert_eq!(seq & LIVE_SEQ_BIT, 0);
    let pushed = live_pushes(&mut b);
    assert_eq!(
        pushed.iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(pushed[2].0 == seq && pushed[0].0 & LIVE_SEQ_BIT != 0);
    assert!(waiting.iter().all(|r| !r.is_finished()));
}

/// "Group commit: many envelopes per redb transaction under load, each
/// acknowledged only after its own commit": while one commit waits in its
/// `fsync`, the sends that come meanwhile from other users wait unanswered,
/// then go into the next commit together (far fewer `fsync`s than
/// envelopes), and each is answered only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_that_wait_for_a_commit_share_the_next_one() {
    const SENDERS: u8 = 4;
    const EACH: u8 = 5;
    let fault = Arc::new(common::Fault::default());
    let w = World::with_fault(fast_config(), &fault);
    let bob = user("bob", 60, 0);
    w.registered(&bob).await;
    let mut senders = Vec::new();
    for i in 0..=SENDERS {
        let u = user(&format!("s{i}"), 61 + u64::from(i), 0);
        w.registered(&u).await;
        senders.push(w.login(&u).await);
    }
    fault.hold_syncs();
    // The first commit, held in its fsync.
    let first = tokio::spawn(
        w.service
            .begin(&mut senders[0].session, send("bob", 0, b"first"))
            .await,
    );
    let held = {
        let fault = Arc::clone(&fault);
        tokio::task::spawn_blocking(move || fault.wait_for_held_sync(Duration::from_secs(10)))
            .await
            .unwrap()
    };
    assert!(held, "the first commit reached its fsync");
    // Meanwhile, pipelined sends from four other users.
    let mut waiting = Vec::new();
    for (n, c) in senders.iter_mut().enumerate().skip(1) {
        for k in 0..EACH {
            let id = u8::try_from(n).unwrap() * 16 + k;
            waiting.push(tokio::spawn(
                w.service.begin(&mut c.session, send("bob", id, b"x")).await,
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!first.is_finished());
    assert!(
        waiting.iter().all(|r| !r.is_finished()),
        "answered before a commit"
    );
    let syncs_before = fault.syncs.load(Ordering::SeqCst);
    fault.release_syncs();
    for reply in waiting.into_iter().chain([first]) {
        let answered = tokio::time::timeout(Duration::from_secs(10), reply)
            .await
            .expect("answered after the commits")
            .unwrap();
        assert!(
            matches!(
                answered,
                Ok(Reply::Accepted {
                    duplicate: false,
                    ..
                })
            ),
            "{answered:?}"
        );
    }
    let syncs = fault.syncs.load(Ordering::SeqCst) - syncs_before;
    let envelopes = u64::from(SENDERS * EACH);
    // One commit for all twenty: its fsyncs and the end of the held one's.
    assert!(
        syncs < envelopes / 2,
        "{syncs} fsyncs after the release for {envelopes} envelopes"
    );
    // All stored, in bob's mailbox.
    let mut b = w.login(&bob).await;
    let Ok(Reply::Envelopes { envelopes: got, .. }) =
        w.ask(&mut b, Request::Pull { after: 0, max: 100 }).await
    else {
        panic!("pull")
    };
    assert_eq!(got.len(), usize::from(SENDERS * EACH) + 1);
}

/// The recipient acknowledges a live delivery while it is being stored
/// (the grace ran out, and the commit is held at its `fsync`): once the
/// commit is done the stored copy is deleted at once, and the sender is
/// answered with its mailbox seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_delivery_acknowledged_while_it_is_stored_is_deleted_after_the_commit() {
    let fault = Arc::new(common::Fault::default());
    let config = ServiceConfig {
        live_grace: Duration::from_millis(50),
        ..fast_config()
    };
    let w = World::with_fault(config, &fault);
    let (mut a, mut b) = w.alice_and_bob(48, 49).await;
    drain(&mut b);
    fault.hold_syncs();
    let reply = tokio::spawn(
        w.service
            .begin(&mut a.session, send("bob", 1, &[9; 8]))
            .await,
    );
    let pushed = live_pushes(&mut b);
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    // The grace runs out; the fallback commit waits in its fsync.
    let held = {
        let fault = Arc::clone(&fault);
        tokio::task::spawn_blocking(move || fault.wait_for_held_sync(Duration::from_secs(10)))
            .await
            .unwrap()
    };
    assert!(held, "the fallback commit reached its fsync");
    // An ack of a live delivery alone needs no commit: answered at once.
    let acked = tokio::time::timeout(
        Duration::from_secs(5),
        w.ask(
            &mut b,
            Request::Ack {
                seqs: vec![pushed[0].0],
            },
        ),
    )
    .await
    .expect("answered without a commit");
    assert_eq!(acked, Ok(Reply::Ok));
    assert!(!reply.is_finished());
    fault.release_syncs();
    let answered = tokio::time::timeout(Duration::from_secs(10), reply)
        .await
        .expect("answered after the commit")
        .unwrap();
    let Ok(Reply::Accepted {
        seq,
        duplicate: false,
    }) = answered
    else {
        panic!("{answered:?}")
    };
    assert_eq!(seq & LIVE_SEQ_BIT, 0);
    assert!(
        w.service.store().pending("bob", 0, 10).unwrap().is_empty(),
        "the stored copy of an acknowledged delivery is deleted"
    );
}

/// A live delivery whose fallback store fails (disk full) answers the
/// sender with the error and gives its place in the recipient's live window
/// back: the next envelope is delivered live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fallback_frees_its_place_in_the_live_window() {
    let fault = Arc::new(common::Fault::default());
    let config = ServiceConfig {
        live_grace: Duration::from_millis(50),
        live_window: 1,
        ..fast_config()
    };
    let w = World::with_fault(config, &fault);
    let (mut a, mut b) = w.alice_and_bob(50, 51).await;
    drain(&mut b);
    fault.arm(0);
    assert_eq!(
        w.ask(&mut a, send("bob", 1, &[1; 8])).await,
        Err(ErrorCode::StorageFull)
    );
    fault.disarm();
    let first = live_pushes(&mut b);
    assert!(
        first.len() == 1 && first[0].0 & LIVE_SEQ_BIT != 0,
        "{first:?}"
    );
    let _waiting = w
        .service
        .begin(&mut a.session, send("bob", 2, &[2; 8]))
        .await;
    let second = live_pushes(&mut b);
    assert!(
        second.len() == 1 && second[0].0 & LIVE_SEQ_BIT != 0,
        "pushed live again: {second:?}"
    );
}

/// Pipelined live deliveries to a recipient who does not acknowledge share
/// one grace. The network layer polls a connection's pending replies only
/// from the front (net.rs `next_reply`, `take_ready`), so a reply future is
/// first polled once every reply before it is out; awaiting them in order
/// here does the same. The grace must count from the push, not from that
/// first poll: otherwise the n-th send waits n graces (a full pipeline of
/// 16 to a silent recipient: 16 s, one answer a second, and the sender's
/// other requests stuck behind it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_live_deliveries_to_a_silent_recipient_share_one_grace() {
    let grace = Duration::from_millis(300);
    let config = ServiceConfig {
        live_grace: grace,
        ..fast_config()
    };
    let w = World::new(config);
    let (mut a, mut b) = w.alice_and_bob(52, 53).await;
    drain(&mut b);
    let mut replies = Vec::new();
    for i in 1..=8u8 {
        replies.push(
            w.service
                .begin(&mut a.session, send("bob", i, &[i; 8]))
                .await,
        );
    }
    let pushed = live_pushes(&mut b);
    assert_eq!(pushed.len(), 8, "{pushed:?}");
    assert!(pushed.iter().all(|p| p.0 & LIVE_SEQ_BIT != 0), "{pushed:?}");
    let started = std::time::Instant::now();
    for reply in replies {
        let answered = reply.await;
        let Ok(Reply::Accepted { seq, .. }) = answered else {
            panic!("{answered:?}")
        };
        assert_eq!(seq & LIVE_SEQ_BIT, 0, "stored after the grace");
    }
    let took = started.elapsed();
    assert!(
        took < 4 * grace,
        "8 pipelined fallbacks took {took:?}; one grace is {grace:?}"
    );
    assert_eq!(w.service.store().pending("bob", 0, 10).unwrap().len(), 8);
}

/// The sender's connection goes while its live delivery is being stored
/// (the grace ran out and the fallback commit is in flight), which drops
/// the reply future (net.rs drops the pending replies of a lost
/// connection). The recipient then acknowledges the delivery id: its place
/// in the live window must come back, as it does when the sender stays;
/// otherwise every such loss shrinks the recipient's window for the rest
/// of its connection, down to no live delivery at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_gone_during_the_fallback_does_not_hold_a_place_in_the_live_window() {
    let fault = Arc::new(common::Fault::default());
    let config = ServiceConfig {
        live_grace: Duration::from_millis(50),
        live_window: 1,
        ..fast_config()
    };
    let w = World::with_fault(config, &fault);
    let (alice, bob) = (user("alice", 54, 0), user("bob", 55, 0));
    w.registered(&alice).await;
    w.registered(&bob).await;
    let mut a = w.login(&alice).await;
    let mut b = w.login(&bob).await;
    drain(&mut b);
    fault.hold_syncs();
    let reply = tokio::spawn(
        w.service
            .begin(&mut a.session, send("bob", 1, &[1; 8]))
            .await,
    );
    let first = live_pushes(&mut b);
    assert!(
        first.len() == 1 && first[0].0 & LIVE_SEQ_BIT != 0,
        "{first:?}"
    );
    let held = {
        let fault = Arc::clone(&fault);
        tokio::task::spawn_blocking(move || fault.wait_for_held_sync(Duration::from_secs(10)))
            .await
            .unwrap()
    };
    assert!(held, "the fallback commit reached its fsync");
    // Alice's connection is lost: her pending reply is dropped.
    reply.abort();
    assert!(reply.await.unwrap_err().is_cancelled());
    fault.release_syncs();
    // The commit completes regardless; bob acknowledges what he was given.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        w.ask(
            &mut b,
            Request::Ack {
                seqs: vec![first[0].0]
            }
        )
        .await,
        Ok(Reply::Ok)
    );
    // Alice is back on a new connection.
    let mut a2 = w.login(&alice).await;
    let _waiting = w
        .service
        .begin(&mut a2.session, send("bob", 2, &[2; 8]))
        .await;
    let second = live_pushes(&mut b);
    assert!(
        second.len() == 1 && second[0].0 & LIVE_SEQ_BIT != 0,
        "bob acknowledged everything he was given, yet the next envelope is not \
         delivered live (his only place in the window is still taken): {second:?}"
    );
}

/// An `Ack` of live delivery ids only takes no token of the request rate,
/// pipelined or not: refused (as a notification, without a word), each
/// sender waiting for it would wait the whole grace, and its envelope would
/// be stored and delivered a second time. An `Ack` that names a mailbox seq
/// (a delete in the group commit) still takes its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_of_live_delivery_ids_are_not_rate_limited() {
    let config = ServiceConfig {
        request_rate: Rate::per(10, Duration::from_secs(3600), 10),
        live_grace: Duration::from_secs(30),
        ..fast_config()
    };
    let w = World::new(config);
    let (mut a, mut b) = w.alice_and_bob(60, 61).await;
    drain(&mut b);
    // Bob spends his whole request rate.
    let mut spent = 0;
    while w.ask(&mut b, Request::Users).await != Err(ErrorCode::RateLimited) {
        spent += 1;
        assert!(spent <= 10, "the rate never ran out");
    }
    let mut replies = Vec::new();
    for i in 0..4u8 {
        let reply = w
            .service
            .begin(&mut a.session, send("bob", i, &[i; 8]))
            .await;
        replies.push(tokio::spawn(reply));
    }
    let pushed = live_pushes(&mut b);
    assert_eq!(pushed.len(), 4, "{pushed:?}");
    // Two acks pipelined, two not: all applied at once.
    for (n, (id, _)) in pushed.iter().enumerate() {
        let ack = Request::Ack { seqs: vec![*id] };
        let result = if n % 2 == 0 {
            w.service.begin(&mut b.session, ack).await.await
        } else {
            w.ask(&mut b, ack).await
        };
        assert_eq!(result, Ok(Reply::Ok), "ack {n}");
    }
    for (reply, (id, _)) in replies.into_iter().zip(&pushed) {
        let answered = tokio::time::timeout(Duration::from_secs(5), reply)
            .await
            .expect("answered live, not after the grace")
            .unwrap();
        assert_eq!(
            answered,
            Ok(Reply::Accepted {
                seq: *id,
                duplicate: false
            })
        );
    }
    assert!(w.service.store().pending("bob", 0, 10).unwrap().is_empty());
    // One that names a mailbox seq is refused, alone or with live ids.
    for seqs in [vec![1], vec![pushed[0].0, 1]] {
        assert_eq!(
            w.ask(&mut b, Request::Ack { seqs: seqs.clone() }).await,
            Err(ErrorCode::RateLimited),
            "{seqs:?}"
        );
        let pipelined = w.service.begin(&mut b.session, Request::Ack { seqs }).await;
        assert_eq!(pipelined.await, Err(ErrorCode::RateLimited));
    }
    // An `Ack` naming a live id that is not outstanding (never given, or
    // acknowledged already) is applied, but ends the exemption for this
    // connection: lookups of made-up ids are not free.
    let bogus = Request::Ack {
        seqs: vec![LIVE_SEQ_BIT | 999_999],
    };
    assert_eq!(w.ask(&mut b, bogus).await, Ok(Reply::Ok));
    let (_waiting, id) = one_live_send(&w, &mut a, &mut b, 9).await;
    let ack = Request::Ack { seqs: vec![id] };
    assert_eq!(w.ask(&mut b, ack).await, Err(ErrorCode::RateLimited));
    // A new connection starts exempt again.
    let mut b2 = w.login(&user("bob", 61, 0)).await;
    let (reply, id) = one_live_send(&w, &mut a, &mut b2, 10).await;
    let ack = Request::Ack { seqs: vec![id] };
    assert_eq!(w.ask(&mut b2, ack).await, Ok(Reply::Ok));
    let answered = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("answered live")
        .unwrap();
    assert!(
        matches!(answered, Ok(Reply::Accepted { seq, .. }) if seq == id),
        "{answered:?}"
    );
}

/// Begins a send from `from`'s connection to bob, whose connection `to` is
/// online, and returns its reply (awaited in a task) with the delivery id
/// of the one envelope pushed live to `to`.
async fn one_live_send(
    w: &World,
    from: &mut Conn,
    to: &mut Conn,
    id: u8,
) -> (tokio::task::JoinHandle<Result<Reply, ErrorCode>>, u64) {
    let reply = w
        .service
        .begin(&mut from.session, send("bob", id, &[id; 8]))
        .await;
    let reply = tokio::spawn(reply);
    let pushed = live_pushes(to);
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    (reply, pushed[0].0)
}

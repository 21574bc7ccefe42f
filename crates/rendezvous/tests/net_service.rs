//! The service's rules over real QUIC on 127.0.0.1, against the real server
//! (`app::start`: the service and store behind the network layer):
//! registration and channel-bound login, one-time prekeys under concurrent
//! fetches, store-and-forward dedupe, the per-user send rate, mailbox
//! quotas, groups, friend requests, a replacing login and prekey
//! maintenance. `tests/service.rs` checks the same rules without sockets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use messenger_crypto::identity::SigningContext;
use messenger_crypto::prekey::{OneTimePrekey, OneTimePrekeyPair, SignedPrekeyPair};
use messenger_proto::ErrorCode;
use messenger_proto::msg::{
    Envelope, Login, Push, Reply, Request, ServerFrame, roster_signed_bytes,
};
use messenger_rendezvous::limits::Limits;
use messenger_rendezvous::rate::Rate;
use messenger_rendezvous::service::{LIVE_SEQ_BIT, ServiceConfig};
use messenger_rendezvous::store::StoreOptions;
use rand::SeedableRng;
use rand::rngs::StdRng;
use support::real::{
    Person, address, fast_service, logged_in, login, person, person_with, register, register_all,
    register_fields, registered_and_logged_in, roster, send, start_app, start_with, temp_dir,
};
use support::{TestClient, WAIT, client_endpoint, close_code, connect_raw};

fn group_send(group: &str, id: u8, body: &[u8]) -> Request {
    Request::GroupSend {
        group: group.into(),
        id: [id; 16],
        body: body.to_vec(),
    }
}

fn members(group: &str) -> Request {
    Request::GroupMembers {
        group: group.into(),
    }
}

/// Everything in `c`'s mailbox, oldest first (several pulls if need be).
async fn pull_all(c: &mut TestClient) -> Vec<Envelope> {
    let mut out: Vec<Envelope> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.seq);
        let r = c.request(Request::Pull { after, max: 256 }).await;
        let Ok(Reply::Envelopes { envelopes, more }) = r else {
            panic!("pull: {r:?}")
        };
        out.extend(envelopes);
        if !more {
            return out;
        }
    }
}

/// The first push matching `pred`, kept earlier by `c` or read now (other
/// pushes read meanwhile are kept). Bounded by [`WAIT`].
async fn wait_push(c: &mut TestClient, what: &str, pred: impl Fn(&Push) -> bool) -> Push {
    if let Some(i) = c.pushes.iter().position(&pred) {
        return c.pushes.remove(i);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no {what} within {WAIT:?}");
        match c.frame().await {
            Ok(ServerFrame::Push(p)) if pred(&p) => return p,
            Ok(ServerFrame::Push(p)) => c.pushes.push(p),
            other => panic!("waiting for {what}: {other:?}"),
        }
    }
}

fn envelopes_in(pushes: &[Push]) -> Vec<&Envelope> {
    pushes
        .iter()
        .filter_map(|p| match p {
            Push::Envelope(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// 1. Registration with a signed prekey signed by another identity is
/// refused; a taken name (also in another case) is refused; a login signed
/// for another connection is refused by the real service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_login_are_checked_over_quic() {
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let alice = person("alice", 1);
    let mallory = person("mallory", 2);
    let other = person("other", 3);

    let mut c = TestClient::connect(addr, &fp).await;
    let mut forged = register_fields(&mallory);
    forged.signed_prekey = other.spk.public().to_bytes();
    assert_eq!(
        c.request(Request::Register(forged)).await,
        Err(ErrorCode::BadSignature)
    );
    // Nothing was created: the honest registration of the name works.
    assert_eq!(c.request(register(&mallory)).await, Ok(Reply::Ok));

    assert_eq!(c.request(register(&alice)).await, Ok(Reply::Ok));
    assert_eq!(
        c.request(register(&alice)).await,
        Err(ErrorCode::UserExists)
    );
    for taken in ["ALICE", "Alice"] {
        let twin = person(taken, 4);
        assert_eq!(
            c.request(register(&twin)).await,
            Err(ErrorCode::UserExists),
            "{taken}"
        );
    }

    // Channel binding (T-34) by the real service.
    let mut first = TestClient::connect(addr, &fp).await;
    let mut second = TestClient::connect(addr, &fp).await;
    let sig = alice.id.sign_login(&first.hello.nonce, &first.exporter());
    let login_with = |sig: [u8; 64]| {
        Request::Login(Login {
            username: "alice".into(),
            signature: sig.to_vec(),
        })
    };
    assert_eq!(
        second.request(login_with(sig)).await,
        Err(ErrorCode::BadSignature),
        "a signature made for another connection"
    );
    let relayed = alice.id.sign_login(&second.hello.nonce, &first.exporter());
    assert_eq!(
        second.request(login_with(relayed)).await,
        Err(ErrorCode::BadSignature),
        "this connection's nonce, another connection's exporter"
    );
    // Still not logged in there.
    assert_eq!(
        second.request(Request::Users).await,
        Err(ErrorCode::NotAuthenticated)
    );
    // The signature itself was good: on its own connection it logs in.
    assert_eq!(
        first.request(login_with(sig)).await,
        Ok(Reply::LoggedIn {
            pending: 0,
            prekeys: 5
        })
    );
    running.handle.shutdown().await;
}

/// 2. T-39 over QUIC: 20 one-time prekeys, 6 users fetching concurrently
/// on their own connections, 30 fetches: each prekey handed out exactly
/// once, then bundles with the signed prekey only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_prekeys_handed_out_once_under_concurrent_fetches() {
    const PREKEYS: u32 = 20;
    const FETCHERS: u64 = 6;
    const EACH: usize = 5;
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let bob = person_with("bob", 10, PREKEYS);
    let mut b = registered_and_logged_in(addr, &fp, &bob).await;
    let registered: HashSet<Vec<u8>> = bob.opks.iter().map(|k| k.public().to_bytes()).collect();
    let fetchers: Vec<Person> = (0..FETCHERS)
        .map(|i| person_with(&format!("f{i}"), 100 + i, 0))
        .collect();
    let mut clients = Vec::new();
    for f in &fetchers {
        clients.push(registered_and_logged_in(addr, &fp, f).await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut tasks = Vec::new();
    for mut c in clients {
        let start = Arc::clone(&start);
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            // Pipelined: all five in flight at once on this connection.
            let mut ids = Vec::new();
            for _ in 0..EACH {
                ids.push(
                    c.send_request(Request::FetchBundle {
                        username: "bob".into(),
                    })
                    .await,
                );
            }
            let mut got = Vec::new();
            while got.len() < EACH {
                match c.frame().await.unwrap() {
                    ServerFrame::Reply { id, result } => {
                        assert!(ids.contains(&id), "reply to {id}");
                        got.push(result);
                    }
                    ServerFrame::Push(_) => {}
                    other => panic!("{other:?}"),
                }
            }
            (c, got)
        }));
    }
    let (identity, signed_prekey) = (bob.id.public().to_bytes(), bob.spk.public().to_bytes());
    let mut ids = HashSet::new();
    let mut keys = HashSet::new();
    let mut handed = HashSet::new();
    let mut without = 0;
    let mut fetcher = None;
    for t in tasks {
        let (c, got) = tokio::time::timeout(WAIT * 2, t)
            .await
            .expect("fetches answered in time")
            .unwrap();
        for r in got {
            let Ok(Reply::Bundle {
                identity: i,
                signed_prekey: s,
                one_time_prekey,
            }) = r
            else {
                panic!("{r:?}")
            };
            assert_eq!((i, s), (identity.clone(), signed_prekey.clone()));
            match one_time_prekey {
                Some(bytes) => {
                    let opk = OneTimePrekey::from_bytes(&bytes).unwrap();
                    assert!(ids.insert(opk.id()), "prekey id {} twice", opk.id());
                    assert!(keys.insert(*opk.key().as_bytes()), "prekey key twice");
                    assert!(registered.contains(&bytes), "not one of bob's prekeys");
                    handed.insert(bytes);
                }
                None => without += 1,
            }
        }
        fetcher = Some(c);
    }
    assert_eq!(ids.len(), PREKEYS as usize);
    assert_eq!(handed, registered);
    assert_eq!(without, FETCHERS as usize * EACH - PREKEYS as usize);
    // Exhausted: the next bundle carries the signed prekey only.
    let mut f = fetcher.unwrap();
    assert_eq!(
        f.request(Request::FetchBundle {
            username: "bob".into()
        })
        .await,
        Ok(Reply::Bundle {
            identity: identity.clone(),
            signed_prekey: signed_prekey.clone(),
            one_time_prekey: None,
        })
    );
    assert_eq!(
        b.request(Request::PrekeyStatus).await,
        Ok(Reply::PrekeyStatus {
            remaining: 0,
            low: true
        })
    );
    running.handle.shutdown().await;
}

/// 3. A resend of the same envelope id to an offline recipient is stored
/// once and answered `duplicate`; the recipient gets it once, in order,
/// and after its `Ack` the mailbox is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_are_stored_once_and_acks_empty_the_mailbox() {
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let (alice, bob) = (person("alice", 20), person("bob", 21));
    register_all(addr, &fp, &[&bob]).await;
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;

    let mut seqs = Vec::new();
    for i in 1..=2u8 {
        let r = a.request(send("bob", i, &[i; 10])).await;
        let Ok(Reply::Accepted {
            seq,
            duplicate: false,
        }) = r
        else {
            panic!("send {i}: {r:?}")
        };
        assert_eq!(seq & LIVE_SEQ_BIT, 0, "stored, bob is offline");
        seqs.push(seq);
    }
    // The same id again.
    assert_eq!(
        a.request(send("bob", 2, &[2; 10])).await,
        Ok(Reply::Accepted {
            seq: seqs[1],
            duplicate: true
        })
    );
    let r = a.request(send("bob", 3, &[3; 10])).await;
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

    let mut b = TestClient::connect(addr, &fp).await;
    let reply = login(&mut b, &bob).await;
    assert!(
        matches!(reply, Reply::LoggedIn { pending: 3, .. }),
        "{reply:?}"
    );
    let pulled = pull_all(&mut b).await;
    let got: Vec<([u8; 16], u8)> = pulled.iter().map(|e| (e.id, e.body[0])).collect();
    assert_eq!(got, vec![([1; 16], 1), ([2; 16], 2), ([3; 16], 3)]);
    assert!(
        pulled
            .iter()
            .all(|e| e.from == "alice" && e.group.is_none())
    );
    assert!(pulled.windows(2).all(|w| w[0].seq < w[1].seq));
    // Nothing pushed besides: no second copy under another seq.
    let pulled_seqs: HashSet<u64> = pulled.iter().map(|e| e.seq).collect();
    assert!(
        envelopes_in(&b.pushes)
            .iter()
            .all(|e| pulled_seqs.contains(&e.seq)),
        "{:?}",
        b.pushes
    );

    let seqs: Vec<u64> = pulled.iter().map(|e| e.seq).collect();
    assert_eq!(b.request(Request::Ack { seqs }).await, Ok(Reply::Ok));
    assert!(pull_all(&mut b).await.is_empty());
    // Also as seen by a new login.
    let mut b2 = TestClient::connect(addr, &fp).await;
    let reply = login(&mut b2, &bob).await;
    assert!(
        matches!(reply, Reply::LoggedIn { pending: 0, .. }),
        "{reply:?}"
    );
    running.handle.shutdown().await;
}

/// 4. T-38 over QUIC: sends beyond the user's send rate are answered
/// `rate_limited`, the connection and the server keep serving, another
/// user is unaffected, and after a wait a send is accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_rate_limited_over_quic() {
    let dir = temp_dir();
    // Bursts of 3, then one token every 2 s.
    let service = ServiceConfig {
        send_rate: Rate::per(1, Duration::from_secs(2), 3),
        ..fast_service()
    };
    let running = start_with(&dir, Limits::default(), service, StoreOptions::default());
    let (addr, fp) = address(&running);
    let (alice, bob, carol) = (person("alice", 30), person("bob", 31), person("carol", 32));
    register_all(addr, &fp, &[&bob, &carol]).await;
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;

    let mut accepted = Vec::new();
    let mut limited = 0;
    for i in 1..=8u8 {
        match a.request(send("bob", i, &[i; 8])).await {
            Ok(Reply::Accepted { .. }) => accepted.push(i),
            Err(ErrorCode::RateLimited) => limited += 1,
            other => panic!("send {i}: {other:?}"),
        }
    }
    assert_eq!(accepted, vec![1, 2, 3]);
    assert_eq!(limited, 5);
    // The connection is still served, and other users can still send.
    assert!(matches!(
        a.request(Request::Users).await,
        Ok(Reply::Users { .. })
    ));
    let mut c = logged_in(addr, &fp, &carol).await;
    assert!(matches!(
        c.request(send("bob", 100, &[100; 8])).await,
        Ok(Reply::Accepted { .. })
    ));
    // After a token is back, alice may send again.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert!(matches!(
        a.request(send("bob", 9, &[9; 8])).await,
        Ok(Reply::Accepted { .. })
    ));

    let mut b = logged_in(addr, &fp, &bob).await;
    let got: Vec<(String, u8)> = pull_all(&mut b)
        .await
        .iter()
        .map(|e| (e.from.clone(), e.body[0]))
        .collect();
    let want: Vec<(String, u8)> = [
        ("alice", 1),
        ("alice", 2),
        ("alice", 3),
        ("carol", 100),
        ("alice", 9),
    ]
    .iter()
    .map(|(f, n)| ((*f).to_owned(), *n))
    .collect();
    assert_eq!(got, want, "only accepted envelopes were stored");
    running.handle.shutdown().await;
}

/// 5. T-41 over QUIC: a recipient's mailbox count quota and bytes quota
/// are answered `quota_exceeded`; everything accepted before is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_quotas_over_quic() {
    let dir = temp_dir();
    let store = StoreOptions {
        mailbox_max_messages: 3,
        mailbox_max_bytes: 10_000,
        ..StoreOptions::default()
    };
    let running = start_with(&dir, Limits::default(), fast_service(), store);
    let (addr, fp) = address(&running);
    let (alice, bob, carol) = (person("alice", 40), person("bob", 41), person("carol", 42));
    register_all(addr, &fp, &[&bob, &carol]).await;
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;

    // Count: three small envelopes fit bob's mailbox, a fourth does not.
    for i in 1..=3u8 {
        let r = a.request(send("bob", i, &[i; 4])).await;
        assert!(matches!(r, Ok(Reply::Accepted { .. })), "send {i}: {r:?}");
    }
    for i in 4..=5u8 {
        assert_eq!(
            a.request(send("bob", i, &[i; 4])).await,
            Err(ErrorCode::QuotaExceeded),
            "send {i}"
        );
    }
    // Bytes: one large body fits carol's mailbox, the next one does not
    // (two envelopes: far below the count quota).
    let r = a.request(send("carol", 1, &[0xC1; 9_000])).await;
    assert!(matches!(r, Ok(Reply::Accepted { .. })), "{r:?}");
    assert_eq!(
        a.request(send("carol", 2, &[0xC2; 2_000])).await,
        Err(ErrorCode::QuotaExceeded)
    );
    // A small one still fits her bytes.
    let r = a.request(send("carol", 3, &[0xC3; 500])).await;
    assert!(matches!(r, Ok(Reply::Accepted { .. })), "{r:?}");

    let mut b = logged_in(addr, &fp, &bob).await;
    let got: Vec<Vec<u8>> = pull_all(&mut b).await.into_iter().map(|e| e.body).collect();
    assert_eq!(got, vec![vec![1; 4], vec![2; 4], vec![3; 4]]);
    let mut c = logged_in(addr, &fp, &carol).await;
    let got: Vec<Vec<u8>> = pull_all(&mut c).await.into_iter().map(|e| e.body).collect();
    assert_eq!(got, vec![vec![0xC1; 9_000], vec![0xC3; 500]]);
    running.handle.shutdown().await;
}

/// 6. Groups over QUIC: fan-out to online and offline members, not to the
/// sender; non-members refused; a member's roster refused (nothing
/// changes); a removed member is told and can no longer send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_over_quic() {
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let (alice, bob, carol, mallory) = (
        person("alice", 50),
        person("bob", 51),
        person("carol", 52),
        person("mallory", 53),
    );
    register_all(addr, &fp, &[&alice, &bob, &carol, &mallory]).await;
    let mut a = logged_in(addr, &fp, &alice).await;
    let mut b = logged_in(addr, &fp, &bob).await;
    let mut m = logged_in(addr, &fp, &mallory).await;

    // Carol is offline.
    let v1 = roster(&alice, "club", 1, &["alice", "bob", "carol"]);
    assert_eq!(
        a.request(Request::GroupCreate(v1.clone())).await,
        Ok(Reply::Ok)
    );
    let told = wait_push(&mut b, "bob's GroupChanged", |p| {
        matches!(p, Push::GroupChanged(_))
    })
    .await;
    assert_eq!(told, Push::GroupChanged(v1.clone()));

    let body = b"one ciphertext for everyone".to_vec();
    let r = a.request(group_send("club", 1, &body)).await;
    assert!(matches!(r, Ok(Reply::Accepted { .. })), "{r:?}");
    // Not to the sender: nothing pushed to alice before her reply, nothing
    // in her mailbox.
    assert!(envelopes_in(&a.pushes).is_empty(), "{:?}", a.pushes);
    assert!(pull_all(&mut a).await.is_empty());
    // Online bob gets it pushed.
    let Push::Envelope(e) =
        wait_push(&mut b, "bob's envelope", |p| matches!(p, Push::Envelope(_))).await
    else {
        unreachable!()
    };
    assert_eq!(
        (e.from.as_str(), e.group.as_deref(), e.id, &e.body),
        ("alice", Some("club"), [1; 16], &body)
    );
    // Offline carol pulls it at her login.
    let mut c = logged_in(addr, &fp, &carol).await;
    let pulled = pull_all(&mut c).await;
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    assert_eq!(
        (
            pulled[0].from.as_str(),
            pulled[0].group.as_deref(),
            pulled[0].id,
            &pulled[0].body
        ),
        ("alice", Some("club"), [1; 16], &body)
    );
    let seqs = vec![pulled[0].seq];
    assert_eq!(c.request(Request::Ack { seqs }).await, Ok(Reply::Ok));

    // A non-member can neither send nor read the roster.
    assert_eq!(
        m.request(group_send("club", 2, b"spam")).await,
        Err(ErrorCode::NotInGroup)
    );
    assert_eq!(m.request(members("club")).await, Err(ErrorCode::NotInGroup));

    // A member who is not the owner cannot publish a roster: neither one
    // naming himself owner nor one naming the owner but signed by him.
    let own = roster(&bob, "club", 2, &["alice", "bob", "carol", "mallory"]);
    let r = b.request(Request::GroupUpdate(own)).await;
    assert!(
        matches!(r, Err(ErrorCode::NotPermitted | ErrorCode::BadSignature)),
        "{r:?}"
    );
    let mut forged = roster(&alice, "club", 2, &["alice", "bob", "mallory"]);
    let bytes = roster_signed_bytes("club", 2, "alice", &forged.members).unwrap();
    forged.signature = bob.id.sign(SigningContext::GroupRoster, &bytes).to_vec();
    let r = b.request(Request::GroupUpdate(forged)).await;
    assert!(
        matches!(r, Err(ErrorCode::NotPermitted | ErrorCode::BadSignature)),
        "{r:?}"
    );
    assert_eq!(
        b.request(members("club")).await,
        Ok(Reply::Roster(v1.clone())),
        "the roster is unchanged"
    );
    assert_eq!(m.request(members("club")).await, Err(ErrorCode::NotInGroup));

    // The owner removes carol: she is told, and can no longer send.
    let v2 = roster(&alice, "club", 2, &["alice", "bob"]);
    assert_eq!(
        a.request(Request::GroupUpdate(v2.clone())).await,
        Ok(Reply::Ok)
    );
    let told = wait_push(&mut c, "carol's GroupChanged", |p| {
        matches!(p, Push::GroupChanged(_))
    })
    .await;
    assert_eq!(told, Push::GroupChanged(v2.clone()));
    let told = wait_push(
        &mut b,
        "bob's GroupChanged v2",
        |p| matches!(p, Push::GroupChanged(r) if r.version == 2),
    )
    .await;
    assert_eq!(told, Push::GroupChanged(v2.clone()));
    assert_eq!(
        c.request(group_send("club", 3, b"still here?")).await,
        Err(ErrorCode::NotInGroup)
    );
    assert_eq!(c.request(members("club")).await, Err(ErrorCode::NotInGroup));
    // The remaining members still talk; carol gets nothing more.
    let r = b.request(group_send("club", 4, b"just us")).await;
    assert!(matches!(r, Ok(Reply::Accepted { .. })), "{r:?}");
    let Push::Envelope(e) = wait_push(&mut a, "alice's envelope", |p| {
        matches!(p, Push::Envelope(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!((e.from.as_str(), &e.body[..]), ("bob", &b"just us"[..]));
    assert!(pull_all(&mut c).await.is_empty());
    assert!(envelopes_in(&c.pushes).is_empty(), "{:?}", c.pushes);
    running.handle.shutdown().await;
}

/// 7. A friend request to an offline user, declined at their login: the
/// requester is told `accepted: false`, and they are not friends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_friend_request_over_quic() {
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let (alice, bob) = (person("alice", 60), person("bob", 61));
    register_all(addr, &fp, &[&bob]).await;
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;
    let friend = |username: &str| Request::FriendRequest {
        username: username.into(),
    };
    assert_eq!(a.request(friend("bob")).await, Ok(Reply::Ok));
    assert_eq!(
        a.request(Request::FriendList).await,
        Ok(Reply::Friends {
            friends: vec![],
            incoming: vec![],
            outgoing: vec!["bob".into()],
        })
    );

    let mut b = logged_in(addr, &fp, &bob).await;
    let asked = wait_push(&mut b, "bob's FriendRequest", |p| {
        matches!(p, Push::FriendRequest { .. })
    })
    .await;
    assert_eq!(
        asked,
        Push::FriendRequest {
            from: "alice".into()
        }
    );
    assert_eq!(
        b.request(Request::FriendList).await,
        Ok(Reply::Friends {
            friends: vec![],
            incoming: vec!["alice".into()],
            outgoing: vec![],
        })
    );
    assert_eq!(
        b.request(Request::FriendDecline {
            username: "alice".into()
        })
        .await,
        Ok(Reply::Ok)
    );
    let answer = wait_push(&mut a, "alice's FriendAnswer", |p| {
        matches!(p, Push::FriendAnswer { .. })
    })
    .await;
    assert_eq!(
        answer,
        Push::FriendAnswer {
            from: "bob".into(),
            accepted: false
        }
    );
    let none = Ok(Reply::Friends {
        friends: vec![],
        incoming: vec![],
        outgoing: vec![],
    });
    assert_eq!(a.request(Request::FriendList).await, none);
    assert_eq!(b.request(Request::FriendList).await, none);
    // The request is gone: it cannot be accepted afterwards.
    assert_eq!(
        b.request(Request::FriendAccept {
            username: "alice".into()
        })
        .await,
        Err(ErrorCode::NotPermitted)
    );
    assert_eq!(
        a.request(Request::FriendRemove {
            username: "bob".into()
        })
        .await,
        Err(ErrorCode::NotFriend)
    );
    // No presence was shared.
    assert!(
        !a.pushes.iter().any(|p| matches!(p, Push::Presence { .. })),
        "{:?}",
        a.pushes
    );
    running.handle.shutdown().await;
}

/// 8. A second login of the same user replaces the first connection: the
/// old one is told (`Replaced`) and closed (703); once the server has
/// finished with it, the user is still online and still gets envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacing_login_keeps_the_user_online() {
    let dir = temp_dir();
    // Three connections at once: the server frees the old connection's
    // slot only after it has processed its disconnect (`net.rs` `serve`:
    // the slot is dropped after `on_disconnect`), so a fourth connection
    // is let in only then.
    let mut limits = Limits::default();
    limits.max_connections_per_ip = 3;
    let running = start_with(&dir, limits, fast_service(), StoreOptions::default());
    let (addr, fp) = address(&running);
    let (alice, bob, carol) = (person("alice", 70), person("bob", 71), person("carol", 72));
    let mut c = TestClient::connect(addr, &fp).await;
    for p in [&alice, &bob, &carol] {
        assert_eq!(c.request(register(p)).await, Ok(Reply::Ok));
    }
    login(&mut c, &carol).await;
    let mut old = logged_in(addr, &fp, &bob).await;
    let mut new = logged_in(addr, &fp, &bob).await;

    let replaced = wait_push(&mut old, "Replaced", |p| matches!(p, Push::Replaced)).await;
    assert_eq!(replaced, Push::Replaced);
    assert_eq!(close_code(&old.conn, WAIT).await, Some(703));

    // Wait (bounded) for the old connection's slot, i.e. for the server to
    // have processed its close.
    let deadline = Instant::now() + WAIT;
    let endpoint = client_endpoint(&fp);
    let conn = loop {
        match connect_raw(&endpoint, addr).await {
            Ok(conn) => break conn,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the old connection's slot was never freed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut a = TestClient::on(endpoint, conn).await;
    login(&mut a, &alice).await;

    // Bob is still online, seen by carol.
    let r = c.request(Request::Users).await;
    let Ok(Reply::Users { users }) = r else {
        panic!("{r:?}")
    };
    assert!(
        users.iter().any(|u| u.username == "bob" && u.online),
        "{users:?}"
    );
    // And a message to him reaches the new connection (live).
    let sent = a.send_request(send("bob", 1, b"still there?")).await;
    let Push::Envelope(e) = wait_push(&mut new, "bob's envelope", |p| {
        matches!(p, Push::Envelope(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (e.from.as_str(), &e.body[..]),
        ("alice", &b"still there?"[..])
    );
    assert_ne!(e.seq & LIVE_SEQ_BIT, 0, "delivered live: bob is online");
    assert_eq!(
        new.request(Request::Ack { seqs: vec![e.seq] }).await,
        Ok(Reply::Ok)
    );
    loop {
        match a.frame().await.unwrap() {
            ServerFrame::Reply { id, result } => {
                assert_eq!(id, sent);
                assert_eq!(
                    result,
                    Ok(Reply::Accepted {
                        seq: e.seq,
                        duplicate: false
                    })
                );
                break;
            }
            ServerFrame::Push(_) => {}
            other => panic!("{other:?}"),
        }
    }
    running.handle.shutdown().await;
}

/// 9. Prekey maintenance over QUIC: an upload raises the remaining count
/// (a reused id is refused), and a signed prekey rotation is checked
/// against the identity key; the bundle carries the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prekey_upload_and_signed_prekey_rotation_over_quic() {
    let dir = temp_dir();
    let running = start_app(Limits::default(), &dir);
    let (addr, fp) = address(&running);
    let (alice, mut bob, mallory) = (
        person("alice", 80),
        person("bob", 81),
        person("mallory", 82),
    );
    register_all(addr, &fp, &[&bob]).await;
    let mut a = registered_and_logged_in(addr, &fp, &alice).await;
    let mut b = TestClient::connect(addr, &fp).await;
    assert_eq!(
        login(&mut b, &bob).await,
        Reply::LoggedIn {
            pending: 0,
            prekeys: 5
        }
    );
    let status = |remaining| {
        Ok(Reply::PrekeyStatus {
            remaining,
            low: remaining < 20,
        })
    };
    assert_eq!(b.request(Request::PrekeyStatus).await, status(5));

    let mut rng = StdRng::seed_from_u64(83);
    let fresh = OneTimePrekeyPair::generate_batch(&mut bob.counter, 25, &mut rng).unwrap();
    let upload = Request::UploadPrekeys {
        one_time_prekeys: fresh.iter().map(|k| k.public().to_bytes()).collect(),
    };
    assert_eq!(b.request(upload.clone()).await, status(30));
    assert_eq!(b.request(Request::PrekeyStatus).await, status(30));
    // The same ids again are refused, and change nothing.
    assert_eq!(b.request(upload).await, Err(ErrorCode::BadRequest));
    assert_eq!(b.request(Request::PrekeyStatus).await, status(30));

    let fetch = || Request::FetchBundle {
        username: "bob".into(),
    };
    let spk_of = |r: Result<Reply, ErrorCode>| match r {
        Ok(Reply::Bundle { signed_prekey, .. }) => signed_prekey,
        other => panic!("{other:?}"),
    };
    let old_spk = bob.spk.public().to_bytes();
    // Signed by another identity.
    let foreign = SignedPrekeyPair::generate(&mallory.id, &mut bob.counter, &mut rng).unwrap();
    assert_eq!(
        b.request(Request::RotateSignedPrekey {
            signed_prekey: foreign.public().to_bytes()
        })
        .await,
        Err(ErrorCode::BadSignature)
    );
    // Bob's own, with its signature damaged.
    let next = SignedPrekeyPair::generate(&bob.id, &mut bob.counter, &mut rng).unwrap();
    let mut damaged = next.public().to_bytes();
    *damaged.last_mut().unwrap() ^= 1;
    assert_eq!(
        b.request(Request::RotateSignedPrekey {
            signed_prekey: damaged
        })
        .await,
        Err(ErrorCode::BadSignature)
    );
    assert_eq!(spk_of(a.request(fetch()).await), old_spk, "unchanged");
    // The good one.
    assert_eq!(
        b.request(Request::RotateSignedPrekey {
            signed_prekey: next.public().to_bytes()
        })
        .await,
        Ok(Reply::Ok)
    );
    let r = a.request(fetch()).await;
    let Ok(Reply::Bundle {
        identity,
        signed_prekey,
        one_time_prekey,
    }) = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(identity, bob.id.public().to_bytes());
    assert_eq!(signed_prekey, next.public().to_bytes());
    assert!(one_time_prekey.is_some());
    assert_eq!(b.request(Request::PrekeyStatus).await, status(28));
    running.handle.shutdown().await;
}

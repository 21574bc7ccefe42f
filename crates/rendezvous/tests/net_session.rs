//! A connection's life over real QUIC on 127.0.0.1: hello, channel-bound
//! login (T-34), pushes, the push-queue limit, shutdown, ALPN.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use messenger_crypto::identity::IdentityKeyPair;
use messenger_proto::msg::{Login, OutgoingEnvelope, Push, Reply, Request, ServerFrame};
use messenger_proto::{ErrorCode, PROTOCOL_VERSION};
use messenger_rendezvous::handler::CloseReason;
use messenger_rendezvous::limits::{Limits, MAX_PIPELINED};
use messenger_rendezvous::pin::pinned_client_config;
use support::*;

fn handler_with(name: &str, id: &IdentityKeyPair) -> TestHandler {
    let mut handler = TestHandler::default();
    handler.keys.insert(name.to_owned(), *id.identity_key());
    handler
}

fn login(name: &str, signature: [u8; 64]) -> Request {
    Request::Login(Login {
        username: name.to_owned(),
        signature: signature.to_vec(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_carries_version_key_and_a_fresh_nonce() {
    let server = start(TestHandler::default(), Limits::default());
    let a = TestClient::connect(server.addr(), &server.fingerprint()).await;
    let b = TestClient::connect(server.addr(), &server.fingerprint()).await;
    assert_eq!(a.hello.version, PROTOCOL_VERSION);
    assert_eq!(a.hello.server_key, SERVER_KEY);
    assert_ne!(a.hello.nonce, b.hello.nonce);
    assert_ne!(a.hello.nonce, [0; 32]);
    assert_ne!(a.exporter(), b.exporter());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_bound_to_its_connection() {
    let id = IdentityKeyPair::generate(&mut rand::rng());
    let server = start(handler_with("alice", &id), Limits::default());
    let fp = server.fingerprint();

    let mut first = TestClient::connect(server.addr(), &fp).await;
    let signature = id.sign_login(&first.hello.nonce, &first.exporter());
    assert_eq!(
        first.request(login("alice", signature)).await,
        Ok(Reply::LoggedIn {
            pending: 0,
            prekeys: 0
        })
    );

    // The same signature replayed on a second connection (T-34).
    let mut second = TestClient::connect(server.addr(), &fp).await;
    assert_eq!(
        second.request(login("alice", signature)).await,
        Err(ErrorCode::BadSignature)
    );
    // This connection's nonce relayed, but signed with another
    // connection's exporter (a relaying man in the middle).
    let relayed = id.sign_login(&second.hello.nonce, &first.exporter());
    assert_eq!(
        second.request(login("alice", relayed)).await,
        Err(ErrorCode::BadSignature)
    );
    // Signed properly, it works on the second connection too.
    let own = id.sign_login(&second.hello.nonce, &second.exporter());
    assert!(second.request(login("alice", own)).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_arrive_in_order() {
    let server = start(TestHandler::default(), Limits::default());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    let count = 200;
    assert_eq!(
        client
            .request(Request::Pull {
                after: 0,
                max: count
            })
            .await,
        Ok(Reply::Ok)
    );
    // Pushes queued before the reply may still trail it: read them all.
    while client.pushes.len() < count as usize {
        match client.frame().await.unwrap() {
            messenger_proto::msg::ServerFrame::Push(push) => client.pushes.push(push),
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected: Vec<Push> = (0..count)
        .map(|remaining| Push::PrekeysLow { remaining })
        .collect();
    assert_eq!(client.pushes, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_pushes_is_disconnected() {
    let handler = TestHandler::default();
    let full = handler.push_full.clone();
    let mut limits = Limits::default();
    limits.push_queue = 4;
    let server = start(handler, limits);
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    // 40 pushes of 100 KB: far more than the windows and the queue hold
    // while the client reads nothing.
    let mut id = [0u8; 16];
    id[0] = 40;
    client
        .send_request(Request::GroupSend {
            group: "g".into(),
            id,
            body: vec![0; 100_000],
        })
        .await;
    assert_eq!(
        close_code(&client.conn, WAIT).await,
        Some(CloseReason::TooSlow.code().into())
    );
    assert_eq!(full.load(Ordering::SeqCst), 1);
    // The server still serves others.
    let mut other = TestClient::connect(server.addr(), &server.fingerprint()).await;
    assert!(other.request(Request::Users).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_rate_are_answered_rate_limited() {
    let mut limits = Limits::default();
    limits.requests_per_second = 1;
    limits.request_burst = 3;
    let server = start(TestHandler::default(), limits);
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    let mut results = Vec::new();
    for _ in 0..5 {
        results.push(client.request(Request::Users).await);
    }
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    assert_eq!(results[4], Err(ErrorCode::RateLimited));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_overlap_and_reply_in_order_before_the_next_request() {
    let handler = TestHandler::default();
    let stats = Arc::clone(&handler.pipeline);
    let server = start(handler, Limits::default());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    let sends = 3 * MAX_PIPELINED;
    let mut ids = Vec::new();
    for i in 0..sends {
        // Later sends finish sooner: replies in completion order would be
        // out of request order.
        let delay = u8::try_from(sends - i).unwrap();
        ids.push(
            client
                .send_request(Request::Send(OutgoingEnvelope {
                    to: "bob".to_owned(),
                    to_device: 0,
                    id: [0; 16],
                    body: vec![delay],
                }))
                .await,
        );
    }
    ids.push(client.send_request(Request::Users).await);
    for (n, want) in ids.iter().enumerate() {
        let ServerFrame::Reply { id, result } = client.frame().await.unwrap() else {
            panic!("expected a reply");
        };
        assert_eq!(id, *want);
        if n < sends {
            let want_seq = u64::try_from(n).unwrap();
            assert_eq!(
                result,
                Ok(Reply::Accepted {
                    seq: want_seq,
                    duplicate: false
                })
            );
        } else {
            // Handled only once every send before it was complete.
            assert_eq!(result, Ok(Reply::Users { users: Vec::new() }));
        }
    }
    let most = stats.max_pending.load(Ordering::SeqCst);
    assert!(most > 1, "sends did not overlap");
    assert!(most <= MAX_PIPELINED, "{most} pending at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_drop_stops_the_server() {
    let handler = TestHandler::default();
    let disconnects = handler.disconnects.clone();
    let server = start(handler, Limits::default());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    assert!(client.request(Request::Users).await.is_ok());
    let addr = server.addr();
    let fp = server.fingerprint();
    tokio::time::timeout(WAIT, server.handle.shutdown())
        .await
        .expect("shutdown in time");
    assert_eq!(
        close_code(&client.conn, WAIT).await,
        Some(CloseReason::ShuttingDown.code().into())
    );
    assert_eq!(disconnects.load(Ordering::SeqCst), 1);
    // Nothing listens any more.
    let endpoint = client_endpoint(&fp);
    let attempt = tokio::time::timeout(
        Duration::from_secs(3),
        endpoint.connect(addr, "localhost").unwrap(),
    )
    .await;
    assert!(!matches!(attempt, Ok(Ok(_))));

    // Drop.
    let server = start(TestHandler::default(), Limits::default());
    let client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    drop(server.handle);
    assert_eq!(
        close_code(&client.conn, WAIT).await,
        Some(CloseReason::ShuttingDown.code().into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_alpn_is_refused() {
    let server = start(TestHandler::default(), Limits::default());
    let mut tls = pinned_client_config(&server.fingerprint()).unwrap();
    tls.alpn_protocols = vec![b"messenger/2".to_vec()];
    let endpoint = client_endpoint_with(tls);
    let error = connect_raw(&endpoint, server.addr()).await.unwrap_err();
    assert!(
        error.to_string().contains("no_application_protocol") || error.to_string().contains("120"),
        "{error}"
    );
    // The right one still works.
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    assert!(client.request(Request::Users).await.is_ok());
}

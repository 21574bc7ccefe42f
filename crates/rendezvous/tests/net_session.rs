//! A connection's life over real QUIC on 127.0.0.1: hello, channel-bound
//! login (T-34), pushes, the push-queue limit, shutdown, ALPN.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use messenger_crypto::identity::IdentityKeyPair;
use messenger_proto::msg::{
    ClientFrame, Login, NOTIFY_ID, OutgoingEnvelope, Push, Reply, Request, ServerFrame,
};
use messenger_proto::{ErrorCode, PROTOCOL_VERSION, encode};
use messenger_rendezvous::handler::CloseReason;
use messenger_rendezvous::limits::{Limits, MAX_PIPELINED, MAX_READ_AHEAD, MAX_READ_AHEAD_BYTES};
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

fn send_to(to: &str, body: Vec<u8>) -> Request {
    Request::Send(OutgoingEnvelope {
        to: to.to_owned(),
        to_device: 0,
        id: [0; 16],
        body,
    })
}

/// A send answered at once when its turn comes.
fn quick_send() -> Request {
    send_to("bob", vec![0])
}

fn ack(seqs: std::ops::Range<u64>) -> Request {
    Request::Ack {
        seqs: seqs.collect(),
    }
}

fn accepted(seq: u64) -> Result<Reply, ErrorCode> {
    Ok(Reply::Accepted {
        seq,
        duplicate: false,
    })
}

const PIPELINE: u64 = MAX_PIPELINED as u64;

/// Fills the pipeline with sends answered only once acknowledged (the
/// handler numbers every send it begins, from 0); returns their ids.
async fn fill_pipeline(client: &mut TestClient) -> Vec<u32> {
    let mut ids = Vec::new();
    for _ in 0..MAX_PIPELINED {
        ids.push(client.send_request(send_to(WAITS_FOR_ACK, vec![0])).await);
    }
    ids
}

/// Reads the replies to `ids` and checks they come in that order with
/// `want`.
async fn expect_replies(client: &mut TestClient, ids: &[u32], want: &[Result<Reply, ErrorCode>]) {
    assert_eq!(ids.len(), want.len());
    for (id, want) in ids.iter().zip(want) {
        match client.frame().await {
            Ok(ServerFrame::Reply { id: got, result }) => {
                assert_eq!((got, &result), (*id, want), "reply to {id}");
            }
            other => panic!("expected the reply to {id}, got {other:?}"),
        }
    }
}

/// A full pipeline of sends that wait for acknowledgements (live
/// deliveries to a peer whose own acks are what they wait for): the `Ack`s
/// behind them are read ahead and applied at once, whether the `Ack` is the
/// request waiting for room or behind one, while the other frames read
/// ahead keep their turn and every reply keeps request order. Without the
/// read-ahead this connection waits for ever (the handler has no grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_behind_a_full_pipeline_are_applied_and_replies_keep_order() {
    let handler = TestHandler::default();
    let stats = Arc::clone(&handler.pipeline);
    let server = start(handler, Limits::default());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;

    // The `Ack` is the request waiting for room.
    let mut ids = fill_pipeline(&mut client).await;
    ids.push(client.send_request(ack(0..PIPELINE)).await);
    let mut want: Vec<_> = (0..PIPELINE).map(accepted).collect();
    want.push(Ok(Reply::Ok));
    expect_replies(&mut client, &ids, &want).await;

    // The `Ack`s are behind a send waiting for room, and behind each other.
    let first = PIPELINE;
    let mut ids = fill_pipeline(&mut client).await;
    ids.push(client.send_request(quick_send()).await);
    ids.push(client.send_request(ack(first..first + PIPELINE / 2)).await);
    ids.push(client.send_request(quick_send()).await);
    ids.push(
        client
            .send_request(ack(first + PIPELINE / 2..first + PIPELINE))
            .await,
    );
    let mut want: Vec<_> = (first..first + PIPELINE).map(accepted).collect();
    want.extend([
        accepted(first + PIPELINE),
        Ok(Reply::Ok),
        accepted(first + PIPELINE + 1),
        Ok(Reply::Ok),
    ]);
    expect_replies(&mut client, &ids, &want).await;

    assert_eq!(stats.acks.load(Ordering::SeqCst), 3);
    let most = stats.max_pending.load(Ordering::SeqCst);
    assert!(most <= MAX_PIPELINED, "{most} sends pending at once");
}

/// An `Ack` read ahead behind a request that is not pipelined cannot be
/// begun ahead then; once that request is handled, and the pipeline is full
/// again with only sends before the `Ack`, it must be begun as the ones
/// read after a full pipeline are. Here the sends filling the pipeline again
/// wait for that very `Ack` (a peer's live sends): without it the
/// connection waits for ever (the test handler has no grace; the service's
/// sends would fall back to the mailbox after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_held_behind_a_request_handled_since_is_begun_ahead() {
    let handler = TestHandler::default();
    let stats = Arc::clone(&handler.pipeline);
    let server = start(handler, Limits::default());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    // A full pipeline of slow sends (0..16), and one more that waits for
    // room (16): all behind it is read ahead.
    let mut ids = Vec::new();
    for _ in 0..=MAX_PIPELINED {
        ids.push(client.send_request(send_to("bob", vec![200])).await);
    }
    // Not pipelined: the `Ack` below is read ahead behind it, and kept.
    ids.push(client.send_request(Request::Users).await);
    // Sends that wait for the `Ack` (17..33) fill the pipeline again once
    // `Users` is answered; one more (33) waits for room before the `Ack`.
    let first = PIPELINE + 1;
    for _ in 0..=MAX_PIPELINED {
        ids.push(client.send_request(send_to(WAITS_FOR_ACK, vec![0])).await);
    }
    notify(&mut client, ack(first..first + PIPELINE + 1)).await;
    let mut want: Vec<_> = (0..first).map(accepted).collect();
    want.push(Ok(Reply::Users { users: Vec::new() }));
    want.extend((first..=first + PIPELINE).map(accepted));
    tokio::time::timeout(
        Duration::from_secs(5),
        expect_replies(&mut client, &ids, &want),
    )
    .await
    .expect("the sends waiting for the held `Ack` are answered");
    assert_eq!(stats.acks.load(Ordering::SeqCst), 1);
}

/// Reading ahead of a full pipeline stops at `MAX_READ_AHEAD` frames or
/// `MAX_READ_AHEAD_BYTES` held: an `Ack` just inside either bound is
/// applied, one just beyond is not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_ahead_of_a_full_pipeline_stops_at_its_bounds() {
    // Two of these exceed the byte bound; one does not.
    let big = MAX_READ_AHEAD_BYTES * 3 / 5;
    let cases = [
        (vec![quick_send(); MAX_READ_AHEAD - 1], true),
        (vec![quick_send(); MAX_READ_AHEAD], false),
        (vec![send_to("bob", vec![0; big])], true),
        (vec![send_to("bob", vec![0; big]); 2], false),
    ];
    for (held, applied) in cases {
        let frames = held.len();
        let handler = TestHandler::default();
        let stats = Arc::clone(&handler.pipeline);
        let server = start(handler, Limits::default());
        let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
        let mut ids = fill_pipeline(&mut client).await;
        for request in held {
            ids.push(client.send_request(request).await);
        }
        ids.push(client.send_request(ack(0..PIPELINE)).await);
        if applied {
            let mut want: Vec<_> = (0..PIPELINE + frames as u64).map(accepted).collect();
            want.push(Ok(Reply::Ok));
            expect_replies(&mut client, &ids, &want).await;
        } else {
            let nothing = tokio::time::timeout(Duration::from_millis(500), client.frame()).await;
            assert!(nothing.is_err(), "{frames} held: got {nothing:?}");
        }
        let acks = stats.acks.load(Ordering::SeqCst);
        assert_eq!(acks, usize::from(applied), "{frames} held: {acks} acks");
    }
}

/// The frame timeout (slowloris) and the login deadline still hold while
/// the pipeline is full and the connection is read ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_hold_behind_a_full_pipeline() {
    let mut limits = Limits::default();
    limits.frame_timeout = Duration::from_millis(300);
    let server = start(TestHandler::default(), limits);
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    fill_pipeline(&mut client).await;
    client.send_request(quick_send()).await;
    // Half a length prefix, and no more.
    client.send.write_all(&[0, 0]).await.unwrap();
    assert_eq!(
        close_code(&client.conn, WAIT).await,
        Some(CloseReason::SlowFrame.code().into())
    );

    let mut limits = Limits::default();
    limits.login_timeout = Duration::from_millis(500);
    let server = start(TestHandler::default(), limits);
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    fill_pipeline(&mut client).await;
    client.send_request(quick_send()).await;
    assert_eq!(
        close_code(&client.conn, WAIT).await,
        Some(CloseReason::LoginTimeout.code().into())
    );
}

/// Frames read ahead of a full pipeline take their rate-limit tokens as
/// they are read: beyond the burst they are answered `rate_limited`, in
/// their turn, and an `Ack` beyond it is not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_read_ahead_are_rate_limited() {
    let mut limits = Limits::default();
    // No refill: exactly the burst is served.
    limits.requests_per_second = 0;
    limits.request_burst = u32::try_from(MAX_PIPELINED).unwrap() + 3;
    let handler = TestHandler::default();
    let stats = Arc::clone(&handler.pipeline);
    let server = start(handler, limits);
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    let mut ids = fill_pipeline(&mut client).await;
    ids.push(client.send_request(quick_send()).await);
    ids.push(client.send_request(ack(0..PIPELINE)).await);
    ids.push(client.send_request(quick_send()).await);
    ids.push(client.send_request(quick_send()).await);
    ids.push(client.send_request(ack(0..1)).await);
    let mut want: Vec<_> = (0..=PIPELINE).map(accepted).collect();
    want.extend([
        Ok(Reply::Ok),
        accepted(PIPELINE + 1),
        Err(ErrorCode::RateLimited),
        Err(ErrorCode::RateLimited),
    ]);
    expect_replies(&mut client, &ids, &want).await;
    assert_eq!(stats.acks.load(Ordering::SeqCst), 1);
}

/// A frame that does not decode, read ahead of a full pipeline, closes the
/// connection when its turn comes: the requests before it are handled
/// first, and nothing after it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_read_ahead_closes_the_connection_in_its_turn() {
    let handler = TestHandler::default();
    let stats = Arc::clone(&handler.pipeline);
    let server = start(handler, Limits::default());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    fill_pipeline(&mut client).await;
    client.send_request(quick_send()).await;
    client.send_request(ack(0..PIPELINE)).await;
    // A one-byte body that is no `ClientFrame` (an unfinished varint).
    client.send.write_all(&[0, 0, 0, 1, 0xFF]).await.unwrap();
    client.send_request(ack(0..1)).await;
    assert_eq!(
        close_code(&client.conn, WAIT).await,
        Some(CloseReason::BadRequest.code().into())
    );
    assert_eq!(stats.begun.load(Ordering::SeqCst), PIPELINE + 1);
    assert_eq!(stats.acks.load(Ordering::SeqCst), 1);
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

/// Writes `request` as a notification (request id [`NOTIFY_ID`]).
async fn notify(client: &mut TestClient, request: Request) {
    let bytes = encode(&ClientFrame {
        id: NOTIFY_ID,
        request,
    })
    .unwrap();
    client.send.write_all(&bytes).await.unwrap();
}

/// An `Ack` sent as a notification takes effect in its turn (the send
/// waiting for it is answered) and is never answered itself: the replies
/// that follow are those of the requests around it, in order. Also behind a
/// full pipeline, where it is read ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_notification_takes_effect_and_is_never_answered() {
    let handler = TestHandler::default();
    let stats = Arc::clone(&handler.pipeline);
    let server = start(handler, Limits::default());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;

    let first = client.send_request(send_to(WAITS_FOR_ACK, vec![0])).await;
    notify(&mut client, ack(0..1)).await;
    let ping = client.send_request(Request::Users).await;
    expect_replies(
        &mut client,
        &[first, ping],
        &[accepted(0), Ok(Reply::Users { users: Vec::new() })],
    )
    .await;

    // Behind a full pipeline of sends it acknowledges.
    let ids = fill_pipeline(&mut client).await;
    notify(&mut client, ack(1..1 + PIPELINE)).await;
    let ping = client.send_request(Request::Users).await;
    let mut want: Vec<_> = (1..1 + PIPELINE).map(accepted).collect();
    want.push(Ok(Reply::Users { users: Vec::new() }));
    expect_replies(&mut client, &[ids, vec![ping]].concat(), &want).await;
    assert_eq!(stats.acks.load(Ordering::SeqCst), 2);

    // Nothing else comes: no reply to id 0 was ever written.
    let _ = client.send.finish();
    match client.frame().await {
        Err(e) => assert_eq!(e, "stream finished"),
        Ok(frame) => panic!("unexpected frame after the last reply: {frame:?}"),
    }
}

/// Only an `Ack` may be a notification: any other request with id 0 could
/// not be answered, so it closes the connection as a bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_other_than_an_ack_closes_the_connection() {
    let server = start(TestHandler::default(), Limits::default());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    let ping = client.send_request(Request::Users).await;
    expect_replies(
        &mut client,
        &[ping],
        &[Ok(Reply::Users { users: Vec::new() })],
    )
    .await;
    notify(&mut client, Request::Users).await;
    assert!(client.frame().await.is_err());
    assert_eq!(
        close_code(&client.conn, WAIT).await,
        Some(CloseReason::BadRequest.code().into())
    );
}

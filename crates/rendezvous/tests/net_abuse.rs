//! Hostile peers over real QUIC on 127.0.0.1: malformed frames (T-30),
//! length-prefix lies (T-31), per-IP caps (T-35), stream floods (T-36),
//! silent connections (T-37).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use messenger_proto::msg::{ClientFrame, Login, Request, ServerFrame};
use messenger_proto::{MAX_FRAME_LEN, encode};
use messenger_rendezvous::handler::CloseReason;
use messenger_rendezvous::limits::{Limits, MAX_BIDI_STREAMS};
use messenger_rendezvous::net::STREAM_REFUSED;
use support::*;

fn code(reason: CloseReason) -> Option<u64> {
    Some(reason.code().into())
}

/// Sends raw bytes after the hello and finishes the stream; returns what
/// came back: `Ok(reply frame)` or `Err(close code)`.
async fn send_raw(
    addr: std::net::SocketAddr,
    fp: &str,
    bytes: &[u8],
) -> Result<ServerFrame, Option<u64>> {
    let mut client = TestClient::connect(addr, fp).await;
    client.send.write_all(bytes).await.unwrap();
    let _ = client.send.finish();
    match client.frame().await {
        Ok(frame) => Ok(frame),
        Err(_) => Err(close_code(&client.conn, Duration::from_secs(2)).await),
    }
}

fn valid_frame() -> Vec<u8> {
    encode(&ClientFrame {
        id: 7,
        request: Request::Login(Login {
            username: "alice".into(),
            signature: vec![0xAB; 64],
        }),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_connection() {
    let server = start(TestHandler::default(), roomy_limits());
    let (addr, fp) = (server.addr(), server.fingerprint());

    // An honest client keeps pinging meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let honest_ok = Arc::new(AtomicUsize::new(0));
    let honest = {
        let (stop, ok, fp) = (stop.clone(), honest_ok.clone(), fp.clone());
        tokio::spawn(async move {
            let mut client = TestClient::connect(addr, &fp).await;
            while !stop.load(Ordering::SeqCst) {
                client.request(Request::Users).await.unwrap();
                ok.fetch_add(1, Ordering::SeqCst);
                // Within the rate limit: every request must succeed.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let valid = valid_frame();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Bit flips in the body (the prefix intact, so the frame's end is known).
    for i in 0..48 {
        let mut bytes = valid.clone();
        let bit = (i * 37) % ((bytes.len() - 4) * 8);
        bytes[4 + bit / 8] ^= 1 << (bit % 8);
        cases.push((format!("flip bit {bit}"), bytes));
    }
    // Trailing bytes inside the frame.
    let mut trailing = valid.clone();
    trailing.push(0);
    let len = u32::try_from(trailing.len() - 4).unwrap();
    trailing[..4].copy_from_slice(&len.to_be_bytes());
    cases.push(("trailing byte".into(), trailing));
    // Unknown request variant: id 1, variant 200.
    cases.push(("unknown tag".into(), vec![0, 0, 0, 3, 1, 0xC8, 0x01]));
    // Truncated: the prefix promises more than is sent before the end.
    cases.push(("truncated".into(), valid[..valid.len() - 3].to_vec()));
    // A zero length prefix.
    cases.push(("empty frame".into(), vec![0, 0, 0, 0]));

    let (mut replies, mut closes) = (0, 0);
    for (name, bytes) in &cases {
        let started = Instant::now();
        match send_raw(addr, &fp, bytes).await {
            // Still a well-formed request: answered.
            Ok(ServerFrame::Reply { .. }) => replies += 1,
            Ok(other) => panic!("{name}: unexpected {other:?}"),
            Err(close) => {
                assert!(
                    close == code(CloseReason::BadRequest) || close == code(CloseReason::TooLarge),
                    "{name}: closed with {close:?}"
                );
                closes += 1;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name}: slow answer"
        );
    }
    for name in ["trailing byte", "unknown tag", "truncated", "empty frame"] {
        let bytes = &cases.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(
            send_raw(addr, &fp, bytes).await.is_err(),
            "{name} must close"
        );
    }
    assert!(closes >= 4, "replies {replies}, closes {closes}");

    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(WAIT, honest).await.unwrap().unwrap();
    assert!(honest_ok.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_length_prefix_closes_at_once() {
    let server = start(TestHandler::default(), roomy_limits());
    for len in [u32::MAX, u32::try_from(MAX_FRAME_LEN).unwrap() + 1] {
        let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
        let started = Instant::now();
        // The prefix alone, the body withheld and the stream left open.
        client.send.write_all(&len.to_be_bytes()).await.unwrap();
        assert_eq!(
            close_code(&client.conn, Duration::from_secs(2)).await,
            code(CloseReason::TooLarge),
            "length {len}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // A maximum-size frame is read (then refused as not a request).
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    let mut frame = u32::try_from(MAX_FRAME_LEN).unwrap().to_be_bytes().to_vec();
    frame.extend(vec![0xFFu8; MAX_FRAME_LEN]);
    client.send.write_all(&frame).await.unwrap();
    assert_eq!(
        close_code(&client.conn, WAIT).await,
        code(CloseReason::BadRequest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_preface_version_is_refused() {
    let server = start(TestHandler::default(), roomy_limits());
    let endpoint = client_endpoint(&server.fingerprint());
    let conn = connect_raw(&endpoint, server.addr()).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(&99u16).unwrap()).await.unwrap();
    assert_eq!(
        close_code(&conn, Duration::from_secs(2)).await,
        code(CloseReason::UnsupportedVersion)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_are_capped_and_freed() {
    let cap = 2;
    let mut limits = Limits::default();
    limits.max_connections_per_ip = cap;
    let server = start(TestHandler::default(), limits);
    let endpoint = client_endpoint(&server.fingerprint());
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..2 * cap {
        let started = Instant::now();
        match connect_raw(&endpoint, server.addr()).await {
            Ok(conn) => accepted.push(TestClient::on(endpoint.clone(), conn).await),
            Err(error) => {
                assert!(
                    matches!(error, quinn::ConnectionError::ConnectionClosed(_)),
                    "{error}"
                );
                assert!(started.elapsed() < Duration::from_secs(1));
                refused += 1;
            }
        }
    }
    assert_eq!(accepted.len(), cap);
    assert_eq!(refused, cap);

    // Closing one frees its slot.
    let gone = accepted.pop().unwrap();
    gone.conn.close(0u32.into(), b"bye");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(conn) = connect_raw(&endpoint, server.addr()).await {
            let mut client = TestClient::on(endpoint.clone(), conn).await;
            assert!(client.request(Request::Users).await.is_ok());
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_streams_are_refused_and_capped() {
    let server = start(TestHandler::default(), roomy_limits());
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    let live = Arc::new(AtomicUsize::new(0));
    let max_live = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut waits = Vec::new();
    for _ in 0..1000 {
        let (mut send, _recv) = tokio::time::timeout(WAIT, client.conn.open_bi())
            .await
            .expect("stream credit in time")
            .unwrap();
        let now = live.fetch_add(1, Ordering::SeqCst) + 1;
        max_live.fetch_max(now, Ordering::SeqCst);
        let _ = send.write_all(b"x").await;
        let (live, refused) = (live.clone(), refused.clone());
        waits.push(tokio::spawn(async move {
            let stopped = tokio::time::timeout(WAIT, send.stopped()).await;
            if let Ok(Ok(Some(code))) = stopped
                && code.into_inner() == u64::from(STREAM_REFUSED)
            {
                refused.fetch_add(1, Ordering::SeqCst);
            }
            live.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    for wait in waits {
        wait.await.unwrap();
    }
    let max_live = max_live.load(Ordering::SeqCst);
    // The control stream holds one of the server's slots.
    assert!(
        max_live < MAX_BIDI_STREAMS as usize,
        "{max_live} open at once"
    );
    assert_eq!(refused.load(Ordering::SeqCst), 1000);
    // The control stream still works.
    assert!(client.request(Request::Users).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_the_control_stream_timeout() {
    let mut limits = roomy_limits();
    limits.control_stream_timeout = Duration::from_millis(300);
    let server = start(TestHandler::default(), limits);
    let endpoint = client_endpoint(&server.fingerprint());
    let started = Instant::now();
    let silent = connect_raw(&endpoint, server.addr()).await.unwrap();
    // An opened stream that never carries data is the same as none.
    let (_send, _recv) = silent.open_bi().await.unwrap();
    assert_eq!(
        close_code(&silent, Duration::from_secs(3)).await,
        code(CloseReason::NoControlStream)
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // A client that speaks at once is unaffected.
    let mut client = TestClient::connect(server.addr(), &server.fingerprint()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.request(Request::Users).await.is_ok());
}

//! Operator commands that talk to the running server over the real protocol:
//! `rendezvous announce` signs with the server key from the data directory
//! and sends the announcement to the server, which delivers it at once to
//! everyone online and to everyone else at their next login.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use messenger_proto::msg::{ClientFrame, Reply, Request, ServerFrame, SignedAnnouncement};
use messenger_proto::{FrameDecoder, PROTOCOL_VERSION, decode, encode};
use quinn::crypto::rustls::QuicClientConfig;

use crate::pin::pinned_client_config;

/// How long the operator command waits for the server.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one signed announcement to the server at `addr` whose certificate
/// has `fingerprint`. Errors are one-line texts for the operator.
pub async fn send_announcement(
    addr: SocketAddr,
    fingerprint: &str,
    announcement: SignedAnnouncement,
) -> Result<(), String> {
    tokio::time::timeout(ADMIN_TIMEOUT, exchange(addr, fingerprint, announcement))
        .await
        .map_err(|_| {
            format!("no answer from {addr} within {ADMIN_TIMEOUT:?}; is the server running?")
        })?
}

async fn exchange(
    addr: SocketAddr,
    fingerprint: &str,
    announcement: SignedAnnouncement,
) -> Result<(), String> {
    let tls = pinned_client_config(fingerprint).map_err(|e| e.to_string())?;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let local: SocketAddr = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let mut endpoint = quinn::Endpoint::client(local).map_err(|e| format!("client socket: {e}"))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint
        .connect(addr, "rendezvous")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let preface = encode(&PROTOCOL_VERSION).map_err(|e| e.to_string())?;
    send.write_all(&preface).await.map_err(|e| e.to_string())?;
    let request = encode(&ClientFrame {
        id: 1,
        request: Request::Announce(announcement),
    })
    .map_err(|e| e.to_string())?;
    send.write_all(&request).await.map_err(|e| e.to_string())?;
    let mut decoder = FrameDecoder::new();
    loop {
        while let Some(body) = decoder.next_frame() {
            if let ServerFrame::Reply { id: 1, result } =
                decode::<ServerFrame>(&body).map_err(|e| e.to_string())?
            {
                conn.close(0u32.into(), b"done");
                endpoint.wait_idle().await;
                return match result {
                    Ok(Reply::Ok) => Ok(()),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(code) => Err(format!("the server refused: {}", code.message())),
                };
            }
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes).map_err(|e| e.to_string())?,
            Ok(None) => return Err("the server closed the stream".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

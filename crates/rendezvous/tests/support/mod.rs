//! Shared pieces of the network tests: a small handler under test, a test
//! client speaking the real protocol over QUIC, and server start-up helpers.

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

pub mod real;
pub mod roster;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use messenger_crypto::identity::{IdentityKey, verify_login};
use messenger_proto::msg::{
    ClientFrame, Login, Push, Reply, Request, ServerFrame, ServerHello, SignedAnnouncement,
};
use messenger_proto::{ErrorCode, FrameDecoder, PROTOCOL_VERSION, decode, encode};
use messenger_rendezvous::handler::{ConnectionContext, Handler, PendingReply, PushError};
use messenger_rendezvous::limits::Limits;
use messenger_rendezvous::net::CHANNEL_BINDING_LABEL;
use messenger_rendezvous::pin::pinned_client_config;
use messenger_rendezvous::server::{Server, ServerConfig, ServerHandle};
use quinn::crypto::rustls::QuicClientConfig;
use tempfile::TempDir;
use tokio::sync::watch;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

pub const SERVER_KEY: [u8; 32] = [0x5A; 32];

/// The handler under test: logins against its own key map, a ping, and
/// requests that make it push.
#[derive(Debug, Default)]
pub struct TestHandler {
    pub keys: HashMap<String, IdentityKey>,
    pub disconnects: Arc<AtomicUsize>,
    pub push_full: Arc<AtomicUsize>,
    pub pipeline: Arc<PipelineStats>,
}

/// What the handler saw of pipelined `Send`s and `Ack`s.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// `Send`s begun so far; each one's reply carries its number as `seq`.
    pub begun: AtomicU64,
    /// Begun and not yet complete.
    pub pending: AtomicUsize,
    /// The most ever pending at once.
    pub max_pending: AtomicUsize,
    /// The seqs named by the `Ack`s begun so far.
    pub acked: watch::Sender<BTreeSet<u64>>,
    /// `Ack`s begun so far.
    pub acks: AtomicUsize,
}

/// The recipient of a `Send` the test handler answers only once an `Ack`
/// names its `seq` (a live delivery whose recipient is this connection's
/// own peer, without the grace).
pub const WAITS_FOR_ACK: &str = "waits-for-ack";

impl Handler for TestHandler {
    type Session = Option<String>;

    fn server_key(&self) -> [u8; 32] {
        SERVER_KEY
    }

    fn on_connect(&self, _ctx: &ConnectionContext) -> Self::Session {
        None
    }

    async fn handle(
        &self,
        ctx: &mut ConnectionContext,
        session: &mut Self::Session,
        request: Request,
    ) -> Result<Reply, ErrorCode> {
        match request {
            Request::Login(Login {
                username,
                signature,
            }) => {
                let key = self.keys.get(&username).ok_or(ErrorCode::UserNotExist)?;
                let sig: [u8; 64] = signature
                    .as_slice()
                    .try_into()
                    .map_err(|_| ErrorCode::BadSignature)?;
                verify_login(key, &ctx.nonce, &ctx.exporter, &sig)
                    .map_err(|_| ErrorCode::BadSignature)?;
                ctx.user = Some(username.clone());
                *session = Some(username);
                Ok(Reply::LoggedIn {
                    pending: 0,
                    prekeys: 0,
                })
            }
            // A ping; refused while a pipelined `Send` is still pending,
            // which the network layer must never let happen.
            Request::Users => {
                if self.pipeline.pending.load(Ordering::SeqCst) != 0 {
                    return Err(ErrorCode::Internal);
                }
                Ok(Reply::Users { users: Vec::new() })
            }
            // `max` small pushes numbered 0.., then the reply.
            Request::Pull { max, .. } => {
                for remaining in 0..max {
                    ctx.pushes
                        .push(Push::PrekeysLow { remaining })
                        .map_err(|_| ErrorCode::QuotaExceeded)?;
                }
                Ok(Reply::Ok)
            }
            // `id[0]` pushes of `body.len()` bytes each.
            Request::GroupSend { id, body, .. } => {
                for _ in 0..id[0] {
                    let push = Push::Announcement(SignedAnnouncement {
                        issued_at: 0,
                        text: "x".repeat(body.len()),
                        signature: Vec::new(),
                    });
                    if ctx.pushes.push(push) == Err(PushError::Full) {
                        self.push_full.fetch_add(1, Ordering::SeqCst);
                        return Err(ErrorCode::QuotaExceeded);
                    }
                }
                Ok(Reply::Ok)
            }
            _ => Err(ErrorCode::BadRequest),
        }
    }

    fn pipelines(&self, request: &Request) -> bool {
        matches!(request, Request::Send(_) | Request::Ack { .. })
    }

    fn begins_ahead(&self, request: &Request) -> bool {
        matches!(request, Request::Ack { .. })
    }

    /// A `Send` completes after `body[0]` milliseconds, or, to
    /// [`WAITS_FOR_ACK`], once an `Ack` names its `seq`. An `Ack` is
    /// answered `Ok` at once.
    async fn begin(
        &self,
        ctx: &mut ConnectionContext,
        session: &mut Self::Session,
        request: Request,
    ) -> PendingReply {
        let envelope = match request {
            Request::Send(envelope) => envelope,
            Request::Ack { seqs } => {
                self.pipeline.acks.fetch_add(1, Ordering::SeqCst);
                self.pipeline.acked.send_modify(|acked| acked.extend(seqs));
                return Box::pin(std::future::ready(Ok(Reply::Ok)));
            }
            request => {
                let result = self.handle(ctx, session, request).await;
                return Box::pin(std::future::ready(result));
            }
        };
        let stats = Arc::clone(&self.pipeline);
        let seq = stats.begun.fetch_add(1, Ordering::SeqCst);
        let now = stats.pending.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_pending.fetch_max(now, Ordering::SeqCst);
        let delay = Duration::from_millis(envelope.body.first().copied().unwrap_or(0).into());
        let mut acked = (envelope.to == WAITS_FOR_ACK).then(|| stats.acked.subscribe());
        Box::pin(async move {
            if let Some(acked) = &mut acked {
                // Gone only with the handler.
                let _ = acked.wait_for(|acked| acked.contains(&seq)).await;
            }
            tokio::time::sleep(delay).await;
            stats.pending.fetch_sub(1, Ordering::SeqCst);
            Ok(Reply::Accepted {
                seq,
                duplicate: false,
            })
        })
    }

    async fn on_disconnect(&self, _ctx: &ConnectionContext, _session: Self::Session) {
        self.disconnects.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct TestServer {
    pub handle: ServerHandle,
    pub dir: TempDir,
}

impl TestServer {
    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }
    pub fn fingerprint(&self) -> String {
        self.handle.fingerprint().to_owned()
    }
}

/// Limits for tests that open many connections one after another.
pub fn roomy_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_connections_per_ip = 10_000;
    limits
}

pub fn start(handler: TestHandler, limits: Limits) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    config.limits = limits;
    let handle = Server::spawn(config, handler).unwrap();
    TestServer { handle, dir }
}

pub fn client_endpoint(fingerprint: &str) -> quinn::Endpoint {
    client_endpoint_with(pinned_client_config(fingerprint).unwrap())
}

pub fn client_endpoint_with(tls: rustls::ClientConfig) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let quic = QuicClientConfig::try_from(tls).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// Handshake only: no control stream.
pub async fn connect_raw(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    tokio::time::timeout(WAIT, endpoint.connect(addr, "localhost").unwrap())
        .await
        .expect("handshake in time")
}

/// The application close code of `conn`, waiting (bounded) for the close.
pub async fn close_code(conn: &quinn::Connection, within: Duration) -> Option<u64> {
    let error = tokio::time::timeout(within, conn.closed())
        .await
        .expect("connection closed in time");
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

pub struct TestClient {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub hello: ServerHello,
    decoder: FrameDecoder,
    next_id: u32,
    /// Pushes read while waiting for replies.
    pub pushes: Vec<Push>,
}

impl TestClient {
    pub async fn connect(addr: SocketAddr, fingerprint: &str) -> Self {
        let endpoint = client_endpoint(fingerprint);
        let conn = connect_raw(&endpoint, addr).await.unwrap();
        Self::on(endpoint, conn).await
    }

    /// Opens the control stream, sends the preface and reads the hello.
    pub async fn on(endpoint: quinn::Endpoint, conn: quinn::Connection) -> Self {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&encode(&PROTOCOL_VERSION).unwrap())
            .await
            .unwrap();
        let mut client = Self {
            endpoint,
            conn,
            send,
            recv,
            hello: ServerHello {
                version: 0,
                nonce: [0; 32],
                server_key: [0; 32],
            },
            decoder: FrameDecoder::new(),
            next_id: 1,
            pushes: Vec::new(),
        };
        match client.frame().await.unwrap() {
            ServerFrame::Hello(hello) => client.hello = hello,
            other => panic!("expected hello, got {other:?}"),
        }
        client
    }

    pub fn exporter(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.conn
            .export_keying_material(&mut out, CHANNEL_BINDING_LABEL, b"")
            .unwrap();
        out
    }

    /// The next server frame, or the read error as text.
    pub async fn frame(&mut self) -> Result<ServerFrame, String> {
        loop {
            if let Some(body) = self.decoder.next_frame() {
                return decode(&body).map_err(|e| e.to_string());
            }
            let chunk = tokio::time::timeout(WAIT, self.recv.read_chunk(usize::MAX, true))
                .await
                .map_err(|_| "timed out".to_owned())?;
            match chunk {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes).map_err(|e| e.to_string())?,
                Ok(None) => return Err("stream finished".to_owned()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Takes the next request id (for a caller that writes the frame itself).
    pub fn next_request_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub async fn send_request(&mut self, request: Request) -> u32 {
        let id = self.next_request_id();
        let bytes = encode(&ClientFrame { id, request }).unwrap();
        self.send.write_all(&bytes).await.unwrap();
        id
    }

    /// Sends `request` and returns its reply, keeping pushes read meanwhile.
    pub async fn request(&mut self, request: Request) -> Result<Reply, ErrorCode> {
        let id = self.send_request(request).await;
        loop {
            match self.frame().await.unwrap() {
                ServerFrame::Reply { id: got, result } => {
                    assert_eq!(got, id);
                    return result;
                }
                ServerFrame::Push(push) => self.pushes.push(push),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

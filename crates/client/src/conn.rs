//! One QUIC connection to a rendezvous server.
//!
//! [`Connection::connect`] dials the server, checks its certificate against a
//! pin (or trusts it on first use), opens the control stream, writes the
//! preface and reads the server's hello. From then on a background task
//! reads every frame: replies go to the caller waiting for that request id,
//! pushes to a channel the owner takes once ([`Connection::take_pushes`]).
//! Requests ([`Connection::request`]) may be made by several tasks at once;
//! one writer task writes them whole, in order, on the control stream.
//!
//! ## Certificates
//!
//! The server's certificate is usually self-signed, so the pin is what
//! authenticates it ([`PinPolicy`]). With [`PinPolicy::Pinned`] any other
//! certificate fails with [`ConnError::CertificateMismatch`], carrying both
//! fingerprints. With [`PinPolicy::TrustOnFirstUse`] any certificate is
//! accepted and [`Connection::fingerprint`] tells the caller what to pin
//! from then on. In both modes the server must sign the TLS 1.3 handshake
//! with the certificate's key, or the connection fails with
//! [`ConnError::NotProven`] (someone replayed the certificate, T-44).
//!
//! ## Ending
//!
//! [`Connection::close`] ends gracefully: it finishes the control stream,
//! lets the server answer what was sent and close its side, then closes the
//! connection with code 0. When the server or the network ends the
//! connection instead, pending and later requests fail with
//! [`ConnError::Closed`] and a [`ClosedReason`] a person can read (for
//! example [`ClosedReason::Replaced`] when the same user logged in
//! elsewhere); the push channel ends after the last push.
//!
//! ## Timeouts and why
//!
//! - Connecting ([`CONNECT_TIMEOUT`], 10 s): a handshake is two or three
//!   round trips; silence beyond that means nothing answers at that
//!   address ([`ConnError::Unreachable`]). It matches the server's own
//!   handshake limit.
//! - A request ([`REQUEST_TIMEOUT`], 15 s): a reply needs a round trip and
//!   a disk commit on the server; a stuck server is reported while the
//!   caller still waits, instead of only when the idle timeout ends the
//!   connection.
//! - Idle ([`IDLE_TIMEOUT`], 30 s) and keep-alive ([`KEEP_ALIVE`], 10 s):
//!   the server's values, so a vanished server is seen within 30 s and a
//!   quiet but live one never is timed out.
//! - Closing ([`CLOSE_TIMEOUT`], 2 s per step): time for the server to
//!   acknowledge the last frames; a peer that never does costs no more.
//!
//! Every one is a field of [`ConnectOptions`], so tests can shorten them.
//!
//! Logs (tracing, debug level) name the server address, its certificate
//! fingerprint and why a connection ended; never a request or reply body,
//! a signature or a key.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use messenger_crypto::identity::{IdentityKeyPair, Username};
use messenger_proto::msg::{
    ClientFrame, Login, NOTIFY_ID, Push, Reply, Request, ServerFrame, ServerHello,
};
use messenger_proto::{
    ErrorCode, FrameDecoder, FrameError, LEN_PREFIX, MAX_FRAME_LEN, PROTOCOL_VERSION, decode,
    encode,
};
use messenger_transport::pin::{HandshakeRecord, PinError, client_config};
use messenger_transport::{CHANNEL_BINDING_LABEL, certificate_fingerprint};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{IdleTimeout, TransportConfig, TransportErrorCode, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::debug;
use zeroize::Zeroizing;

pub use messenger_transport::pin::PinPolicy;

/// Longest the QUIC/TLS handshake may take: 10 s.
///
/// A handshake is two or three round trips; 10 s covers a slow mobile link
/// with retransmissions. No answer in that time means nothing listens at
/// the address (or a firewall drops the packets): [`ConnError::Unreachable`].
/// The server gives up on a half-open handshake after the same time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a request waits for its reply, including the wait for the hello
/// after the handshake: 15 s.
///
/// A reply costs a round trip and, for most requests, a durable commit on the
/// server (milliseconds). 15 s leaves room for a congested link or a slow
/// disk, and reports a stuck server before the idle timeout (30 s) would.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The connection is closed after this long without a packet: 30 s.
///
/// QUIC uses the smaller of the two sides' values; the server's is 30 s, so
/// a larger value would change nothing and a smaller one would only drop
/// quiet connections sooner.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval of the client's QUIC keep-alive pings: 10 s.
///
/// A third of [`IDLE_TIMEOUT`], so one lost ping never ends a live
/// connection, and short enough to keep a NAT binding (often 30 s for UDP)
/// open even with a server whose own keep-alives are off.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Longest each step of a graceful close waits for the server: 2 s.
///
/// Closing a QUIC connection discards what was not yet acknowledged, so the
/// last frames need a moment; the server uses the same flush time.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`Connection::close`] lets the endpoint send the close frame:
/// 20 ms.
///
/// Once every reply has been read nothing is left to deliver but the
/// `CONNECTION_CLOSE` frame itself, which goes out on the endpoint's next
/// transmit, well within this on any link. Waiting for the whole draining
/// period instead (three probe timeouts, about 100 ms even on loopback)
/// made every command that long slower. If the frame is lost the server
/// still sees the connection end at its idle timeout.
pub const CLOSE_FLUSH: Duration = Duration::from_millis(20);

/// Pushes buffered for the owner before the reader waits: 1,024.
///
/// Four times the server's per-connection push queue (256), so any burst
/// the server lets through fits. An owner that does not read makes the
/// reader wait, which stalls replies too and eventually makes the server
/// drop this client ([`ClosedReason::TooSlow`]); drop the receiver to
/// ignore pushes instead.
pub const PUSH_BUFFER: usize = 1024;

/// Receive window of the control stream and of the connection: four
/// maximum frames with their prefixes (about 1 MiB).
///
/// Replies and pushes all come on the one stream. One maximum frame must
/// fit; four let a large pull stream back to back on a long link, while a
/// misbehaving server can make the client buffer at most this much.
pub const RECEIVE_WINDOW: u32 = 4 * (MAX_FRAME_LEN + LEN_PREFIX) as u32;

/// The rendezvous server's default UDP port, used by [`resolve`] when an
/// address has none.
pub const DEFAULT_PORT: u16 = 4433;

/// The TLS server name sent: the server's certificate names both
/// `localhost` and `rendezvous`, and the pin, not the name, authenticates.
const SERVER_NAME: &str = "rendezvous";

/// Largest piece read from the control stream at once: 64 KiB (one copy
/// into the frame decoder).
const READ_CHUNK: usize = 64 * 1024;

/// Encoded requests waiting for the writer task: 64. Callers beyond it wait
/// (backpressure) rather than queue without bound.
const WRITE_QUEUE: usize = 64;

/// Longest reason text kept from a server's close frame (it is printed).
const MAX_REASON_LEN: usize = 120;

/// How long each connection step may take; [`ConnectOptions::default`] uses
/// the consts of this module.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// [`CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// [`REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// [`KEEP_ALIVE`].
    pub keep_alive: Duration,
    /// [`CLOSE_TIMEOUT`].
    pub close_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            keep_alive: KEEP_ALIVE,
            close_timeout: CLOSE_TIMEOUT,
        }
    }
}

/// Why a connection could not be made, or why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// The server address cannot be used.
    #[error("cannot use the server address {addr:?}: {reason}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The pinned fingerprint is malformed.
    #[error(transparent)]
    BadPin(PinError),
    /// The server's host name could not be looked up (no network, no
    /// answer from the resolver, or no such name now).
    #[error("cannot look up the server {addr:?}: {reason}")]
    Lookup {
        /// The address as given.
        addr: String,
        /// What the resolver said.
        reason: String,
    },
    /// Nothing answered the handshake in time.
    #[error(
        "no answer from {addr} within the connect timeout; is the server running and the address right?"
    )]
    Unreachable {
        /// The server address.
        addr: SocketAddr,
    },
    /// The server presented another certificate than the pinned one.
    #[error(
        "the server's certificate {actual} is not the pinned {expected}; if the server's operator changed it on purpose, pin the new fingerprint"
    )]
    CertificateMismatch {
        /// The pinned fingerprint.
        expected: String,
        /// The fingerprint of the certificate presented.
        actual: String,
    },
    /// The server presented a certificate but could not sign the handshake
    /// with its key.
    #[error(
        "the server presented the certificate {fingerprint} but did not prove it holds its key; someone may be impersonating the server"
    )]
    NotProven {
        /// The fingerprint of the certificate presented.
        fingerprint: String,
    },
    /// The TLS or QUIC handshake failed for another reason (e.g. the server
    /// does not speak `messenger/1`).
    #[error("the handshake with {addr} failed: {detail}")]
    Handshake {
        /// The server address.
        addr: SocketAddr,
        /// What quinn or rustls reported.
        detail: String,
    },
    /// The connection ended.
    #[error("the connection to the server ended: {reason}")]
    Closed {
        /// Why.
        reason: ClosedReason,
    },
    /// No reply within the request timeout; the connection may still work.
    #[error("no reply from the server within {0:?}")]
    Timeout(Duration),
    /// The server answered the request with a typed error.
    #[error("the server refused the request: {} ({})", .0.message(), .0.as_str())]
    Server(ErrorCode),
    /// The server broke the protocol.
    #[error(transparent)]
    Protocol(ProtocolError),
    /// The request is too large for a frame.
    #[error("the request cannot be sent: {0}")]
    Encode(#[source] FrameError),
    /// The client's UDP socket could not be opened.
    #[error("cannot open a UDP socket for the client: {0}")]
    Io(#[source] std::io::Error),
}

impl ConnError {
    /// Whether the same may succeed later: the name did not resolve,
    /// nothing answered, the request or handshake did not finish, the socket could not be opened, the
    /// server was busy ([`ErrorCode::RateLimited`]), failed inside or ran
    /// out of disk, or the connection ended for a passing reason
    /// ([`ClosedReason::is_transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Lookup { .. }
            | Self::Unreachable { .. }
            | Self::Timeout(_)
            | Self::Io(_)
            | Self::Handshake { .. } => true,
            Self::Closed { reason } => reason.is_transient(),
            Self::Server(code) => matches!(
                code,
                ErrorCode::RateLimited | ErrorCode::Internal | ErrorCode::StorageFull
            ),
            _ => false,
        }
    }
}

/// How the server broke the protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The server speaks another protocol version.
    #[error("the server speaks protocol version {server}, this client {client}")]
    Version {
        /// The server's version.
        server: u16,
        /// This client's ([`PROTOCOL_VERSION`]).
        client: u16,
    },
    /// The server's first frame was not a hello.
    #[error("the server's first frame was not a hello")]
    NoHello,
    /// A frame could not be read.
    #[error("the server sent a frame this client cannot read: {0}")]
    BadFrame(#[source] FrameError),
    /// A reply of the wrong kind for the request.
    #[error("the server answered a {0} request with a reply of another kind")]
    UnexpectedReply(&'static str),
    /// The handshake finished without a certificate or exporter (a TLS
    /// library fault rather than the server's).
    #[error("the TLS session is missing its {0}")]
    Tls(&'static str),
}

/// Why a connection ended, in words a person can act on ([`fmt::Display`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClosedReason {
    /// Another login of the same user replaced this connection (server
    /// close code 703, after a [`Push::Replaced`]).
    Replaced,
    /// The server is shutting down (700).
    ShuttingDown,
    /// The server dropped this client for not reading its pushes (702).
    TooSlow,
    /// The connection did not log in within the server's login timeout
    /// (705), e.g. a client stopped between the handshake and its login.
    LoginTimedOut,
    /// The server ended the connection normally (0), e.g. after
    /// [`Connection::close`].
    Done,
    /// The server refused the connection before the handshake (too many
    /// connections from this address, or it is overloaded).
    Refused,
    /// The server closed with another code; `reason` is its text, cleaned
    /// for printing.
    ByServer {
        /// The application close code (see docs/protocol.md §7).
        code: u64,
        /// The server's reason text.
        reason: String,
    },
    /// The server sent something this client cannot read; the client
    /// closed the connection.
    BadFrame(String),
    /// Nothing came from the server for the idle timeout.
    TimedOut,
    /// The connection was lost otherwise (reset, transport error).
    Lost(String),
    /// This client closed it.
    Local,
}

impl ClosedReason {
    /// Whether connecting again may work: the server shut down, dropped or
    /// refused this client for load, timed it out, failed inside (603), or
    /// closed it for a stream or frame that did not arrive in time (701,
    /// 704: a bad link), or the connection was lost. Not when another login
    /// replaced it (connecting again would replace that one in turn), the
    /// server could not read what this client sent (100–102) or this client
    /// what the server sent (a protocol error either way), or this client
    /// closed it.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::ShuttingDown
            | Self::TooSlow
            | Self::LoginTimedOut
            | Self::Done
            | Self::Refused
            | Self::TimedOut
            | Self::Lost(_) => true,
            Self::ByServer { code, .. } => matches!(code, 603 | 701 | 704),
            Self::Replaced | Self::BadFrame(_) | Self::Local => false,
        }
    }
}

impl fmt::Display for ClosedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Replaced => {
                f.write_str("this user logged in on another connection, which replaced this one")
            }
            Self::ShuttingDown => f.write_str("the server is shutting down"),
            Self::TooSlow => {
                f.write_str("the server dropped this client for not reading its pushes in time")
            }
            Self::LoginTimedOut => {
                f.write_str("the server closed the connection because it did not log in in time")
            }
            Self::Done => f.write_str("the server ended the connection"),
            Self::Refused => f.write_str(
                "the server refused the connection (too many connections from this address?)",
            ),
            Self::ByServer { code, reason } => {
                write!(f, "the server closed it with code {code} ({reason})")
            }
            Self::BadFrame(detail) => write!(f, "the server sent an unreadable frame ({detail})"),
            Self::TimedOut => f.write_str("nothing came from the server for the idle timeout"),
            Self::Lost(detail) => write!(f, "the connection was lost ({detail})"),
            Self::Local => f.write_str("this client closed the connection"),
        }
    }
}

/// The answer to a successful login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoggedIn {
    /// Envelopes waiting in my mailbox.
    pub pending: u32,
    /// One-time prekeys the server still holds for me.
    pub prekeys: u32,
}

/// One connection to a rendezvous server: see the [module](self) docs.
pub struct Connection {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    remote: SocketAddr,
    fingerprint: String,
    hello: ServerHello,
    options: ConnectOptions,
    next_id: AtomicU32,
    /// Whether a notification was sent ([`Connection::notify`]).
    notified: AtomicBool,
    /// `None` once [`close`](Self::close) finished the stream.
    frames: Option<mpsc::Sender<Vec<u8>>>,
    routes: Arc<Routes>,
    closed: watch::Receiver<Option<ClosedReason>>,
    pushes: Mutex<Option<mpsc::Receiver<Push>>>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

impl Connection {
    /// Connects to the server at `addr`, checks its certificate against
    /// `pin`, opens the control stream, writes the preface and reads the
    /// hello. Call inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`ConnError::BadPin`], [`ConnError::BadAddress`], [`ConnError::Io`]
    /// before anything is sent; [`ConnError::Unreachable`],
    /// [`ConnError::CertificateMismatch`], [`ConnError::NotProven`],
    /// [`ConnError::Handshake`] or [`ConnError::Closed`] from the handshake;
    /// [`ConnError::Protocol`] or [`ConnError::Timeout`] after it.
    pub async fn connect(
        addr: SocketAddr,
        pin: &PinPolicy,
        options: &ConnectOptions,
    ) -> Result<Self, ConnError> {
        let (tls, record) = client_config(pin).map_err(ConnError::BadPin)?;
        let quic = QuicClientConfig::try_from(tls).map_err(|_| ConnError::Handshake {
            addr,
            detail: "no TLS 1.3 cipher suite usable by QUIC".to_owned(),
        })?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport_config(options)));
        let local = if addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let endpoint = quinn::Endpoint::client(local).map_err(ConnError::Io)?;
        let connecting = endpoint
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| match e {
                quinn::ConnectError::InvalidRemoteAddress(_) => ConnError::BadAddress {
                    addr: addr.to_string(),
                    reason: "not an address a client can connect to".to_owned(),
                },
                other => ConnError::Handshake {
                    addr,
                    detail: other.to_string(),
                },
            })?;
        let conn = match timeout(options.connect_timeout, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                debug!(%addr, %error, "handshake failed");
                return Err(handshake_error(addr, &record, error));
            }
            Err(_) => {
                debug!(%addr, "handshake timed out");
                endpoint.close(VarInt::from_u32(0), b"");
                return Err(ConnError::Unreachable { addr });
            }
        };
        let fingerprint = presented_fingerprint(&conn, &record)?;
        debug!(%addr, %fingerprint, "handshake done");

        let opened = timeout(options.request_timeout, open_control(&conn, options)).await;
        let Control {
            send,
            recv,
            decoder,
            hello,
        } = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                conn.close(VarInt::from_u32(0), b"no hello");
                return Err(ConnError::Timeout(options.request_timeout));
            }
        };

        let routes = Arc::new(Routes::default());
        let (closed_tx, closed) = watch::channel(None);
        let (push_tx, push_rx) = mpsc::channel(PUSH_BUFFER);
        let (frames, frame_rx) = mpsc::channel(WRITE_QUEUE);
        let reader = tokio::spawn(read_loop(
            conn.clone(),
            recv,
            decoder,
            Arc::clone(&routes),
            push_tx,
            closed_tx,
            options.close_timeout,
        ));
        let writer = tokio::spawn(write_loop(send, frame_rx));
        Ok(Self {
            endpoint,
            conn,
            remote: addr,
            fingerprint,
            hello,
            options: options.clone(),
            next_id: AtomicU32::new(1),
            notified: AtomicBool::new(false),
            frames: Some(frames),
            routes,
            closed,
            pushes: Mutex::new(Some(push_rx)),
            reader: Some(reader),
            writer: Some(writer),
        })
    }

    /// The `SHA256:` fingerprint of the server's certificate: the pin, or
    /// on first use the fingerprint to pin from now on.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The server's Ed25519 key from its hello, which signs announcements.
    pub fn server_key(&self) -> [u8; 32] {
        self.hello.server_key
    }

    /// The server's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.remote
    }

    /// The receiving end of the pushes; `Some` only the first time. It ends
    /// after the connection does. Pushes that arrive before it is taken are
    /// kept (up to [`PUSH_BUFFER`]); drop it to discard pushes.
    pub fn take_pushes(&self) -> Option<mpsc::Receiver<Push>> {
        self.pushes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Sends `request` and waits for its reply, at most the request
    /// timeout. Several tasks may call it at once.
    ///
    /// # Errors
    ///
    /// [`ConnError::Server`] for the server's typed error;
    /// [`ConnError::Closed`] if the connection ended first;
    /// [`ConnError::Timeout`] if no reply came in time (a late reply is
    /// dropped); [`ConnError::Encode`] for a request too large for a frame.
    pub async fn request(&self, request: Request) -> Result<Reply, ConnError> {
        let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if id == NOTIFY_ID {
            // Wrapped around: 0 is a notification's id.
            id = self.next_id.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = encode(&ClientFrame { id, request }).map_err(ConnError::Encode)?;
        let Some(frames) = self.frames.as_ref() else {
            return Err(ConnError::Closed {
                reason: ClosedReason::Local,
            });
        };
        let (tx, rx) = oneshot::channel();
        if !self.routes.insert(id, tx) {
            return Err(self.closed_error().await);
        }
        // Forgets the route however this future ends (reply, timeout,
        // cancellation), so a late reply is dropped by the reader.
        let _route = RouteGuard {
            routes: &self.routes,
            id,
        };
        let exchange = async {
            // Whole frames only: a cancelled send leaves nothing half written.
            frames.send(bytes).await.ok()?;
            rx.await.ok()
        };
        match timeout(self.options.request_timeout, exchange).await {
            Ok(Some(Ok(reply))) => Ok(reply),
            Ok(Some(Err(code))) => Err(ConnError::Server(code)),
            Ok(None) => Err(self.closed_error().await),
            Err(_) => Err(ConnError::Timeout(self.options.request_timeout)),
        }
    }

    /// Sends `request` as a notification ([`NOTIFY_ID`]): the server answers
    /// nothing, so this returns once the frame is queued for writing. Only
    /// an `Ack` may be sent so (docs/protocol.md §3). [`Connection::close`]
    /// waits for the server to read what was notified.
    ///
    /// # Errors
    ///
    /// [`ConnError::Closed`] if the connection ended first;
    /// [`ConnError::Timeout`] if the frame could not even be queued within
    /// the request timeout (the writer is stuck behind a full send window);
    /// [`ConnError::Encode`] for a request too large for a frame.
    pub async fn notify(&self, request: Request) -> Result<(), ConnError> {
        let bytes = encode(&ClientFrame {
            id: NOTIFY_ID,
            request,
        })
        .map_err(ConnError::Encode)?;
        let Some(frames) = self.frames.as_ref() else {
            return Err(ConnError::Closed {
                reason: ClosedReason::Local,
            });
        };
        self.notified.store(true, Ordering::Relaxed);
        match timeout(self.options.request_timeout, frames.send(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.closed_error().await),
            Err(_) => Err(ConnError::Timeout(self.options.request_timeout)),
        }
    }

    /// Logs in as `username` on this connection: signs the hello's nonce and
    /// this connection's TLS exporter value with `identity` (channel-bound
    /// login, docs/protocol.md §3).
    ///
    /// # Errors
    ///
    /// As [`request`](Self::request); [`ConnError::Server`] with
    /// `user_not_exist` or `bad_signature` when the server does not accept
    /// the identity.
    pub async fn login(
        &self,
        username: &Username,
        identity: &IdentityKeyPair,
    ) -> Result<LoggedIn, ConnError> {
        let mut exporter = Zeroizing::new([0u8; 32]);
        self.conn
            .export_keying_material(&mut exporter[..], CHANNEL_BINDING_LABEL, b"")
            .map_err(|_| ConnError::Protocol(ProtocolError::Tls("exporter")))?;
        let signature = identity.sign_login(&self.hello.nonce, &exporter);
        let login = Login {
            username: username.as_str().to_owned(),
            signature: signature.to_vec(),
        };
        match self.request(Request::Login(login)).await? {
            Reply::LoggedIn { pending, prekeys } => Ok(LoggedIn { pending, prekeys }),
            _ => Err(ConnError::Protocol(ProtocolError::UnexpectedReply("login"))),
        }
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<ClosedReason> {
        self.closed.borrow().clone()
    }

    /// Waits until the connection ends and returns why. Not bounded: a
    /// healthy connection lasts until someone closes it.
    pub async fn closed(&self) -> ClosedReason {
        let mut closed = self.closed.clone();
        let reason = match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        reason.unwrap_or(ClosedReason::Local)
    }

    /// Ends the connection gracefully: finishes the control stream after the
    /// requests already queued, waits (each step at most the close timeout)
    /// for the server to answer them and end its side, closes with code 0
    /// and lets the endpoint flush.
    pub async fn close(mut self) {
        let wait = self.options.close_timeout;
        drop(self.frames.take());
        if let Some(mut writer) = self.writer.take()
            && timeout(wait, &mut writer).await.is_err()
        {
            writer.abort();
        }
        // Replies still owed to callers are read before the close, and so
        // is the server's end of its side after notifications, which have no
        // reply to wait for: closing at once could drop them unread. With
        // neither, the close need not wait for the server's side.
        if (!self.routes.lock().waiting.is_empty() || self.notified.load(Ordering::Relaxed))
            && let Some(mut reader) = self.reader.take()
            && timeout(wait, &mut reader).await.is_err()
        {
            reader.abort();
        }
        self.conn.close(VarInt::from_u32(0), b"done");
        let _ = timeout(CLOSE_FLUSH, self.endpoint.wait_idle()).await;
        debug!(addr = %self.remote, "connection closed");
    }

    /// The error for a request that found the connection gone: its reason,
    /// waiting briefly for the reader to record it.
    async fn closed_error(&self) -> ConnError {
        let mut closed = self.closed.clone();
        let waited = timeout(self.options.close_timeout, closed.wait_for(Option::is_some)).await;
        let reason = match waited {
            Ok(Ok(reason)) => reason.clone(),
            _ => None,
        };
        ConnError::Closed {
            reason: reason
                .unwrap_or_else(|| ClosedReason::Lost("the control stream failed".to_owned())),
        }
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("remote", &self.remote)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Without this the reader's handle would keep the connection open.
        self.conn.close(VarInt::from_u32(0), b"dropped");
        for task in [self.reader.take(), self.writer.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// Resolves a server address: `host:port`, `host` (port [`DEFAULT_PORT`]),
/// an IP address with or without a port, `[v6]:port`. A name that resolves
/// to several addresses gives the first.
///
/// # Errors
///
/// [`ConnError::BadAddress`] if it is not a host name or address,
/// [`ConnError::Lookup`] if the name does not resolve (now).
pub async fn resolve(server: &str) -> Result<SocketAddr, ConnError> {
    let bad = |reason: String| ConnError::BadAddress {
        addr: server.to_owned(),
        reason,
    };
    if let Ok(addr) = server.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = server.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    if server.is_empty() || server.contains(['/', ' ']) {
        return Err(bad("not a host name or address".to_owned()));
    }
    let with_port = if let Some((_, port)) = server.rsplit_once(':') {
        if port.parse::<u16>().is_err() {
            return Err(bad("the port is not a number from 0 to 65535".to_owned()));
        }
        server.to_owned()
    } else {
        format!("{server}:{DEFAULT_PORT}")
    };
    // The system resolver blocks.
    let resolved = tokio::task::spawn_blocking(move || {
        with_port
            .to_socket_addrs()
            .map(|mut addrs| addrs.next())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| bad("the resolver task failed".to_owned()))?;
    let lookup = |reason: String| ConnError::Lookup {
        addr: server.to_owned(),
        reason,
    };
    match resolved {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) => Err(lookup("the name has no address".to_owned())),
        Err(reason) => Err(lookup(reason)),
    }
}

/// Waiting callers by request id. Once closed, nobody can wait any more.
#[derive(Debug, Default)]
struct Routes(Mutex<RouteTable>);

type ReplySender = oneshot::Sender<Result<Reply, ErrorCode>>;

#[derive(Debug, Default)]
struct RouteTable {
    waiting: HashMap<u32, ReplySender>,
    closed: bool,
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, RouteTable> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// False once the connection has ended.
    fn insert(&self, id: u32, tx: ReplySender) -> bool {
        let mut table = self.lock();
        if table.closed {
            return false;
        }
        table.waiting.insert(id, tx);
        true
    }

    fn answer(&self, id: u32, result: Result<Reply, ErrorCode>) {
        let waiting = self.lock().waiting.remove(&id);
        match waiting {
            Some(tx) => {
                // The caller may have just given up; nothing to do then.
                let _ = tx.send(result);
            }
            None => debug!(id, "reply to a request nobody waits for (timed out?)"),
        }
    }

    fn forget(&self, id: u32) {
        self.lock().waiting.remove(&id);
    }

    /// Fails every waiting caller (their senders are dropped).
    fn close(&self) {
        let mut table = self.lock();
        table.closed = true;
        table.waiting.clear();
    }
}

struct RouteGuard<'a> {
    routes: &'a Routes,
    id: u32,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.routes.forget(self.id);
    }
}

fn transport_config(options: &ConnectOptions) -> TransportConfig {
    // A duration QUIC cannot carry (beyond 2^62 ms) falls back to the
    // default rather than failing the connection.
    let idle = IdleTimeout::try_from(options.idle_timeout)
        .or_else(|_| IdleTimeout::try_from(IDLE_TIMEOUT))
        .ok();
    let mut transport = TransportConfig::default();
    transport
        // The server never opens streams towards a client.
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(RECEIVE_WINDOW))
        .max_idle_timeout(idle)
        .keep_alive_interval(Some(options.keep_alive))
        // The protocol has no datagrams.
        .datagram_receive_buffer_size(None);
    transport
}

/// Maps a failed handshake to an error, preferring what the verifier saw.
fn handshake_error(
    addr: SocketAddr,
    record: &HandshakeRecord,
    error: quinn::ConnectionError,
) -> ConnError {
    match record.seen().refusal {
        Some(PinError::Mismatch { expected, actual }) => {
            return ConnError::CertificateMismatch { expected, actual };
        }
        Some(PinError::NotProven { fingerprint }) => return ConnError::NotProven { fingerprint },
        Some(other) => {
            return ConnError::Handshake {
                addr,
                detail: other.to_string(),
            };
        }
        None => {}
    }
    match error {
        quinn::ConnectionError::TimedOut => ConnError::Unreachable { addr },
        quinn::ConnectionError::ApplicationClosed(_)
        | quinn::ConnectionError::Reset
        | quinn::ConnectionError::LocallyClosed => ConnError::Closed {
            reason: closed_reason(&error),
        },
        quinn::ConnectionError::ConnectionClosed(ref close)
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            ConnError::Closed {
                reason: ClosedReason::Refused,
            }
        }
        other => ConnError::Handshake {
            addr,
            detail: other.to_string(),
        },
    }
}

/// The fingerprint of the certificate the server presented.
fn presented_fingerprint(
    conn: &quinn::Connection,
    record: &HandshakeRecord,
) -> Result<String, ConnError> {
    conn.peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|cert| certificate_fingerprint(cert)))
        .or_else(|| record.seen().presented)
        .ok_or(ConnError::Protocol(ProtocolError::Tls("certificate")))
}

/// The control stream after the hello, with bytes the decoder may already
/// hold beyond it.
struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    hello: ServerHello,
}

/// Opens the control stream, writes the preface and reads the hello.
async fn open_control(
    conn: &quinn::Connection,
    options: &ConnectOptions,
) -> Result<Control, ConnError> {
    let wait = options.close_timeout;
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return Err(ConnError::Closed {
            reason: ended(conn, wait).await,
        });
    };
    let preface = encode(&PROTOCOL_VERSION).map_err(ConnError::Encode)?;
    if send.write_all(&preface).await.is_err() {
        return Err(ConnError::Closed {
            reason: ended(conn, wait).await,
        });
    }
    let mut decoder = FrameDecoder::new();
    let body = loop {
        if let Some(body) = decoder.next_frame() {
            break body;
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = decoder.push(&chunk.bytes) {
                    return Err(bad_frame(conn, e));
                }
            }
            Ok(None) | Err(_) => {
                return Err(ConnError::Closed {
                    reason: ended(conn, wait).await,
                });
            }
        }
    };
    let hello = match decode::<ServerFrame>(&body) {
        Ok(ServerFrame::Hello(hello)) => hello,
        Ok(_) => {
            close_bad_request(conn);
            return Err(ConnError::Protocol(ProtocolError::NoHello));
        }
        Err(e) => return Err(bad_frame(conn, e)),
    };
    if hello.version != PROTOCOL_VERSION {
        conn.close(
            VarInt::from(ErrorCode::UnsupportedVersion.as_u16()),
            ErrorCode::UnsupportedVersion.as_str().as_bytes(),
        );
        return Err(ConnError::Protocol(ProtocolError::Version {
            server: hello.version,
            client: PROTOCOL_VERSION,
        }));
    }
    Ok(Control {
        send,
        recv,
        decoder,
        hello,
    })
}

fn bad_frame(conn: &quinn::Connection, error: FrameError) -> ConnError {
    close_bad_request(conn);
    ConnError::Protocol(ProtocolError::BadFrame(error))
}

fn close_bad_request(conn: &quinn::Connection) {
    conn.close(
        VarInt::from(ErrorCode::BadRequest.as_u16()),
        ErrorCode::BadRequest.as_str().as_bytes(),
    );
}

/// Why `conn` ended, waiting at most `within` for it to end.
async fn ended(conn: &quinn::Connection, within: Duration) -> ClosedReason {
    match timeout(within, conn.closed()).await {
        Ok(error) => closed_reason(&error),
        Err(_) => {
            conn.close(VarInt::from_u32(0), b"stream ended");
            ClosedReason::Lost("the server ended the control stream".to_owned())
        }
    }
}

/// Reads frames until the connection ends, then records why, fails the
/// waiting callers and ends the push channel.
async fn read_loop(
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    routes: Arc<Routes>,
    pushes: mpsc::Sender<Push>,
    closed: watch::Sender<Option<ClosedReason>>,
    close_wait: Duration,
) {
    let (mut reason, replaced) = read_frames(&conn, recv, decoder, &routes, &pushes).await;
    if reason.is_none() {
        reason = Some(ended(&conn, close_wait).await);
    }
    let mut reason = reason.unwrap_or(ClosedReason::Local);
    // The close frame after a `Replaced` push can be lost; the push says
    // enough.
    if replaced && matches!(reason, ClosedReason::Lost(_) | ClosedReason::TimedOut) {
        reason = ClosedReason::Replaced;
    }
    debug!(addr = %conn.remote_address(), %reason, "connection ended");
    // The reason first, so a caller failed below finds it.
    closed.send_replace(Some(reason));
    routes.close();
}

/// Reads and routes frames; returns the reason when the client itself ends
/// the connection (`None`: ask the connection), and whether a `Replaced`
/// push came.
async fn read_frames(
    conn: &quinn::Connection,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    routes: &Routes,
    pushes: &mpsc::Sender<Push>,
) -> (Option<ClosedReason>, bool) {
    let mut replaced = false;
    loop {
        while let Some(body) = decoder.next_frame() {
            match decode::<ServerFrame>(&body) {
                Ok(ServerFrame::Reply { id, result }) => routes.answer(id, result),
                Ok(ServerFrame::Push(push)) => {
                    replaced |= push == Push::Replaced;
                    // A dropped receiver means the owner ignores pushes.
                    let _ = pushes.send(push).await;
                }
                Ok(_) => {
                    close_bad_request(conn);
                    let reason = ClosedReason::BadFrame("a second hello".to_owned());
                    return (Some(reason), replaced);
                }
                Err(e) => {
                    close_bad_request(conn);
                    return (Some(ClosedReason::BadFrame(e.to_string())), replaced);
                }
            }
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = decoder.push(&chunk.bytes) {
                    close_bad_request(conn);
                    return (Some(ClosedReason::BadFrame(e.to_string())), replaced);
                }
            }
            // The server finished its side (it closes next) or the
            // connection is gone: the connection says why.
            Ok(None) | Err(quinn::ReadError::ConnectionLost(_)) => return (None, replaced),
            Err(other) => {
                conn.close(VarInt::from_u32(0), b"control stream failed");
                let reason = ClosedReason::Lost(format!("control stream: {other}"));
                return (Some(reason), replaced);
            }
        }
    }
}

/// Writes whole frames in order until the sender side is dropped, then
/// finishes the stream.
async fn write_loop(mut send: quinn::SendStream, mut frames: mpsc::Receiver<Vec<u8>>) {
    while let Some(bytes) = frames.recv().await {
        if send.write_all(&bytes).await.is_err() {
            // The connection is gone; the reader reports why.
            return;
        }
    }
    let _ = send.finish();
    // Wait until the server has everything (bounded by the caller).
    let _ = send.stopped().await;
}

fn closed_reason(error: &quinn::ConnectionError) -> ClosedReason {
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => match close.error_code.into_inner() {
            0 => ClosedReason::Done,
            700 => ClosedReason::ShuttingDown,
            702 => ClosedReason::TooSlow,
            703 => ClosedReason::Replaced,
            705 => ClosedReason::LoginTimedOut,
            code => ClosedReason::ByServer {
                code,
                reason: printable(&close.reason),
            },
        },
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            ClosedReason::Refused
        }
        quinn::ConnectionError::TimedOut => ClosedReason::TimedOut,
        quinn::ConnectionError::LocallyClosed => ClosedReason::Local,
        quinn::ConnectionError::Reset => {
            ClosedReason::Lost("reset by the server; did it restart?".to_owned())
        }
        other => ClosedReason::Lost(other.to_string()),
    }
}

/// A server's reason text, made safe to print: printable ASCII only, at
/// most [`MAX_REASON_LEN`] characters.
fn printable(reason: &[u8]) -> String {
    String::from_utf8_lossy(reason)
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(MAX_REASON_LEN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_map_to_reasons() {
        let app = |code: u32, reason: &'static [u8]| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: VarInt::from_u32(code),
                reason: reason.into(),
            })
        };
        assert_eq!(closed_reason(&app(703, b"x")), ClosedReason::Replaced);
        assert_eq!(closed_reason(&app(700, b"x")), ClosedReason::ShuttingDown);
        assert_eq!(closed_reason(&app(702, b"x")), ClosedReason::TooSlow);
        assert_eq!(
            closed_reason(&app(705, b"not logged in in time")),
            ClosedReason::LoginTimedOut
        );
        assert_eq!(closed_reason(&app(0, b"done")), ClosedReason::Done);
        assert_eq!(
            closed_reason(&app(101, b"unsupported_version\n\x1b[31m")),
            ClosedReason::ByServer {
                code: 101,
                reason: "unsupported_version??[31m".to_owned()
            }
        );
        assert_eq!(
            closed_reason(&quinn::ConnectionError::TimedOut),
            ClosedReason::TimedOut
        );
        let long = closed_reason(&app(999, &[b'a'; 1000]));
        assert!(
            matches!(long, ClosedReason::ByServer { ref reason, .. } if reason.len() == MAX_REASON_LEN)
        );
        assert!(
            ClosedReason::Replaced
                .to_string()
                .contains("another connection")
        );
    }

    #[test]
    fn passing_and_lasting_failures_are_told_apart() {
        let transient = [
            ClosedReason::ShuttingDown,
            ClosedReason::TimedOut,
            ClosedReason::Lost("reset".to_owned()),
            ClosedReason::ByServer {
                code: 704,
                reason: String::new(),
            },
        ];
        for reason in transient {
            assert!(reason.is_transient(), "{reason:?}");
            assert!(ConnError::Closed { reason }.is_transient());
        }
        let lasting = [
            ClosedReason::Replaced,
            ClosedReason::BadFrame("x".to_owned()),
            ClosedReason::Local,
            ClosedReason::ByServer {
                code: 100,
                reason: String::new(),
            },
        ];
        for reason in lasting {
            assert!(!reason.is_transient(), "{reason:?}");
            assert!(!ConnError::Closed { reason }.is_transient());
        }
        let lookup = ConnError::Lookup {
            addr: "chat.example".to_owned(),
            reason: "no network".to_owned(),
        };
        assert!(lookup.is_transient());
        assert!(ConnError::Server(ErrorCode::RateLimited).is_transient());
        assert!(!ConnError::Server(ErrorCode::BadSignature).is_transient());
        let mismatch = ConnError::CertificateMismatch {
            expected: "a".to_owned(),
            actual: "b".to_owned(),
        };
        assert!(!mismatch.is_transient());
    }

    #[tokio::test]
    async fn resolves_addresses_with_and_without_ports() {
        assert_eq!(
            resolve("127.0.0.1:5000").await.unwrap(),
            "127.0.0.1:5000".parse().unwrap()
        );
        assert_eq!(
            resolve("127.0.0.1").await.unwrap(),
            SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))
        );
        assert_eq!(
            resolve("::1").await.unwrap(),
            SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], DEFAULT_PORT))
        );
        assert_eq!(resolve("localhost:7").await.unwrap().port(), 7);
        for bad in ["", "a b", "http://x", "127.0.0.1:notaport"] {
            assert!(
                matches!(resolve(bad).await, Err(ConnError::BadAddress { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn default_options_are_the_consts() {
        let options = ConnectOptions::default();
        assert_eq!(options.connect_timeout, CONNECT_TIMEOUT);
        assert_eq!(options.request_timeout, REQUEST_TIMEOUT);
        assert!(options.keep_alive < options.idle_timeout);
        assert!(RECEIVE_WINDOW as usize >= MAX_FRAME_LEN + LEN_PREFIX);
    }
}

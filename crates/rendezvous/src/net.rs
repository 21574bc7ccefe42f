//! The QUIC side of the server: TLS and transport configuration, the accept
//! loop and the per-connection loop that feeds a [`Handler`].
//!
//! ## A connection, step by step
//!
//! 1. **Accept.** A new connection from an IP address that already has
//!    [`Limits::max_connections_per_ip`] connections is refused at once
//!    (QUIC `CONNECTION_REFUSED`, before any TLS work). Its slot is counted
//!    free again when the connection ends (T-35).
//! 2. **Handshake.** TLS 1.3 only, ALPN `messenger/1` only (others fail
//!    with `no_application_protocol`), 0-RTT off (T-45), bounded by
//!    [`Limits::handshake_timeout`].
//! 3. **Control stream.** Within [`Limits::control_stream_timeout`] the
//!    client opens one bidirectional stream and writes its *preface*: one
//!    frame whose body is its protocol version as a postcard `u16` (the same
//!    bytes as a struct `{ version: u16 }`). A QUIC peer only learns of a
//!    stream when data arrives on it, so the client speaks first. A silent
//!    client is closed with [`CloseReason::NoControlStream`] (T-37); another
//!    version with [`CloseReason::UnsupportedVersion`].
//! 4. **Hello.** The server writes [`ServerFrame::Hello`] with a fresh
//!    random nonce, and takes this connection's RFC 9266 exporter value;
//!    both go to the handler in the [`ConnectionContext`] for login.
//! 5. **Requests.** Each [`ClientFrame`] is handed to the handler in order
//!    and its [`ServerFrame::Reply`] written back, in request order. Requests
//!    the handler pipelines (`Send`, `Ack`) are begun in order without waiting for
//!    the previous reply, at most `MAX_PIPELINED` pending per connection;
//!    any other request waits until those replies are out. With the
//!    pipeline full, the next pipelined request waits for the oldest reply
//!    while the stream is read on, at most `MAX_READ_AHEAD` frames
//!    (`MAX_READ_AHEAD_BYTES`) further: each frame read takes its
//!    rate-limit token, a request the handler begins ahead (`Ack`, which a
//!    sender on another connection may be waiting for) is begun as soon
//!    as only pipelined requests are held before it, and the others are kept
//!    and handled in order; their replies keep request order. Replies and
//!    the handler's pushes are written as whole frames under one lock on
//!    the send half, so frames never interleave; replies already finished
//!    together (one group commit) go out in one stream write, and so do
//!    pushes already queued together. A client that
//!    reads nothing stops being served, and once its push queue fills it
//!    is closed with [`CloseReason::TooSlow`]. A frame that does not decode, an oversized length prefix
//!    (refused when its four bytes arrive), or a stream that ends inside a
//!    frame closes that connection with `bad_request` / `too_large`
//!    (T-30, T-31); nothing panics, and other connections are unaffected.
//!    Requests beyond the connection's token bucket are answered
//!    `rate_limited` without reaching the handler. A frame whose first
//!    byte has arrived must be complete within [`Limits::frame_timeout`],
//!    or the connection is closed with [`CloseReason::SlowFrame`] (T-37:
//!    keep-alives stop a one-byte-a-second peer from ever going idle).
//! 6. **Login.** A connection on which no login has succeeded (the
//!    handler has not set [`ConnectionContext::user`]) within
//!    [`Limits::login_timeout`] of its handshake is closed with
//!    [`CloseReason::LoginTimeout`], which frees its per-IP slot.
//!    Requests allowed before login (`Register`, `Announce`) are served
//!    meanwhile. Otherwise a peer that sends its preface and stops would
//!    hold its slot for ever (keep-alives keep it from going idle), and a
//!    client killed after its handshake until the idle timeout; enough of
//!    them lock the honest clients at that address out.
//! 7. **Other streams** are refused with [`STREAM_REFUSED`] (T-36); QUIC
//!    flow control caps how many may be open at once.
//!
//! Logs (tracing) name the connection id, peer address and, once the
//! handler sets it, the user; never a request or reply body, a signature or
//! a key.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{Future, poll_fn, ready};
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use messenger_proto::msg::{ClientFrame, NOTIFY_ID, Reply, Request, ServerFrame, ServerHello};
use messenger_proto::{
    ALPN, ErrorCode, FrameDecoder, PROTOCOL_VERSION, decode, encode, encode_into,
};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rand::Rng as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Mutex as AsyncMutex, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tracing::{debug, info, warn};

use crate::handler::{
    CloseReason, CloseSignal, ConnectionContext, Handler, PendingReply, PushQueue, PushSender,
};
use crate::limits::{
    ACK_ELICITING_THRESHOLD, Limits, MAX_PIPELINED, MAX_READ_AHEAD, MAX_READ_AHEAD_BYTES,
};
use crate::server::ServerError;

pub use messenger_transport::CHANNEL_BINDING_LABEL;

/// Stream error code for streams beyond the control stream (`STOP_SENDING`
/// and `RESET_STREAM`): the protocol uses one stream per connection.
pub const STREAM_REFUSED: u32 = 1;

/// Longest the server waits, after a graceful end, for the client to
/// acknowledge the last frames before the connection is closed: 2 s.
///
/// Closing a QUIC connection discards unsent data, so replies to the last
/// requests need this moment; a peer that never acknowledges costs no more.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes of frames gathered into one stream write: 64 KiB.
///
/// Large enough to take every reply and push one group commit completes
/// for a connection (a few KiB each), small enough that one write does not
/// wait long for stream credit while others queue behind it.
const WRITE_BATCH: usize = 64 * 1024;

/// Largest piece read from the control stream at once: 64 KiB.
///
/// Reads are copied into the frame decoder, so this only bounds one copy.
const READ_CHUNK: usize = 64 * 1024;

/// Builds the rustls configuration the server uses: ring provider, TLS 1.3
/// only, ALPN [`ALPN`] only, no client certificates, no early data.
///
/// # Errors
///
/// [`ServerError::Tls`] if rustls refuses the certificate or key.
pub fn tls_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ServerError::Tls)?
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)
        .map_err(ServerError::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data can be replayed (a login, a send): keep it off (T-45).
    tls.max_early_data_size = 0;
    tls.send_half_rtt_data = false;
    Ok(tls)
}

/// The QUIC transport parameters from `limits`: stream counts, windows,
/// idle timeout and keep-alive, and the ACK frequency asked of clients
/// ([`ACK_ELICITING_THRESHOLD`]). Segmentation offload and MTU discovery keep
/// quinn's defaults (on): turning them off cost 2.3× relay throughput
/// (performance.md §4.9).
///
/// # Errors
///
/// [`ServerError::Config`] if the idle timeout is out of QUIC's range.
pub fn transport_config(limits: &Limits) -> Result<TransportConfig, ServerError> {
    let idle = IdleTimeout::try_from(limits.idle_timeout)
        .map_err(|_| ServerError::Config("idle timeout out of range"))?;
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.max_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(limits.max_uni_streams))
        .stream_receive_window(VarInt::from_u32(limits.stream_receive_window))
        .receive_window(VarInt::from_u32(limits.connection_receive_window))
        .send_window(limits.send_window)
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(limits.keep_alive))
        // The protocol has no datagrams.
        .datagram_receive_buffer_size(None);
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    transport.ack_frequency_config(Some(ack_frequency));
    Ok(transport)
}

/// The quinn server configuration: [`tls_config`] and
/// [`transport_config`], at most [`Limits::max_incoming`] pending
/// handshakes, no connection migration.
///
/// # Errors
///
/// As [`transport_config`]; [`ServerError::Config`] if `tls` has no
/// cipher suite QUIC can start with.
pub fn quinn_config(
    tls: rustls::ServerConfig,
    limits: &Limits,
) -> Result<quinn::ServerConfig, ServerError> {
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|_| ServerError::Config("no TLS 1.3 cipher suite usable by QUIC"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config
        .transport_config(Arc::new(transport_config(limits)?))
        .max_incoming(limits.max_incoming)
        .migration(false);
    Ok(config)
}

/// Loads a CA-issued certificate chain and its private key from PEM files.
///
/// # Errors
///
/// [`ServerError::Pem`] if a file cannot be read or holds no certificate
/// or key.
pub fn load_pem_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServerError> {
    let pem_error = |path: &Path, reason: &'static str| ServerError::Pem {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|_| pem_error(cert, "cannot read a PEM certificate from it"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| pem_error(cert, "a certificate in it is damaged"))?;
    if chain.is_empty() {
        return Err(pem_error(cert, "no certificate in it"));
    }
    // Parser errors are not used: they could quote the key file.
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|_| pem_error(key, "no readable private key in it"))?;
    Ok((chain, key))
}

/// State shared by the accept loop and every connection.
pub(crate) struct Shared<H> {
    pub(crate) handler: Arc<H>,
    pub(crate) limits: Limits,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    next_id: AtomicU64,
}

impl<H> Shared<H> {
    pub(crate) fn new(handler: Arc<H>, limits: Limits) -> Self {
        Self {
            handler,
            limits,
            per_ip: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }
}

/// Accepts connections until `stop` turns true (or its sender is gone),
/// then lets connections finish their current request for
/// [`Limits::shutdown_grace`], closes the rest and waits for the endpoint
/// to go idle.
pub(crate) async fn accept_loop<H: Handler>(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared<H>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        let Some(slot) = IpSlot::take(&shared, peer.ip()) else {
            debug!(%peer, "connection refused: too many connections from this address");
            incoming.refuse();
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Boxed: an argument stays part of the task for its whole life,
        // and an `Incoming` is only needed until the handshake.
        let incoming = Box::new(incoming);
        tasks.spawn(serve(incoming, id, slot, Arc::clone(&shared), stop.clone()));
    }
    let grace = shared.limits.shutdown_grace;
    let drained = timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!("connections still busy after the shutdown grace; closing them");
    }
    close_endpoint(&endpoint, CloseReason::ShuttingDown);
    tasks.shutdown().await;
    let _ = timeout(FLUSH_TIMEOUT, endpoint.wait_idle()).await;
}

/// Closes every connection of `endpoint` with `reason`.
pub(crate) fn close_endpoint(endpoint: &quinn::Endpoint, reason: CloseReason) {
    endpoint.close(VarInt::from_u32(reason.code()), reason.reason().as_bytes());
}

/// One per-IP connection slot, given back on drop.
struct IpSlot {
    ip: IpAddr,
    per_ip: Arc<dyn SlotTable>,
}

trait SlotTable: Send + Sync {
    fn release(&self, ip: IpAddr);
}

impl<H: Send + Sync> SlotTable for Shared<H> {
    fn release(&self, ip: IpAddr) {
        let mut map = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = map.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&ip);
            }
        }
    }
}

impl IpSlot {
    fn take<H: Handler>(shared: &Arc<Shared<H>>, ip: IpAddr) -> Option<Self> {
        let mut map = shared.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
        let count = map.entry(ip).or_insert(0);
        if *count >= shared.limits.max_connections_per_ip {
            return None;
        }
        *count += 1;
        let per_ip: Arc<dyn SlotTable> = Arc::clone(shared) as Arc<dyn SlotTable>;
        Some(Self { ip, per_ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.per_ip.release(self.ip);
    }
}

/// How the request loop of a connection ended.
enum Ended {
    /// The server decides to close, with this reason.
    Close(CloseReason),
    /// The connection is already gone (peer closed, timed out, reset).
    Lost,
}

/// A connection past its handshake, control stream and hello.
struct Opened {
    conn: quinn::Connection,
    /// When the connection is closed unless a login has succeeded by then.
    login_deadline: Instant,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    nonce: [u8; 32],
    exporter: [u8; 32],
}

async fn serve<H: Handler>(
    incoming: Box<quinn::Incoming>,
    id: u64,
    _slot: IpSlot,
    shared: Arc<Shared<H>>,
    mut stop: watch::Receiver<bool>,
) {
    let peer = incoming.remote_address();
    let limits = &shared.limits;
    // Boxed, and freed before the request loop: the handshake's and the
    // preface's futures took most of a 5 KB task that every idle
    // connection kept (docs/benchmarks.md §2).
    let Some(opened) = Box::pin(open(incoming, id, &shared, &mut stop)).await else {
        return;
    };
    let Opened {
        conn,
        login_deadline,
        send,
        recv,
        decoder,
        nonce,
        exporter,
    } = opened;

    let (pushes, push_queue) = PushSender::channel(limits.push_queue);
    let mut ctx = ConnectionContext::new(peer, nonce, exporter, pushes, id);
    let mut session = shared.handler.on_connect(&ctx);
    // One send half for replies and pushes, each written as a whole frame
    // under the lock. A client that does not read blocks the reply being
    // written, and with it the request loop (backpressure), while its
    // pushes queue up until the queue is full (`CloseReason::TooSlow`).
    // No channel and no second task: both cost every idle connection
    // memory (docs/benchmarks.md §2).
    let outbox = Outbox::new(send, push_queue);
    // Both futures are made inside the `select!`, which stores them once
    // in this task (a local moved into a call or `pin!` would be stored
    // twice). The writer, once done (the connection was closed), waits
    // forever, so the request loop always runs to its end: a handler's work
    // is not cancelled. The push queue is closed then (`write_then_wait`),
    // or after the request loop here: before `on_disconnect`, so pushes
    // from then on fail as closed.
    //
    // A push queued before a reply is written goes out ahead of it: the
    // request loop writes the pushes queued by then first (`Outbox`). A
    // client waiting for its `Send` to be answered by the recipient's
    // acknowledgement while that recipient writes to it (two people
    // writing to each other at once) thus reads the recipient's envelope
    // before the answer, and acknowledges it rather than leaving it for
    // later (docs/protocol.md §4). Biased, the writer first, so that it
    // takes what is queued in the common case.
    let ended = tokio::select! {
        biased;
        never = write_then_wait(&conn, &outbox) => match never {},
        ended = read_and_flush(
            &shared,
            &conn,
            recv,
            decoder,
            &outbox,
            &mut ctx,
            &mut session,
            &mut stop,
            login_deadline,
        ) => ended,
    };
    outbox.close_queue();
    finish(&conn, id, peer, ctx.user.as_deref(), ended);
    // Boxed for the same reason as in `handled`.
    Box::pin(shared.handler.on_disconnect(&ctx, session)).await;
}

/// The request loop, then, if it ended gracefully, the end of the stream
/// after the last replies, waiting for the client's acknowledgement. The
/// writer may still be writing a push meanwhile: the lock lets it finish.
#[allow(clippy::too_many_arguments)]
async fn read_and_flush<H: Handler>(
    shared: &Shared<H>,
    conn: &quinn::Connection,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    outbox: &Outbox,
    ctx: &mut ConnectionContext,
    session: &mut H::Session,
    stop: &mut watch::Receiver<bool>,
    login_deadline: Instant,
) -> Ended {
    let ended = read_loop(
        shared,
        conn,
        recv,
        decoder,
        outbox,
        ctx,
        session,
        stop,
        login_deadline,
    )
    .await;
    if is_graceful(&ended) && conn.close_reason().is_none() {
        finish_stream(&outbox.send).await;
    }
    ended
}

/// [`write_loop`], then nothing, for ever. Once the writer has stopped
/// (the connection closed, or its send half failed), the push queue is
/// closed and emptied: pushes from then on fail as closed (so a live
/// delivery falls back to the mailbox at once) instead of filling a queue
/// nobody writes.
async fn write_then_wait(conn: &quinn::Connection, outbox: &Outbox) -> Infallible {
    write_loop(conn, outbox).await;
    outbox.close_queue();
    std::future::pending().await
}

/// Whether the request loop ended without a fault (client done, shutdown).
fn is_graceful(ended: &Ended) -> bool {
    matches!(
        ended,
        Ended::Close(CloseReason::Done | CloseReason::ShuttingDown)
    )
}

/// Finishes the send half and waits, at most [`FLUSH_TIMEOUT`], for the
/// client to acknowledge all of it.
async fn finish_stream(send: &AsyncMutex<quinn::SendStream>) {
    let mut send = send.lock().await;
    let _ = send.finish();
    let _ = timeout(FLUSH_TIMEOUT, send.stopped()).await;
}

/// `handler.handle`, its future boxed.
///
/// A connection's task is allocated once, at the size of its largest
/// state; inline, the handler's future (every request kind's state, several
/// kilobytes for the service) would be part of every idle connection.
/// Boxed, it costs memory only while a request is being handled
/// (docs/benchmarks.md §2).
async fn handled<H: Handler>(
    handler: &H,
    ctx: &mut ConnectionContext,
    session: &mut H::Session,
    request: Request,
) -> Result<Reply, ErrorCode> {
    Box::pin(handler.handle(ctx, session, request)).await
}

/// Accepts `incoming`, waits for its control stream and preface, and
/// writes the hello; on failure closes the connection (if it got that far)
/// and returns None.
async fn open<H: Handler>(
    incoming: Box<quinn::Incoming>,
    id: u64,
    shared: &Shared<H>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Opened> {
    let peer = incoming.remote_address();
    let limits = &shared.limits;
    let connecting = match (*incoming).accept() {
        Ok(connecting) => connecting,
        Err(error) => {
            debug!(id, %peer, %error, "connection failed before the handshake");
            return None;
        }
    };
    let conn = tokio::select! {
        result = timeout(limits.handshake_timeout, connecting) => match result {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                debug!(id, %peer, %error, "handshake failed");
                return None;
            }
            Err(_) => {
                debug!(id, %peer, "handshake timed out");
                return None;
            }
        },
        _ = stop.wait_for(|stopped| *stopped) => return None,
    };
    info!(id, %peer, "connection opened");
    let login_deadline = Instant::now() + limits.login_timeout;

    let mut decoder = FrameDecoder::new();
    let opened = tokio::select! {
        result = timeout(limits.control_stream_timeout, open_control(&conn, &mut decoder)) => match result {
            Ok(opened) => opened,
            Err(_) => Err(Ended::Close(CloseReason::NoControlStream)),
        },
        _ = stop.wait_for(|stopped| *stopped) => Err(Ended::Close(CloseReason::ShuttingDown)),
    };
    let (mut send, recv) = match opened {
        Ok(streams) => streams,
        Err(ended) => {
            finish(&conn, id, peer, None, ended);
            return None;
        }
    };

    let mut nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut nonce);
    let mut exporter = [0u8; 32];
    if conn
        .export_keying_material(&mut exporter, CHANNEL_BINDING_LABEL, b"")
        .is_err()
    {
        finish(&conn, id, peer, None, Ended::Close(CloseReason::Internal));
        return None;
    }
    let hello = ServerFrame::Hello(ServerHello {
        version: PROTOCOL_VERSION,
        nonce,
        server_key: shared.handler.server_key(),
    });
    let written = match encode(&hello) {
        Ok(bytes) => send.write_all(&bytes).await.is_ok(),
        Err(_) => false,
    };
    if !written {
        finish(&conn, id, peer, None, Ended::Lost);
        return None;
    }

    Some(Opened {
        conn,
        login_deadline,
        send,
        recv,
        decoder,
        nonce,
        exporter,
    })
}

/// Waits for the client's control stream and checks its preface.
async fn open_control(
    conn: &quinn::Connection,
    decoder: &mut FrameDecoder,
) -> Result<(quinn::SendStream, quinn::RecvStream), Ended> {
    let (send, mut recv) = conn.accept_bi().await.map_err(|_| Ended::Lost)?;
    let body = loop {
        if let Some(body) = decoder.next_frame() {
            break body;
        }
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => decoder
                .push(&chunk.bytes)
                .map_err(|e| Ended::Close(CloseReason::for_frame_error(&e)))?,
            Ok(None) => return Err(Ended::Close(CloseReason::BadRequest)),
            Err(_) => return Err(Ended::Lost),
        }
    };
    match decode::<u16>(&body) {
        Ok(PROTOCOL_VERSION) => Ok((send, recv)),
        Ok(_) => Err(Ended::Close(CloseReason::UnsupportedVersion)),
        Err(e) => Err(Ended::Close(CloseReason::for_frame_error(&e))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_loop<H: Handler>(
    shared: &Shared<H>,
    conn: &quinn::Connection,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    outbox: &Outbox,
    ctx: &mut ConnectionContext,
    session: &mut H::Session,
    stop: &mut watch::Receiver<bool>,
    login_deadline: Instant,
) -> Ended {
    let mut pending = VecDeque::new();
    let mut held = VecDeque::new();
    let run = read_requests(
        shared,
        conn,
        recv,
        decoder,
        outbox,
        ctx,
        session,
        stop,
        login_deadline,
        &mut pending,
        &mut held,
    );
    let ended = match run.await {
        Ok(never) => match never {},
        Err(ended) => ended,
    };
    if matches!(
        ended,
        Ended::Close(CloseReason::Done | CloseReason::ShuttingDown)
    ) {
        // A graceful end still answers what was pipelined: that work is
        // already queued (a send is committed whether or not its reply is
        // written), so the client should learn of it. So is that of the
        // requests begun ahead of a full pipeline (held only at shutdown);
        // the frames held with them were not handled and get no reply.
        for item in held.drain(..) {
            if let Held::Begun { id, reply } = item {
                pending.push_back((id, reply));
            }
        }
        if let Err(lost) = Box::pin(drain(&mut pending, outbox, ctx.id)).await {
            return lost;
        }
    }
    ended
}

/// What woke the request loop.
enum Event {
    /// The oldest pending reply is done.
    Done(Option<(u32, Result<Reply, ErrorCode>)>),
    /// The control stream gave data, ended or failed.
    Read(Result<Option<quinn::Chunk>, quinn::ReadError>),
    /// The timer for the frame and login deadlines fired: a partly
    /// received frame was not completed in time, no login succeeded in
    /// time, or neither (it was set for an earlier deadline).
    Timer,
    /// The server is shutting down.
    Stop,
}

/// Replies still being worked on, oldest first, with their request ids.
type Pending = VecDeque<(u32, PendingReply)>;

/// A frame taken from the control stream and not yet handled.
enum Held {
    /// A request, and the bytes of its frame (counted against
    /// [`MAX_READ_AHEAD_BYTES`] while it is held).
    Request {
        id: u32,
        request: Request,
        size: usize,
    },
    /// A request beyond the connection's rate: answered `rate_limited`.
    Limited { id: u32 },
    /// A request begun ahead of a full pipeline
    /// ([`Handler::begins_ahead`]): its reply, to be queued in turn.
    Begun { id: u32, reply: PendingReply },
    /// A frame that does not decode: the connection is closed when it is
    /// reached.
    Malformed(CloseReason),
}

impl Held {
    /// Bytes of a request's frame; nothing for the others, which hold no
    /// request.
    fn size(&self) -> usize {
        match self {
            Self::Request { size, .. } => *size,
            _ => 0,
        }
    }
}

/// Frames held while the pipeline is full, in request order: the one that
/// waits for room first, then those read ahead behind it. Empty (and
/// unallocated) otherwise.
type Ahead = VecDeque<Held>;

#[allow(clippy::too_many_arguments)]
async fn read_requests<H: Handler>(
    shared: &Shared<H>,
    conn: &quinn::Connection,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    outbox: &Outbox,
    ctx: &mut ConnectionContext,
    session: &mut H::Session,
    stop: &mut watch::Receiver<bool>,
    login_deadline: Instant,
    pending: &mut Pending,
    held: &mut Ahead,
) -> Result<Infallible, Ended> {
    let handler = &*shared.handler;
    let mut bucket = TokenBucket::new(
        shared.limits.requests_per_second,
        shared.limits.request_burst,
    );
    let mut frame_deadline: Option<Instant> = None;
    // One timer serves both deadlines. It is armed lazily: moved only when
    // a deadline falls before it, and, when it fires with nothing due,
    // armed again for the next deadline. Under steady traffic a new partial
    // frame sets a later frame deadline nearly every read; moving the timer
    // each time would cost a timer-wheel update per read. Boxed, and only
    // while armed: an idle logged-in connection has none (docs/benchmarks.md
    // §2).
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // Made once: a new one per turn of the loop would join and leave the
    // stop signal's waiter list (one list, and one lock, for every
    // connection) on each turn. Boxed: kept for the whole connection,
    // inline it would grow every connection's task past an allocator size
    // class.
    let mut stopped = Box::pin(stop.wait_for(|stopped| *stopped));
    // Cleared once a login succeeds; a login is not pipelined, so the
    // handler has set the user by the time its reply is written.
    let mut login_deadline = Some(login_deadline);
    // The client finished its stream while frames were held: they are
    // handled first, then the loop ends.
    let mut finished = false;
    loop {
        // Frames in request order: those held first, then those already
        // buffered (e.g. pipelined after the preface).
        loop {
            let item = match held.pop_front() {
                Some(item) => item,
                None => match decoder.next_with(|body| take_frame(handler, body, &mut bucket)) {
                    Some(item) => item,
                    None => break,
                },
            };
            if pending.len() >= MAX_PIPELINED && needs_room(handler, &item) {
                // The pipeline is full: this frame waits until the oldest
                // reply is out, and those behind it are read ahead (below).
                // An `Ack` is begun now all the same: a sender the pipeline
                // waits for may be waiting for it. So is one already held,
                // read ahead behind a request handled since.
                held.push_front(item);
                begin_held(handler, ctx, session, held).await;
                break;
            }
            match item {
                Held::Malformed(reason) => return Err(Ended::Close(reason)),
                Held::Limited { id } => {
                    let result = Err(ErrorCode::RateLimited);
                    if pending.is_empty() {
                        write_reply(outbox, id, result, ctx.id).await?;
                    } else {
                        pending.push_back((id, Box::pin(ready(result))));
                    }
                }
                Held::Begun { id, reply } => pending.push_back((id, reply)),
                Held::Request { id, request, .. } if handler.pipelines(&request) => {
                    // Boxed, like `handle` below: see `handled`.
                    let reply = Box::pin(handler.begin(ctx, session, request)).await;
                    pending.push_back((id, reply));
                }
                Held::Request { id, request, .. } => {
                    // Earlier pipelined requests complete first, so this one
                    // sees their effects (a `Pull` after a `Send`).
                    if !pending.is_empty() {
                        // Boxed, rare: only after pipelined requests.
                        Box::pin(drain(pending, outbox, ctx.id)).await?;
                    }
                    let result = handled(handler, ctx, session, request).await;
                    write_reply(outbox, id, result, ctx.id).await?;
                }
            }
        }
        let reading = if held.is_empty() {
            if finished {
                return Err(end_of_stream(&decoder));
            }
            // Idle connections keep no read-ahead buffer.
            if held.capacity() != 0 {
                *held = VecDeque::new();
            }
            true
        } else {
            if decoder.buffered() != 0 && room_ahead(held) {
                // Boxed, rare: only with a full pipeline.
                Box::pin(read_ahead(
                    handler,
                    ctx,
                    session,
                    &mut decoder,
                    held,
                    &mut bucket,
                ))
                .await;
            }
            !finished && room_ahead(held)
        };
        // A partly received frame must be completed within the frame
        // timeout, counted from its first byte (slowloris, T-37). While
        // reading, every complete frame has been taken, so what is
        // buffered is part of one; while not (the read-ahead bound), the
        // clock stops, as the client cannot complete it.
        if !reading || decoder.buffered() == 0 {
            frame_deadline = None;
        } else if frame_deadline.is_none() {
            frame_deadline = Some(Instant::now() + shared.limits.frame_timeout);
        }
        if login_deadline.is_some() && ctx.user.is_some() {
            login_deadline = None;
            if frame_deadline.is_none() {
                // Logged in: the timer was for the login deadline alone.
                timer = None;
            }
        }
        let due = match (frame_deadline, login_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(due) = due {
            match &mut timer {
                Some(sleep) if sleep.deadline() > due => sleep.as_mut().reset(due),
                Some(_) => {}
                None => timer = Some(Box::pin(tokio::time::sleep_until(due))),
            }
        }
        let event = tokio::select! {
            done = next_reply(pending), if !pending.is_empty() => Event::Done(done),
            chunk = recv.read_chunk(READ_CHUNK, true), if reading => Event::Read(chunk),
            () = fire(&mut timer) => Event::Timer,
            _ = &mut stopped => Event::Stop,
        };
        let chunk = match event {
            Event::Done(Some((id, result))) => {
                // Replies completed by the same commit go out as one write.
                write_replies(outbox, pending, id, result, ctx.id).await?;
                continue;
            }
            Event::Done(None) => continue,
            Event::Read(chunk) => chunk,
            Event::Timer => {
                timer = None;
                let now = Instant::now();
                if frame_deadline.is_some_and(|at| at <= now) {
                    return Err(Ended::Close(CloseReason::SlowFrame));
                }
                if login_deadline.is_some_and(|at| at <= now) {
                    return Err(Ended::Close(CloseReason::LoginTimeout));
                }
                // Fired early (set for a deadline since moved or gone):
                // armed again above.
                continue;
            }
            Event::Stop => return Err(Ended::Close(CloseReason::ShuttingDown)),
        };
        match chunk {
            Ok(Some(chunk)) => {
                decoder
                    .push(&chunk.bytes)
                    .map_err(|e| Ended::Close(CloseReason::for_frame_error(&e)))?;
            }
            // Frames held are handled before the end.
            Ok(None) if !held.is_empty() => finished = true,
            Ok(None) => return Err(end_of_stream(&decoder)),
            Err(_) => {
                return Err(if conn.close_reason().is_some() {
                    Ended::Lost
                } else {
                    // The client reset its control stream.
                    Ended::Close(CloseReason::BadRequest)
                });
            }
        }
    }
}

/// Waits for the armed timer of the request loop; for ever if none is.
async fn fire(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Decodes a frame's body and takes a token for it from `bucket`, unless
/// the handler exempts it ([`Handler::rate_exempt`]).
fn take_frame<H: Handler>(handler: &H, body: &[u8], bucket: &mut TokenBucket) -> Held {
    match decode::<ClientFrame>(body) {
        Err(e) => Held::Malformed(CloseReason::for_frame_error(&e)),
        // A notification could not be answered, so only an `Ack` may be one.
        Ok(frame) if frame.is_notification() && !matches!(frame.request, Request::Ack { .. }) => {
            Held::Malformed(CloseReason::BadRequest)
        }
        Ok(frame) if !handler.rate_exempt(&frame.request) && !bucket.take() => {
            Held::Limited { id: frame.id }
        }
        Ok(frame) => Held::Request {
            id: frame.id,
            request: frame.request,
            size: body.len(),
        },
    }
}

/// Whether `item` takes a place in the pipeline (or, for a rate-limited
/// request, waits behind it) rather than draining it.
fn needs_room<H: Handler>(handler: &H, item: &Held) -> bool {
    match item {
        Held::Request { request, .. } => handler.pipelines(request),
        Held::Limited { .. } | Held::Begun { .. } => true,
        Held::Malformed(_) => false,
    }
}

/// Whether `request` is begun as soon as it is read while the pipeline is
/// full ([`Handler::begins_ahead`]; only a pipelined one).
fn begins_ahead<H: Handler>(handler: &H, request: &Request) -> bool {
    handler.pipelines(request) && handler.begins_ahead(request)
}

/// The first frame held that may be begun ahead now: a request the
/// handler [begins ahead](Handler::begins_ahead), not yet begun, with only
/// pipelined requests (begun or not, or answered `rate_limited`) held
/// before it. [`read_ahead`] begins those it reads; this finds the ones
/// read behind a request of another kind that has been handled since.
fn held_to_begin<H: Handler>(handler: &H, held: &Ahead) -> Option<usize> {
    held.iter()
        .take_while(|item| needs_room(handler, item))
        .position(
            |item| matches!(item, Held::Request { request, .. } if begins_ahead(handler, request)),
        )
}

/// Whether more frames may be read ahead of a full pipeline: fewer than
/// [`MAX_READ_AHEAD`] frames and [`MAX_READ_AHEAD_BYTES`] held, and none of
/// them malformed (nothing behind one is ever handled).
fn room_ahead(held: &Ahead) -> bool {
    held.len() < MAX_READ_AHEAD
        && !matches!(held.back(), Some(Held::Malformed(_)))
        && held.iter().map(Held::size).sum::<usize>() < MAX_READ_AHEAD_BYTES
}

/// Takes the frames buffered in `decoder` into `held` while there is
/// [`room_ahead`], each with its rate-limit token. A request the handler
/// [begins ahead](Handler::begins_ahead) is begun before this returns if only
/// pipelined requests (begun or not, or answered `rate_limited`) are held
/// before it, so that it does not wait for them; every other frame is
/// kept for its turn.
async fn read_ahead<H: Handler>(
    handler: &H,
    ctx: &mut ConnectionContext,
    session: &mut H::Session,
    decoder: &mut FrameDecoder,
    held: &mut Ahead,
    bucket: &mut TokenBucket,
) {
    while room_ahead(held) {
        let Some(item) = decoder.next_with(|body| take_frame(handler, body, bucket)) else {
            break;
        };
        held.push_back(item);
    }
    begin_held(handler, ctx, session, held).await;
}

/// Begins, in order, every held request that [`held_to_begin`] finds.
async fn begin_held<H: Handler>(
    handler: &H,
    ctx: &mut ConnectionContext,
    session: &mut H::Session,
    held: &mut Ahead,
) {
    while let Some(at) = held_to_begin(handler, held) {
        let Some(Held::Request { id, request, .. }) = held.remove(at) else {
            break;
        };
        let reply = Box::pin(handler.begin(ctx, session, request)).await;
        held.insert(at, Held::Begun { id, reply });
    }
}

/// How the loop ends once the client has finished its stream.
fn end_of_stream(decoder: &FrameDecoder) -> Ended {
    match decoder.finish() {
        Ok(()) => Ended::Close(CloseReason::Done),
        Err(_) => Ended::Close(CloseReason::BadRequest),
    }
}

/// Waits for every pending reply, writing each in order.
async fn drain(pending: &mut Pending, outbox: &Outbox, conn: u64) -> Result<(), Ended> {
    while let Some((id, result)) = next_reply(pending).await {
        write_replies(outbox, pending, id, result, conn).await?;
    }
    Ok(())
}

/// The oldest pending reply once it is done (None when nothing is
/// pending). Cancel-safe: the future stays queued until it completes.
async fn next_reply(pending: &mut Pending) -> Option<(u32, Result<Reply, ErrorCode>)> {
    let (_, reply) = pending.front_mut()?;
    let result = reply.await;
    let (id, _) = pending.pop_front()?;
    Some((id, result))
}

/// Encodes the reply to request `id` and writes it, after the pushes
/// queued by then ([`write_queued_first`]).
///
/// Not an `async fn`: the reply is encoded before the future is made, so
/// the future (part of the request loop's) holds its bytes, not a `Reply`.
fn write_reply<'a>(
    outbox: &'a Outbox,
    id: u32,
    result: Result<Reply, ErrorCode>,
    conn: u64,
) -> impl Future<Output = Result<(), Ended>> + Send + 'a {
    let mut bytes = Vec::new();
    let encoded = encode_reply(&mut bytes, id, result, conn);
    async move {
        encoded?;
        if bytes.is_empty() {
            // A notification's: nothing to write.
            return Ok(());
        }
        let mut send = outbox.send.lock().await;
        write_queued_first(&mut send, outbox).await?;
        send.write_chunk(Bytes::from(bytes))
            .await
            .map_err(|_| Ended::Lost)
    }
}

/// Encodes the reply to request `id` and writes it together with the
/// replies after it in `pending` that are already done, up to
/// [`WRITE_BATCH`] bytes, in one write: each write locks the send half and
/// wakes the connection's driver, and a group commit completes many
/// replies at once. Those gathered are taken once the lock is held, so
/// replies finished while a push was being written join too. The pushes
/// queued by then go first ([`write_queued_first`]).
///
/// Not an `async fn`, like [`write_reply`].
fn write_replies<'a>(
    outbox: &'a Outbox,
    pending: &'a mut Pending,
    id: u32,
    result: Result<Reply, ErrorCode>,
    conn: u64,
) -> impl Future<Output = Result<(), Ended>> + Send + 'a {
    let mut bytes = Vec::new();
    let encoded = encode_reply(&mut bytes, id, result, conn);
    async move {
        encoded?;
        if bytes.is_empty() {
            // A notification's (never answered): the send half is locked
            // only if replies after it are ready too, so that a push being
            // written to a slow client does not hold the loop for nothing.
            take_ready(&mut bytes, pending, conn).await?;
            if bytes.is_empty() {
                return Ok(());
            }
        }
        let mut send = outbox.send.lock().await;
        // The replies ready now, then the pushes queued by now: a push
        // queued before one of these replies was ready is among them. (The
        // other order would let a reply made ready while the pushes wait on
        // flow control overtake a push queued meanwhile.)
        take_ready(&mut bytes, pending, conn).await?;
        write_queued_first(&mut send, outbox).await?;
        send.write_chunk(Bytes::from(bytes))
            .await
            .map_err(|_| Ended::Lost)
    }
}

/// Appends to `out` the replies at the front of `pending` that are already
/// done, in order, until one is not or `out` holds [`WRITE_BATCH`] bytes.
/// Never waits.
fn take_ready<'a>(
    out: &'a mut Vec<u8>,
    pending: &'a mut Pending,
    conn: u64,
) -> impl Future<Output = Result<(), Ended>> + Send + 'a {
    poll_fn(move |cx| {
        while out.len() < WRITE_BATCH {
            let Some((_, reply)) = pending.front_mut() else {
                break;
            };
            let Poll::Ready(result) = reply.as_mut().poll(cx) else {
                break;
            };
            let Some((id, _)) = pending.pop_front() else {
                break;
            };
            if let Err(ended) = encode_reply(out, id, result, conn) {
                return Poll::Ready(Err(ended));
            }
        }
        Poll::Ready(Ok(()))
    })
}

/// Appends the frame of the reply to request `id` to `out`.
fn encode_reply(
    out: &mut Vec<u8>,
    id: u32,
    result: Result<Reply, ErrorCode>,
    conn: u64,
) -> Result<(), Ended> {
    if id == NOTIFY_ID {
        // Never answered (a notification is an `Ack`; should it fail, the
        // envelopes are delivered again).
        if let Err(code) = result {
            debug!(id = conn, ?code, "a notification failed");
        }
        return Ok(());
    }
    if let Err(error) = encode_into(out, &ServerFrame::Reply { id, result }) {
        warn!(id = conn, %error, "reply could not be encoded");
        let fallback = ServerFrame::Reply {
            id,
            result: Err(ErrorCode::Internal),
        };
        encode_into(out, &fallback).map_err(|_| Ended::Close(CloseReason::Internal))?;
    }
    Ok(())
}

/// Before a reply, with the send half held: writes every push queued
/// until now, so that none is overtaken by a reply that became ready after
/// it was queued (docs/protocol.md §4). Those queued meanwhile wait: a
/// flood of pushes does not hold the reply back.
async fn write_queued_first(send: &mut quinn::SendStream, outbox: &Outbox) -> Result<(), Ended> {
    if outbox.too_slow() {
        // The writer closes the connection next; a burst of pushes first
        // would only delay the close (and could crowd it out of a client's
        // receive buffer).
        return Ok(());
    }
    let mut left = outbox.queued_len();
    while left != 0 {
        match write_queued(send, outbox, left).await {
            Ok(0) => break,
            Ok(n) => left = left.saturating_sub(n),
            Err(_) => return Err(Ended::Lost),
        }
    }
    Ok(())
}

/// Writes pushes, refuses extra streams, and closes the connection when a
/// [`PushSender`] asks. Returns once the connection is closed or its send
/// half fails.
async fn write_loop(conn: &quinn::Connection, outbox: &Outbox) {
    let close = outbox.close_signal();
    loop {
        tokio::select! {
            biased;
            reason = close.wait() => {
                if reason != CloseReason::TooSlow {
                    // Write what was queued before the request (e.g. the
                    // `Replaced` push), then close; bounded, since a reply
                    // being written to a client that reads nothing holds
                    // the send half.
                    // Boxed: rare, and larger than the loop's other states.
                    let flush = timeout(FLUSH_TIMEOUT * 2, flush_pushes(outbox));
                    let _ = Box::pin(flush).await;
                }
                close_connection(conn, reason);
                return;
            }
            queued = outbox.push_queued() => {
                if !queued {
                    return;
                }
                // Waiting behind a reply the client does not read, the push
                // queue may fill: that closes the connection at once.
                tokio::select! {
                    biased;
                    () = too_slow(&close) => {
                        close_connection(conn, CloseReason::TooSlow);
                        return;
                    }
                    written = write_pushes(outbox) => if written.is_err() {
                        return;
                    },
                }
            }
            stream = conn.accept_bi() => match stream {
                Ok((mut extra_send, mut extra_recv)) => {
                    let _ = extra_recv.stop(VarInt::from_u32(STREAM_REFUSED));
                    let _ = extra_send.reset(VarInt::from_u32(STREAM_REFUSED));
                }
                Err(_) => return,
            },
            stream = conn.accept_uni() => match stream {
                Ok(mut extra_recv) => {
                    let _ = extra_recv.stop(VarInt::from_u32(STREAM_REFUSED));
                }
                Err(_) => return,
            },
        }
    }
}

/// Writes the pushes still queued, then finishes the send half and waits
/// for the client to acknowledge it.
async fn flush_pushes(outbox: &Outbox) {
    loop {
        match write_pushes(outbox).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return,
        }
    }
    finish_stream(&outbox.send).await;
}

/// Returns once a sender has asked to close with [`CloseReason::TooSlow`];
/// never for another reason (those wait for the current frame).
async fn too_slow(close: &CloseSignal) {
    if close.wait().await != CloseReason::TooSlow {
        std::future::pending::<()>().await;
    }
}

fn close_connection(conn: &quinn::Connection, reason: CloseReason) {
    conn.close(VarInt::from_u32(reason.code()), reason.reason().as_bytes());
}

/// Writes the pushes queued, up to [`WRITE_BATCH`] bytes, in one write,
/// taken once the send half is held (as in [`write_replies`]). Returns how
/// many (none if the request loop wrote them first).
async fn write_pushes(outbox: &Outbox) -> Result<usize, quinn::WriteError> {
    let mut send = outbox.send.lock().await;
    write_queued(&mut send, outbox, usize::MAX).await
}

/// Writes up to `most` queued pushes, up to [`WRITE_BATCH`] bytes, in one
/// write, with the send half held. Returns how many. A frame alone goes
/// to QUIC as it was queued; several are copied into one buffer first, so
/// that the stream keeps one piece per write rather than one per frame:
/// quinn looks up the data of each packet it builds piece by piece from
/// the oldest unacknowledged one, which over a long round trip and a full
/// send window would be a thousand pieces of 1 KiB envelopes.
async fn write_queued(
    send: &mut quinn::SendStream,
    outbox: &Outbox,
    most: usize,
) -> Result<usize, quinn::WriteError> {
    let Some(push) = outbox.next_push() else {
        return Ok(0);
    };
    let next = if most > 1 { outbox.next_push() } else { None };
    let Some(next) = next else {
        send.write_chunk(Bytes::from(push)).await?;
        return Ok(1);
    };
    let mut batch = Vec::with_capacity(2 * (push.len() + next.len()));
    batch.extend_from_slice(&push);
    batch.extend_from_slice(&next);
    let mut taken = 2;
    while batch.len() < WRITE_BATCH && taken < most {
        let Some(push) = outbox.next_push() else {
            break;
        };
        batch.extend_from_slice(&push);
        taken += 1;
    }
    send.write_chunk(Bytes::from(batch)).await?;
    Ok(taken)
}

/// A connection's send half and the pushes queued for it, shared by its
/// writer and its request loop (one task: never at once).
///
/// Whoever writes holds the send half's lock and takes the pushes to
/// write under it, so pushes stay in order; before each reply, the
/// request loop writes the pushes queued by then ([`write_queued_first`]).
/// The writer never holds a push while it waits for the lock: it only
/// notes that one has come ([`Outbox::push_queued`]).
struct Outbox {
    send: AsyncMutex<quinn::SendStream>,
    queued: Mutex<Queued>,
}

struct Queued {
    queue: PushQueue,
    /// The push whose arrival woke the writer, not yet written: the next
    /// to go, whoever writes.
    head: Option<Box<[u8]>>,
}

impl Outbox {
    fn new(send: quinn::SendStream, queue: PushQueue) -> Self {
        Self {
            send: AsyncMutex::new(send),
            queued: Mutex::new(Queued { queue, head: None }),
        }
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close_signal(&self) -> Arc<CloseSignal> {
        self.queued().queue.close_signal()
    }

    /// Waits until a push is queued; false once none can come (every
    /// [`PushSender`] is gone).
    fn push_queued(&self) -> impl Future<Output = bool> + Send + '_ {
        poll_fn(|cx| {
            let mut queued = self.queued();
            if queued.head.is_some() {
                return Poll::Ready(true);
            }
            match queued.queue.poll_recv_frame(cx) {
                Poll::Ready(Some(push)) => {
                    queued.head = Some(push);
                    Poll::Ready(true)
                }
                Poll::Ready(None) => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }
        })
    }

    /// The next push to write, if one is queued.
    fn next_push(&self) -> Option<Box<[u8]>> {
        let mut queued = self.queued();
        queued.head.take().or_else(|| queued.queue.try_recv_frame())
    }

    /// Whether a [`PushSender`] found the queue full: the connection is
    /// closed with [`CloseReason::TooSlow`] at the writer's next turn.
    fn too_slow(&self) -> bool {
        self.queued().queue.close_reason() == Some(CloseReason::TooSlow)
    }

    /// Refuses further pushes and drops those queued.
    fn close_queue(&self) {
        let mut queued = self.queued();
        queued.head = None;
        queued.queue.close();
    }

    /// How many pushes are queued.
    fn queued_len(&self) -> usize {
        let queued = self.queued();
        usize::from(queued.head.is_some()) + queued.queue.len()
    }
}

fn finish(
    conn: &quinn::Connection,
    id: u64,
    peer: std::net::SocketAddr,
    user: Option<&str>,
    ended: Ended,
) {
    match ended {
        Ended::Close(reason) => {
            close_connection(conn, reason);
            info!(id, %peer, user, reason = reason.reason(), "connection closed");
        }
        Ended::Lost => {
            let cause = conn
                .close_reason()
                .map_or_else(|| "ended".to_owned(), |e| e.to_string());
            info!(id, %peer, user, %cause, "connection closed");
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            tokens: burst,
            rate: f64::from(rate),
            burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_the_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10, 5);
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 5);
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 3);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..10).filter(|_| bucket.take()).count(), 5);
    }

    #[test]
    fn transport_config_accepts_the_defaults() {
        transport_config(&Limits::default()).unwrap();
    }

    #[test]
    fn transport_config_asks_clients_for_fewer_acks() {
        let config = format!("{:?}", transport_config(&Limits::default()).unwrap());
        let want = format!("ack_eliciting_threshold: {ACK_ELICITING_THRESHOLD}");
        assert!(
            config.contains("ack_frequency_config: Some(") && config.contains(&want),
            "{config}"
        );
    }
}

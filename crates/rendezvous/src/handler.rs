//! The boundary between the network layer and the service: a [`Handler`]
//! gets each request of a connection, in order, with that connection's
//! [`ConnectionContext`] and its own per-connection session state.
//!
//! The network layer knows nothing of users, mailboxes or storage; the
//! service knows nothing of sockets. The service pushes unasked frames to a
//! client through the connection's [`PushSender`], which it may clone and
//! keep (e.g. in a map of who is online).
//!
//! ## Async in the trait
//!
//! [`Handler::handle`] and [`Handler::on_disconnect`] return
//! `impl Future + Send` (return-position `impl Trait` in traits, stable since
//! Rust 1.75): no boxing per request, and the `Send` bound lets the server
//! run connections on a multi-threaded runtime. An implementation may simply
//! write `async fn handle(...)` as long as its future is `Send`. The trait is
//! therefore not object-safe; the server is generic over it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use messenger_proto::msg::{EnvelopePush, Push, Reply, Request, ServerFrame};
use messenger_proto::{ErrorCode, FrameError, LEN_PREFIX, decode, encode_into};
use tokio::sync::{Notify, mpsc};

/// The rest of a pipelined request (see [`Handler::begin`]): a future that
/// borrows nothing from the connection and yields the reply.
pub type PendingReply = Pin<Box<dyn Future<Output = Result<Reply, ErrorCode>> + Send + 'static>>;

/// What the service does with the requests of every connection.
///
/// One connection's requests are handled one at a time, in the order they
/// arrived (the next request is read only after the previous reply is
/// queued); different connections are handled concurrently.
///
/// The exception is *pipelined* requests ([`Handler::pipelines`]): a run of
/// them is started one at a time, in order, with [`Handler::begin`], but
/// the network layer goes on reading while their [`PendingReply`] futures
/// complete, and writes their replies in request order. Before any request
/// that is not pipelined, every pending reply is written first, so that
/// request sees the effects of all earlier ones. With a full pipeline, a
/// request the handler [begins ahead](Handler::begins_ahead) may be begun
/// before the pipelined requests read before it.
pub trait Handler: Send + Sync + 'static {
    /// Per-connection state the service keeps, e.g. who logged in.
    type Session: Send + 'static;

    /// The server's Ed25519 public key (signs announcements), sent to every
    /// client in [`messenger_proto::msg::ServerHello`].
    fn server_key(&self) -> [u8; 32];

    /// Called once the client has opened its control stream and been sent
    /// the hello, before its first request.
    fn on_connect(&self, ctx: &ConnectionContext) -> Self::Session;

    /// Answers one request. An `Err` is sent to the client as the reply's
    /// error code; the connection stays open.
    fn handle(
        &self,
        ctx: &mut ConnectionContext,
        session: &mut Self::Session,
        request: Request,
    ) -> impl Future<Output = Result<Reply, ErrorCode>> + Send;

    /// Whether `request` is pipelined: started with [`Handler::begin`]
    /// while earlier pipelined requests of the connection are still
    /// pending. None is by default.
    fn pipelines(&self, request: &Request) -> bool {
        let _ = request;
        false
    }

    /// Whether `request`, a pipelined one, may be begun ahead of the
    /// earlier requests of its connection that wait for room in a full
    /// pipeline ([`crate::limits::MAX_PIPELINED`]). The network layer reads
    /// on meanwhile, at most [`crate::limits::MAX_READ_AHEAD`] frames, and
    /// begins such a request as soon as only pipelined requests are held
    /// before it (when it is read, or once a request of another kind held
    /// before it has been handled); every other frame waits for its turn,
    /// and replies still go out in request order. Only a request whose
    /// effect does not depend on those earlier requests, nor theirs on it,
    /// may say yes: the service's `Ack`, which settles deliveries to its
    /// own user, so that another connection's sends waiting for it are not
    /// held up behind this connection's own. None is by default.
    fn begins_ahead(&self, request: &Request) -> bool {
        let _ = request;
        false
    }

    /// Whether `request` is handled without a token of the connection's
    /// request rate. Only one that settles what the server itself handed
    /// this connection, whose work is bounded by that, and whose refusal
    /// as a notification could not be told to the client may say yes: the
    /// service's `Ack` of live delivery ids only. None is by default.
    fn rate_exempt(&self, request: &Request) -> bool {
        let _ = request;
        false
    }

    /// Starts a pipelined request: does, before returning, everything that
    /// must happen in request order (checks, queuing work), and returns the
    /// rest as a [`PendingReply`]. The default handles the whole request at
    /// once with [`Handler::handle`].
    fn begin(
        &self,
        ctx: &mut ConnectionContext,
        session: &mut Self::Session,
        request: Request,
    ) -> impl Future<Output = PendingReply> + Send {
        // The future yields the rest of the work, by design: here there is
        // none left, so it yields a ready one.
        #[allow(clippy::async_yields_async)]
        async move {
            let result = self.handle(ctx, session, request).await;
            Box::pin(std::future::ready(result)) as PendingReply
        }
    }

    /// Called once when the connection ends, for whatever reason (client
    /// left, timeout, bad frame, shutdown), after its last request was
    /// handled. Pushes sent from now on fail with [`PushError::Closed`].
    fn on_disconnect(
        &self,
        ctx: &ConnectionContext,
        session: Self::Session,
    ) -> impl Future<Output = ()> + Send;
}

/// What a handler knows about the connection a request came on.
#[derive(Debug)]
#[non_exhaustive]
pub struct ConnectionContext {
    /// The client's address as the server sees it.
    pub peer: SocketAddr,
    /// The nonce sent in this connection's hello; a login signs it.
    pub nonce: [u8; 32],
    /// This connection's TLS exporter value (RFC 9266 label
    /// `EXPORTER-Channel-Binding`, empty context, 32 bytes); a login signs
    /// it, which binds the login to this connection.
    pub exporter: [u8; 32],
    /// Sends pushes to this client.
    pub pushes: PushSender,
    /// A server-unique id of this connection, for logs and maps.
    pub id: u64,
    /// Who is logged in on this connection, once the handler knows. The
    /// network layer uses it in logs, and a connection on which it is still
    /// `None` after [`crate::limits::Limits::login_timeout`] is closed with
    /// [`CloseReason::LoginTimeout`]: a handler sets it on a successful
    /// login.
    pub user: Option<String>,
}

impl ConnectionContext {
    /// A context for a connection; the network layer makes these, and a
    /// service test may make one with [`PushSender::channel`].
    pub fn new(
        peer: SocketAddr,
        nonce: [u8; 32],
        exporter: [u8; 32],
        pushes: PushSender,
        id: u64,
    ) -> Self {
        Self {
            peer,
            nonce,
            exporter,
            pushes,
            id,
            user: None,
        }
    }
}

/// Why the server closes a connection, sent as the QUIC application close
/// code and reason.
///
/// Codes that answer bad input reuse the wire value of the matching
/// [`ErrorCode`] (100 `bad_request`, 101 `unsupported_version`,
/// 102 `too_large`, 603 `internal`);
/// the others are in a 7xx range of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client finished its control stream; nothing went wrong (0).
    Done,
    /// A frame could not be decoded: bad postcard, trailing bytes, an
    /// unknown variant, a stream that ended inside a frame (100).
    BadRequest,
    /// The client's preface names a protocol version the server does not
    /// speak (101).
    UnsupportedVersion,
    /// A frame's length prefix exceeds the maximum frame size (102).
    TooLarge,
    /// The server failed in a way that is not the client's fault (603).
    Internal,
    /// The server is shutting down (700).
    ShuttingDown,
    /// The client did not open its control stream in time (701).
    NoControlStream,
    /// The client did not read its pushes and its push queue filled (702).
    TooSlow,
    /// A newer login of the same user replaced this connection (703).
    Replaced,
    /// A frame was started but not completed within
    /// [`crate::limits::Limits::frame_timeout`] (704): a slow-drip peer.
    SlowFrame,
    /// The client did not log in within
    /// [`crate::limits::Limits::login_timeout`] of its handshake (705): a
    /// half-open or abandoned connection holding a per-IP slot.
    LoginTimeout,
}

impl CloseReason {
    /// Every reason, in code order.
    pub const ALL: &'static [CloseReason] = &[
        Self::Done,
        Self::BadRequest,
        Self::UnsupportedVersion,
        Self::TooLarge,
        Self::Internal,
        Self::ShuttingDown,
        Self::NoControlStream,
        Self::TooSlow,
        Self::Replaced,
        Self::SlowFrame,
        Self::LoginTimeout,
    ];

    /// The QUIC application error code.
    pub fn code(self) -> u32 {
        match self {
            Self::Done => 0,
            Self::BadRequest => ErrorCode::BadRequest.as_u16().into(),
            Self::UnsupportedVersion => ErrorCode::UnsupportedVersion.as_u16().into(),
            Self::TooLarge => ErrorCode::TooLarge.as_u16().into(),
            Self::Internal => ErrorCode::Internal.as_u16().into(),
            Self::ShuttingDown => 700,
            Self::NoControlStream => 701,
            Self::TooSlow => 702,
            Self::Replaced => 703,
            Self::SlowFrame => 704,
            Self::LoginTimeout => 705,
        }
    }

    /// The reason phrase sent with the code (ASCII, one line).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::BadRequest => "bad_request",
            Self::UnsupportedVersion => "unsupported_version",
            Self::TooLarge => "too_large",
            Self::Internal => "internal",
            Self::ShuttingDown => "server shutting down",
            Self::NoControlStream => "no control stream",
            Self::TooSlow => "push queue full",
            Self::Replaced => "replaced by a newer login",
            Self::SlowFrame => "frame not completed in time",
            Self::LoginTimeout => "not logged in in time",
        }
    }

    /// The reason with application close code `code`, if there is one.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|r| u64::from(r.code()) == code)
    }

    /// The reason for a frame that could not be read.
    pub fn for_frame_error(error: &FrameError) -> Self {
        match error {
            FrameError::TooLarge { .. } => Self::TooLarge,
            _ => Self::BadRequest,
        }
    }
}

/// Why a push was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The client's push queue is full: the client is being disconnected
    /// (it will fetch what it missed at its next login).
    #[error("push queue of the connection is full; the client is disconnected")]
    Full,
    /// The connection has ended.
    #[error("the connection has ended")]
    Closed,
    /// The push does not fit in a frame (a service bug; dropped).
    #[error("the push does not fit in a frame")]
    Encode,
}

/// The frame of one push (length prefix and body), encoded by whoever
/// pushes, and written to the client as it is.
#[derive(Clone, PartialEq, Eq)]
pub struct PushFrame(Box<[u8]>);

impl PushFrame {
    /// The frame of `push`; `None` (logged) if it does not fit in a frame,
    /// a service bug: the client fetches what it missed at its next login.
    pub fn new(push: Push) -> Option<Self> {
        Self::encode(|out| encode_into(out, &ServerFrame::Push(push)))
    }

    /// The frame of an envelope push made from borrowed parts: the same
    /// bytes as [`PushFrame::new`] of the owned `Push::Envelope`.
    pub fn envelope(envelope: &EnvelopePush<'_>) -> Option<Self> {
        Self::encode(|out| encode_into(out, envelope))
    }

    fn encode(encode: impl FnOnce(&mut Vec<u8>) -> Result<(), FrameError>) -> Option<Self> {
        let mut bytes = Vec::new();
        match encode(&mut bytes) {
            Ok(()) => Some(Self(bytes.into_boxed_slice())),
            Err(error) => {
                tracing::warn!(%error, "push could not be encoded; dropped");
                None
            }
        }
    }

    /// The push in this frame.
    pub fn decode(&self) -> Option<Push> {
        decode_push(&self.0)
    }
}

impl std::fmt::Debug for PushFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushFrame")
            .field("len", &self.0.len())
            .finish_non_exhaustive()
    }
}

/// Queues pushes for one connection; cheap to clone.
///
/// The queue is bounded ([`crate::limits::PUSH_QUEUE`]): a push into a full
/// queue disconnects the client ([`CloseReason::TooSlow`]) instead of letting
/// the server's memory grow.
///
/// Pushes are queued as their encoded frames, made by whoever pushes: the
/// connection's writer hands them to QUIC as they are, so an envelope's body
/// is copied once between the sender's frame and the recipient's stream.
/// A frame is a boxed slice, 16 bytes a slot: tokio's bounded channel
/// allocates its slots 32 at a time on creation, so a slot of a bare `Push`
/// (112 bytes) would cost every idle connection about 3.5 KB
/// (docs/benchmarks.md §2).
#[derive(Clone, Debug)]
pub struct PushSender {
    tx: mpsc::Sender<Box<[u8]>>,
    close: Arc<CloseSignal>,
}

impl PushSender {
    /// A push queue of `capacity` pushes and its receiving end (for the
    /// connection's writer, or a service test). A zero capacity is taken
    /// as one.
    pub fn channel(capacity: usize) -> (Self, PushQueue) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let close = Arc::new(CloseSignal::default());
        (
            Self {
                tx,
                close: Arc::clone(&close),
            },
            PushQueue { rx, close },
        )
    }

    /// Queues `push` without waiting.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] if the queue is full (the connection is then
    /// closed with [`CloseReason::TooSlow`]); [`PushError::Closed`] if the
    /// connection has ended; [`PushError::Encode`] if it does not fit in
    /// a frame.
    pub fn push(&self, push: Push) -> Result<(), PushError> {
        self.push_frame(PushFrame::new(push).ok_or(PushError::Encode)?)
    }

    /// Queues a push already framed (e.g. with [`PushFrame::envelope`],
    /// outside a lock).
    ///
    /// # Errors
    ///
    /// As [`PushSender::push`], but for `Encode`.
    pub fn push_frame(&self, frame: PushFrame) -> Result<(), PushError> {
        match self.tx.try_send(frame.0) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close.request(CloseReason::TooSlow);
                Err(PushError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PushError::Closed),
        }
    }

    /// Closes the connection with `reason` once the pushes already queued
    /// are written, e.g. [`CloseReason::Replaced`] after a
    /// [`Push::Replaced`]. The first reason asked for wins.
    pub fn disconnect(&self, reason: CloseReason) {
        self.close.request(reason);
    }

    /// Whether the connection has ended (its queue is gone).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The receiving end of a [`PushSender`].
#[derive(Debug)]
pub struct PushQueue {
    rx: mpsc::Receiver<Box<[u8]>>,
    close: Arc<CloseSignal>,
}

impl PushQueue {
    /// The next push, waiting for one, decoded from its frame; `None` once
    /// every sender is gone.
    pub async fn recv(&mut self) -> Option<Push> {
        loop {
            let frame = self.rx.recv().await?;
            if let Some(push) = decode_push(&frame) {
                return Some(push);
            }
        }
    }

    /// The next push if one is queued, decoded from its frame.
    pub fn try_recv(&mut self) -> Option<Push> {
        loop {
            let frame = self.rx.try_recv().ok()?;
            if let Some(push) = decode_push(&frame) {
                return Some(push);
            }
        }
    }

    /// The next push's frame (length prefix and body) if one is queued;
    /// otherwise `cx` is woken when one is, or when every sender is gone
    /// (then `None`).
    pub(crate) fn poll_recv_frame(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Box<[u8]>>> {
        self.rx.poll_recv(cx)
    }

    /// How many pushes are queued.
    pub(crate) fn len(&self) -> usize {
        self.rx.len()
    }

    /// Refuses further pushes ([`PushError::Closed`]) and drops those
    /// queued.
    pub(crate) fn close(&mut self) {
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
    }

    /// The next push's frame if one is queued.
    pub(crate) fn try_recv_frame(&mut self) -> Option<Box<[u8]>> {
        self.rx.try_recv().ok()
    }

    /// Waits until a sender asks to close the connection, and returns why.
    pub async fn close_requested(&self) -> CloseReason {
        self.close.wait().await
    }

    /// The close signal alone, to wait on while receiving.
    pub(crate) fn close_signal(&self) -> Arc<CloseSignal> {
        Arc::clone(&self.close)
    }

    /// Why a sender asked to close the connection, if one has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.reason()
    }
}

/// The push in a frame [`PushSender`] made, which always decodes (checked
/// in debug builds; a frame that did not would be skipped).
fn decode_push(frame: &[u8]) -> Option<Push> {
    let decoded = frame.get(LEN_PREFIX..).map(decode::<ServerFrame>);
    debug_assert!(
        matches!(decoded, Some(Ok(ServerFrame::Push(_)))),
        "a queued push frame did not decode"
    );
    match decoded {
        Some(Ok(ServerFrame::Push(push))) => Some(push),
        _ => None,
    }
}

/// A close reason set once by a [`PushSender`], and a way to wait for it.
#[derive(Debug, Default)]
pub(crate) struct CloseSignal {
    reason: Mutex<Option<CloseReason>>,
    notify: Notify,
}

impl CloseSignal {
    fn request(&self, reason: CloseReason) {
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        self.notify.notify_waiters();
    }

    pub(crate) async fn wait(&self) -> CloseReason {
        loop {
            let notified = self.notify.notified();
            if let Some(reason) = self.reason() {
                return reason;
            }
            notified.await;
        }
    }

    fn reason(&self) -> Option<CloseReason> {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn close_codes_are_unique_and_round_trip() {
        let codes: HashSet<u32> = CloseReason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), CloseReason::ALL.len());
        for &reason in CloseReason::ALL {
            assert_eq!(CloseReason::from_code(reason.code().into()), Some(reason));
            assert!(reason.reason().is_ascii());
        }
        assert_eq!(CloseReason::BadRequest.code(), 100);
        assert_eq!(CloseReason::TooLarge.code(), 102);
        assert_eq!(CloseReason::from_code(9999), None);
    }

    #[tokio::test]
    async fn an_envelope_pushed_from_its_parts_arrives_as_the_owned_push() {
        let (sender, mut queue) = PushSender::channel(4);
        let owned = messenger_proto::msg::Envelope {
            seq: 7,
            from: "bob".into(),
            from_device: 1,
            group: Some("g".into()),
            id: [3; 16],
            sent_at: 1_700_000_000,
            body: vec![0xAB; 1024],
        };
        let frame = PushFrame::envelope(&EnvelopePush {
            seq: owned.seq,
            from: &owned.from,
            from_device: owned.from_device,
            group: owned.group.as_deref(),
            id: &owned.id,
            sent_at: owned.sent_at,
            body: &owned.body,
        })
        .unwrap();
        assert_eq!(frame.decode(), Some(Push::Envelope(owned.clone())));
        sender.push_frame(frame).unwrap();
        sender.push(Push::Envelope(owned.clone())).unwrap();
        let first = queue.try_recv_frame().unwrap();
        let second = queue.try_recv_frame().unwrap();
        assert_eq!(first, second, "the same frame bytes");
        assert_eq!(decode_push(&first), Some(Push::Envelope(owned)));
    }

    #[tokio::test]
    async fn full_queue_asks_to_close_and_keeps_order() {
        let (sender, mut queue) = PushSender::channel(2);
        sender.push(Push::PrekeysLow { remaining: 1 }).unwrap();
        sender.push(Push::PrekeysLow { remaining: 2 }).unwrap();
        assert_eq!(queue.close_reason(), None);
        assert_eq!(
            sender.push(Push::PrekeysLow { remaining: 3 }),
            Err(PushError::Full)
        );
        assert_eq!(queue.close_requested().await, CloseReason::TooSlow);
        assert_eq!(queue.recv().await, Some(Push::PrekeysLow { remaining: 1 }));
        assert_eq!(queue.try_recv(), Some(Push::PrekeysLow { remaining: 2 }));
        assert_eq!(queue.try_recv(), None);
        // A later reason does not replace the first.
        sender.disconnect(CloseReason::Replaced);
        assert_eq!(queue.close_reason(), Some(CloseReason::TooSlow));
        drop(queue);
        assert_eq!(sender.push(Push::Replaced), Err(PushError::Closed));
        assert!(sender.is_closed());
    }
}

//! The service: each request becomes a reply over the [`Store`], with no
//! sockets. The network layer hands it requests in order per connection and
//! gives it a [`PushTarget`] per connection for what it must tell a client
//! unasked.
//!
//! Envelopes and acks go through a group-commit writer: one OS thread takes
//! every envelope and ack queued while the previous commit ran and commits
//! them in one redb transaction ([`Store::commit_batch`]), so each envelope
//! is answered `Accepted`, and pushed to an online recipient, only after its
//! own durable commit, many share one fsync under load, and an ack is
//! applied after every envelope queued before it.
//!
//! Live delivery: a 1:1 envelope for a recipient who is online is pushed at
//! once under a delivery id with [`LIVE_SEQ_BIT`] set, and its sender is
//! answered `Accepted` when the recipient acknowledges that id (a client
//! acknowledges only after storing the message itself), without the server
//! ever writing it. If no acknowledgement comes within
//! [`ServiceConfig::live_grace`], or the recipient's connection goes, the
//! envelope is stored like any other before the sender is answered, and a
//! later acknowledgement of the delivery id deletes the stored copy. Either
//! way `Accepted` means someone durably holds the message: the recipient, or
//! the server's mailbox (docs/protocol.md, "Delivery").

use std::collections::{BTreeSet, HashMap};
use std::future::{Future, ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::Duration;

use messenger_crypto::identity::{
    IdentityKey, PublicIdentity, SigningContext, Username, verify_login,
};
use messenger_crypto::prekey::{OneTimePrekey, SignedPrekey};
use messenger_crypto::secret::Secret32;
use messenger_proto::ErrorCode;
use messenger_proto::msg::{
    DEFAULT_DEVICE, Envelope, EnvelopePush, LOBBY, MAX_ACKS, MAX_ANNOUNCEMENT_LEN, MAX_BODY_LEN,
    MAX_GROUP_MEMBERS, MAX_PREKEYS_PER_UPLOAD, MAX_PULL, MessageId, OutgoingEnvelope, Push,
    Register, Reply, Request, SignedAnnouncement, SignedRoster, UserInfo,
    announcement_signed_bytes, roster_signed_bytes,
};
use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::handler::PushFrame;
use crate::invite::{check_reset_token, check_token};
use crate::rate::{Buckets, Rate, SharedBucket};
use crate::store::{
    AccountRecord, AnnouncementRecord, AppendOutcome, EnvelopeRecord, FriendNotice,
    FriendRequestOutcome, GroupRecord, NewEnvelope, Store, StoreError,
};

/// Below this many one-time prekeys the owner is told to upload more.
pub const PREKEY_LOW_WATER: u32 = 20;
/// Bytes of envelopes (bodies plus a generous per-envelope allowance for
/// routing fields) one reply may carry: the frame limit less 8 KiB of headroom,
/// so a `Pull` or `Users` reply always encodes into one frame.
pub const REPLY_BUDGET: usize = messenger_proto::MAX_FRAME_LEN - 8 * 1024;
/// Allowance per envelope or user for fields besides the body.
const ITEM_OVERHEAD: usize = 128;
/// Users one `Users` reply lists at most: 1,000, about 170 KiB with the
/// longest names and 129-byte identities, within [`REPLY_BUDGET`]; the
/// client asks for the next page after the last name.
pub const USERS_PAGE: usize = 1_000;
/// Bytes a listed user takes besides its name and identity: the two
/// length prefixes and the online flag (4), rounded up.
const USER_OVERHEAD: usize = 8;
// A full page of the longest names fits the budget, so only a page's count
// ends it (the budget check stays as a guard).
const _: () = assert!(
    USERS_PAGE
        * (messenger_crypto::identity::MAX_USERNAME_LEN
            + messenger_crypto::identity::PUBLIC_IDENTITY_LEN
            + USER_OVERHEAD)
        <= REPLY_BUDGET
);

/// Set in the delivery id of an envelope pushed live, before it was stored
/// (mailbox seqs count up from 1 and never reach it).
pub const LIVE_SEQ_BIT: u64 = 1 << 63;

/// Most envelopes (plus acknowledged seqs) one group commit holds: large
/// enough to amortise an fsync over many senders, small enough to bound
/// how long one commit holds the writer.
pub const MAX_COMMIT_BATCH: usize = 1000;

/// Who may register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Anyone.
    Open,
    /// Only with a one-time token from `rendezvous invite`.
    Invite,
}

/// Whom the `users` request lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsersPolicy {
    /// Every online user (the default, like the old systems).
    Everyone,
    /// Only online friends.
    FriendsOnly,
}

/// Service settings. Every limit has a default with a reason.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Who may register.
    pub registration: Registration,
    /// Whom `users` lists.
    pub users_policy: UsersPolicy,
    /// Envelope sends per user: 50/s sustained, bursts of 200 — far above a
    /// person typing, low enough that one account cannot fill mailboxes fast.
    pub send_rate: Rate,
    /// Bundle fetches per requester: 30 per minute, bursts of 10. Each fetch
    /// consumes someone's one-time prekey, so this is what stops draining
    /// (X3DH §4.7).
    pub bundle_rate: Rate,
    /// Other requests per user: 100/s, bursts of 200.
    pub request_rate: Rate,
    /// Key that checks invitation tokens (`--registration invite`).
    pub invite_key: Option<Secret32>,
    /// How long a live-delivered envelope waits for the recipient's
    /// acknowledgement before it is stored instead: 1 s. Far above a
    /// client's store-then-ack round trip (milliseconds on a LAN, about
    /// 100-200 ms at the benchmark's saturation), short enough that a
    /// sender whose recipient stopped reading is answered soon.
    pub live_grace: Duration,
    /// Live deliveries one recipient may have unacknowledged at once: 256.
    /// Beyond it envelopes take the stored path; it bounds what a client
    /// that never acknowledges can make the server remember.
    pub live_window: usize,
    /// Users one `UsersAfter` page lists at most: [`USERS_PAGE`], which is
    /// also the most it may be (a larger value is taken as it), so that a
    /// page always fits one frame. Smaller values serve tests.
    pub users_page: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            registration: Registration::Open,
            users_policy: UsersPolicy::Everyone,
            send_rate: Rate::per(50, Duration::from_secs(1), 200),
            bundle_rate: Rate::per(30, Duration::from_secs(60), 10),
            request_rate: Rate::per(100, Duration::from_secs(1), 200),
            invite_key: None,
            live_grace: Duration::from_secs(1),
            live_window: 256,
            users_page: USERS_PAGE,
        }
    }
}

/// Where the service sends pushes for one connection.
pub trait PushTarget: Clone + Send + Sync + 'static {
    /// Queues a push; false when the connection is gone or cannot keep up.
    /// Must not wait: the service calls it while holding its map of who
    /// is online.
    fn push(&self, push: Push) -> bool;
    /// Queues a push already framed ([`PushFrame`]); the default decodes it
    /// and calls [`push`](PushTarget::push) (for targets that keep pushes
    /// as values, e.g. in tests).
    fn push_frame(&self, frame: PushFrame) -> bool {
        frame.decode().is_some_and(|push| self.push(push))
    }
    /// Closes the connection (another login replaced it).
    fn close(&self, reason: &'static str);
}

/// A clock in milliseconds since the Unix epoch; injectable for tests.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    })
}

/// Per-connection state the service keeps.
#[derive(Debug)]
pub struct Session<P> {
    conn: u64,
    nonce: [u8; 32],
    exporter: [u8; 32],
    push: P,
    user: Option<String>,
    /// The logged-in user's request and send buckets, taken from the
    /// service's maps at the first request after login, so that later
    /// requests do not look them up.
    buckets: Option<Box<UserBuckets>>,
    /// Whether this connection's `Ack`s of live delivery ids still take no
    /// token of the request rate ([`Service::rate_exempt`]). Cleared for
    /// good once such an `Ack` names an id that was not outstanding: a
    /// client that does so cannot make the server look ids up for free.
    live_acks_exempt: bool,
}

/// A logged-in user's per-user rate buckets (shared by their connections).
#[derive(Debug)]
struct UserBuckets {
    request: SharedBucket,
    send: SharedBucket,
}

impl<P> Session<P> {
    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

struct Online<P> {
    conn: u64,
    push: P,
    identity: Vec<u8>,
    /// Envelopes pushed live to this connection and not yet acknowledged,
    /// by delivery id. Dropped with the connection, which sends every
    /// waiting sender to the stored path.
    ///
    /// Hashed with FxHash, cheaper per message than SipHash: only the
    /// server's own counter puts keys in (at most `live_window` of them), so
    /// a client cannot fill it with colliding keys; its acks only look up.
    live: FxHashMap<u64, Live>,
}

/// A live delivery the recipient has not acknowledged yet.
enum Live {
    /// Pushed; the sender's reply waits for the acknowledgement.
    Waiting(oneshot::Sender<()>),
    /// The grace ran out and the envelope is being stored; `acked` when the
    /// recipient acknowledged it meanwhile (the stored copy is then deleted
    /// at once).
    Storing { acked: bool },
    /// Stored under this mailbox seq, which the recipient's acknowledgement
    /// of the delivery id deletes.
    Stored(u64),
}

/// Removes a live delivery still `Waiting` or `Storing` from its
/// recipient's window when dropped: [`Service::finish_live`] holds one
/// while it settles the delivery, and settles it (acknowledged, stored,
/// failed) before returning, so only a dropped future leaves one behind.
struct ForgetUnsettled<'a, P> {
    online: &'a Mutex<HashMap<String, Online<P>>>,
    recipient: &'a str,
    id: u64,
}

impl<P> Drop for ForgetUnsettled<'_, P> {
    fn drop(&mut self) {
        let mut online = lock(self.online);
        if let Some(o) = online.get_mut(self.recipient)
            && matches!(
                o.live.get(&self.id),
                Some(Live::Waiting(_) | Live::Storing { .. })
            )
        {
            o.live.remove(&self.id);
        }
    }
}

/// Work for the group-commit writer, committed in queue order.
enum CommitJob {
    /// Envelopes to store; the writer sends them back with their outcomes,
    /// so their bodies can be pushed without a copy.
    Append(Vec<NewEnvelope>, oneshot::Sender<Appended>),
    /// A recipient's acknowledgement: (recipient, seqs); the writer answers
    /// with the number removed.
    Ack(String, Vec<u64>, oneshot::Sender<Result<u32, StoreError>>),
}

/// A committed append job: its envelopes and one outcome per envelope.
type Appended = (Vec<NewEnvelope>, Vec<Result<AppendOutcome, StoreError>>);

/// Where a queued append job's outcomes arrive.
type CommitReceiver = oneshot::Receiver<Appended>;

/// A `Send` on its way.
enum QueuedSend {
    /// Its envelope is queued for the group commit.
    Stored(CommitReceiver),
    /// Pushed live under `id`; `acked` fires when the recipient
    /// acknowledges it, or the envelope takes the stored path at `deadline`
    /// (the push plus the grace: fixed here, because the network layer
    /// first polls a pipelined reply only once the replies before it are
    /// out). The envelope is kept for the stored path.
    Live {
        id: u64,
        acked: oneshot::Receiver<()>,
        deadline: tokio::time::Instant,
        envelope: NewEnvelope,
    },
}

/// Where a queued `Ack`'s outcome arrives (the number of envelopes removed).
type AckReceiver = oneshot::Receiver<Result<u32, StoreError>>;

/// The rest of a pipelined request's work, yielding its reply
/// ([`Service::begin`]).
pub type ReplyFuture = Pin<Box<dyn Future<Output = Result<Reply, ErrorCode>> + Send + 'static>>;

/// The service. Cheap to share: hold it in an `Arc`.
pub struct Service<P: PushTarget> {
    store: Store,
    config: ServiceConfig,
    server_key: Option<IdentityKey>,
    clock: Clock,
    online: Mutex<HashMap<String, Online<P>>>,
    send_buckets: Mutex<Buckets>,
    bundle_buckets: Mutex<Buckets>,
    request_buckets: Mutex<Buckets>,
    commits: mpsc::SyncSender<CommitJob>,
    /// The next live delivery id (without [`LIVE_SEQ_BIT`]).
    next_live: AtomicU64,
}

impl<P: PushTarget> std::fmt::Debug for Service<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn name(raw: &str) -> Result<String, ErrorCode> {
    Username::parse(raw)
        .map(Username::into_string)
        .map_err(|_| ErrorCode::BadRequest)
}

fn store_error(e: StoreError) -> ErrorCode {
    match e {
        StoreError::UserExists => ErrorCode::UserExists,
        StoreError::UnknownUser => ErrorCode::UserNotExist,
        StoreError::QuotaExceeded { .. } | StoreError::TooManyPrekeys { .. } => {
            ErrorCode::QuotaExceeded
        }
        StoreError::GroupExists => ErrorCode::GroupExist,
        StoreError::UnknownGroup => ErrorCode::GroupNotExist,
        StoreError::VersionConflict { .. } | StoreError::NoSuchRequest => ErrorCode::NotPermitted,
        StoreError::NotFriends => ErrorCode::NotFriend,
        StoreError::SelfFriend | StoreError::PrekeyIdReused(_) => ErrorCode::BadRequest,
        StoreError::StorageFull { .. } => ErrorCode::StorageFull,
        other => {
            tracing::error!(error = %other, "storage failure");
            ErrorCode::Internal
        }
    }
}

/// Runs a blocking store call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ErrorCode> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(store_error),
        Err(_) => Err(ErrorCode::Internal),
    }
}

/// The push that tells a user `notice` from `from`.
fn notice_push(from: &str, notice: FriendNotice) -> Push {
    let from = from.to_owned();
    match notice {
        FriendNotice::Accepted => Push::FriendAnswer {
            from,
            accepted: true,
        },
        FriendNotice::Declined => Push::FriendAnswer {
            from,
            accepted: false,
        },
        FriendNotice::Removed => Push::FriendRemoved { from },
    }
}

fn to_envelope(r: EnvelopeRecord) -> Envelope {
    Envelope {
        seq: r.seq,
        from: r.sender,
        from_device: DEFAULT_DEVICE,
        group: r.group,
        id: r.message_id,
        sent_at: r.sent_at,
        body: r.body,
    }
}

/// The group-commit writer: takes every job queued while the previous
/// commit ran (up to [`MAX_COMMIT_BATCH`] envelopes and acked seqs) and
/// commits them in one transaction, appends first, then acks (an ack can
/// only name envelopes queued before it).
fn commit_loop(store: Store, jobs: mpsc::Receiver<CommitJob>) {
    let mut appends: Vec<NewEnvelope> = Vec::new();
    let mut append_replies: Vec<(usize, oneshot::Sender<Appended>)> = Vec::new();
    let mut acks: Vec<(String, Vec<u64>)> = Vec::new();
    let mut ack_replies: Vec<oneshot::Sender<Result<u32, StoreError>>> = Vec::new();
    while let Ok(first) = jobs.recv() {
        let mut next = Some(first);
        let mut count = 0usize;
        while let Some(job) = next.take() {
            match job {
                CommitJob::Append(envelopes, reply) => {
                    count += envelopes.len();
                    append_replies.push((envelopes.len(), reply));
                    appends.extend(envelopes);
                }
                CommitJob::Ack(recipient, seqs, reply) => {
                    count += seqs.len().max(1);
                    acks.push((recipient, seqs));
                    ack_replies.push(reply);
                }
            }
            if count < MAX_COMMIT_BATCH {
                next = jobs.try_recv().ok();
            }
        }
        let outcome = store.commit_batch(&appends, &acks);
        acks.clear();
        let mut envelopes = appends.drain(..);
        match outcome {
            Ok(outcome) => {
                let mut appended = outcome.appended.into_iter();
                for (size, reply) in append_replies.drain(..) {
                    let mine: Vec<NewEnvelope> = envelopes.by_ref().take(size).collect();
                    let results: Vec<_> = appended.by_ref().take(size).collect();
                    // The sender may have gone; its envelopes are stored regardless.
                    let _ = reply.send((mine, results));
                }
                for (removed, reply) in outcome.acked.into_iter().zip(ack_replies.drain(..)) {
                    let _ = reply.send(Ok(removed));
                }
            }
            Err(e) => {
                for (size, reply) in append_replies.drain(..) {
                    let mine: Vec<NewEnvelope> = envelopes.by_ref().take(size).collect();
                    let results = mine.iter().map(|_| Err(e.clone())).collect();
                    let _ = reply.send((mine, results));
                }
                for reply in ack_replies.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        drop(envelopes);
    }
}

impl<P: PushTarget> Service<P> {
    /// A service over `store`. `server_key` is the Ed25519 key that signs
    /// announcements (None: announcements are refused).
    pub fn new(
        store: Store,
        config: ServiceConfig,
        server_key: Option<[u8; 32]>,
        clock: Clock,
    ) -> Self {
        let (tx, rx) = mpsc::sync_channel::<CommitJob>(4 * MAX_COMMIT_BATCH);
        let writer_store = store.clone();
        // The writer ends when the service (the only sender) is dropped.
        let spawned = thread::Builder::new()
            .name("group-commit".into())
            .spawn(move || commit_loop(writer_store, rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the group-commit writer");
        }
        let server_key = server_key.and_then(|k| IdentityKey::from_bytes(&k).ok());
        Self {
            send_buckets: Mutex::new(Buckets::new(config.send_rate)),
            bundle_buckets: Mutex::new(Buckets::new(config.bundle_rate)),
            request_buckets: Mutex::new(Buckets::new(config.request_rate)),
            store,
            config,
            server_key,
            clock,
            online: Mutex::new(HashMap::new()),
            commits: tx,
            next_live: AtomicU64::new(1),
        }
    }

    /// The store underneath (for operator tools and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// State for a new connection.
    pub fn connect(&self, conn: u64, nonce: [u8; 32], exporter: [u8; 32], push: P) -> Session<P> {
        Session {
            conn,
            nonce,
            exporter,
            push,
            user: None,
            buckets: None,
            live_acks_exempt: true,
        }
    }

    /// A connection closed: the user goes offline (if this connection was
    /// theirs) and friends are told.
    pub fn disconnect(&self, session: &Session<P>) {
        let Some(user) = session.user.clone() else {
            return;
        };
        let removed = {
            let mut online = lock(&self.online);
            match online.get(&user) {
                Some(o) if o.conn == session.conn => online.remove(&user),
                _ => None,
            }
        };
        if let Some(o) = removed {
            tracing::info!(user = %user, "offline");
            self.tell_friends(&user, false, o.identity);
        }
    }

    /// Names of online users.
    pub fn online_users(&self) -> Vec<String> {
        lock(&self.online).keys().cloned().collect()
    }

    fn now_ms(&self) -> u64 {
        (self.clock)()
    }

    fn now(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// [`Service::push_to`] for an envelope given by its parts, framed
    /// before the lock is taken.
    fn push_envelope_to(&self, user: &str, envelope: EnvelopePush<'_>) -> bool {
        let Some(frame) = PushFrame::envelope(&envelope) else {
            return false;
        };
        lock(&self.online)
            .get(user)
            .is_some_and(|o| o.push.push_frame(frame))
    }

    fn push_to(&self, user: &str, push: Push) -> bool {
        // Pushing only queues (never waits), so it is done under the lock:
        // cheaper than cloning the target out per message.
        lock(&self.online)
            .get(user)
            .is_some_and(|o| o.push.push(push))
    }

    fn is_online(&self, user: &str) -> bool {
        lock(&self.online).contains_key(user)
    }

    fn tell_friends(&self, user: &str, online: bool, identity: Vec<u8>) {
        let store = self.store.clone();
        let Ok(friends) = store.friends(user) else {
            return;
        };
        for f in friends {
            self.push_to(
                &f,
                Push::Presence {
                    username: user.to_owned(),
                    online,
                    identity: identity.clone(),
                },
            );
        }
    }

    /// Takes one token of the per-user (or, before login, per-connection)
    /// request rate.
    fn take_request_token(&self, s: &mut Session<P>) -> Result<(), ErrorCode> {
        let now = self.now_ms();
        // The user's buckets are taken at their first request after login,
        // not at login: a connection that only waits for pushes holds none.
        if s.buckets.is_none()
            && let Some(user) = &s.user
        {
            s.buckets = Some(Box::new(UserBuckets {
                request: lock(&self.request_buckets).shared(user, now),
                send: lock(&self.send_buckets).shared(user, now),
            }));
        }
        // Without buckets, nobody has logged in on this connection yet.
        let taken = match &s.buckets {
            Some(buckets) => buckets.request.take(now),
            None => lock(&self.request_buckets).take(&format!("conn:{}", s.conn), now),
        };
        if taken {
            Ok(())
        } else {
            Err(ErrorCode::RateLimited)
        }
    }

    /// Answers one request.
    pub async fn handle(&self, s: &mut Session<P>, request: Request) -> Result<Reply, ErrorCode> {
        if let Request::Ack { seqs } = request {
            return match self.start_ack(s, seqs).await {
                Ok(acked) => Self::finish_ack(acked).await,
                Err(done) => done,
            };
        }
        self.take_request_token(s)?;
        match request {
            Request::Register(r) => self.register(r).await,
            Request::Login(l) => self.login(s, &l.username, &l.signature).await,
            Request::Announce(a) => self.announce(a).await,
            other => {
                let Some(user) = s.user.clone() else {
                    return Err(ErrorCode::NotAuthenticated);
                };
                self.authenticated(&user, other).await
            }
        }
    }

    async fn authenticated(&self, me: &str, request: Request) -> Result<Reply, ErrorCode> {
        match request {
            Request::FetchBundle { username } => self.fetch_bundle(me, &username).await,
            Request::PrekeyStatus => {
                let me = me.to_owned();
                let store = self.store.clone();
                let remaining = blocking(move || store.one_time_prekey_count(&me)).await?;
                Ok(Reply::PrekeyStatus {
                    remaining,
                    low: remaining < PREKEY_LOW_WATER,
                })
            }
            Request::UploadPrekeys { one_time_prekeys } => {
                self.upload_prekeys(me, one_time_prekeys).await
            }
            Request::RotateSignedPrekey { signed_prekey } => {
                self.rotate_signed_prekey(me, signed_prekey).await
            }
            Request::Send(envelope) => self.send(me, envelope).await,
            Request::GroupSend { group, id, body } => self.group_send(me, &group, id, body).await,
            Request::Pull { after, max } => {
                let max = max.clamp(1, MAX_PULL) as usize;
                let me = me.to_owned();
                let store = self.store.clone();
                let records = blocking(move || store.pending(&me, after, max + 1)).await?;
                let mut more = records.len() > max;
                let mut budget = REPLY_BUDGET;
                let mut envelopes = Vec::with_capacity(records.len().min(max));
                for r in records.into_iter().take(max) {
                    let cost = r.body.len()
                        + r.sender.len()
                        + r.group.as_ref().map_or(0, String::len)
                        + ITEM_OVERHEAD;
                    // The first always fits: a body is at most MAX_BODY_LEN.
                    if !envelopes.is_empty() && cost > budget {
                        more = true;
                        break;
                    }
                    budget = budget.saturating_sub(cost);
                    envelopes.push(to_envelope(r));
                }
                Ok(Reply::Envelopes { envelopes, more })
            }
            Request::Users => {
                // The first page, as protocol v1 first had it.
                let (users, _) = self.users(me, None).await?;
                Ok(Reply::Users { users })
            }
            Request::UsersAfter { after } => {
                let (users, more) = self.users(me, after.as_deref()).await?;
                Ok(Reply::UsersPage { users, more })
            }
            Request::Lookup { username } => self.lookup(me, &username).await,
            Request::FriendRequest { username } => self.friend_request(me, &username).await,
            Request::FriendAccept { username } => self.friend_answer(me, &username, true).await,
            Request::FriendDecline { username } => self.friend_answer(me, &username, false).await,
            Request::FriendRemove { username } => {
                let them = name(&username)?;
                let (a, b) = (me.to_owned(), them.clone());
                let store = self.store.clone();
                let number = blocking(move || store.friend_remove(&a, &b)).await?;
                self.tell_notice(&them, me, FriendNotice::Removed, number)
                    .await;
                Ok(Reply::Ok)
            }
            Request::FriendList => self.friend_list(me).await,
            Request::GroupCreate(roster) => self.group_create(me, roster).await,
            Request::GroupJoin { group } => self.group_join(me, &group).await,
            Request::GroupUpdate(roster) => self.group_update(me, roster).await,
            Request::GroupLeave { group } => self.group_leave(me, &group).await,
            Request::GroupMembers { group } => {
                let record = self.group_record(&group).await?;
                if group != LOBBY && !record.members.iter().any(|m| m == me) {
                    return Err(ErrorCode::NotInGroup);
                }
                Ok(Reply::Roster(roster_of(&record)))
            }
            Request::MyGroups => {
                let me = me.to_owned();
                let store = self.store.clone();
                let mut groups = blocking(move || store.groups_of(&me)).await?;
                groups.sort();
                Ok(Reply::Groups { groups })
            }
            // Register, Login, Announce and Ack are answered before this
            // point; on a logged-in connection the first three, and unknown
            // requests, are out of place.
            _ => Err(ErrorCode::BadRequest),
        }
    }

    async fn register(&self, r: Register) -> Result<Reply, ErrorCode> {
        let username = name(&r.username)?;
        let identity = PublicIdentity::from_bytes(&r.identity).map_err(key_error)?;
        strong_key(identity.dh_key())?;
        let spk = SignedPrekey::from_bytes(&r.signed_prekey).map_err(key_error)?;
        strong_key(spk.key())?;
        spk.verify(identity.identity_key()).map_err(key_error)?;
        if r.one_time_prekeys.len() > MAX_PREKEYS_PER_UPLOAD {
            return Err(ErrorCode::TooLarge);
        }
        let opks = parse_prekeys(&r.one_time_prekeys)?;
        // A reset token for this name replaces an existing account's keys.
        if let (Some(token), Some(key)) = (r.invite.as_deref(), self.config.invite_key.as_ref())
            && let Some(id) = check_reset_token(key, token, &username)
        {
            let id_hash: [u8; 32] = Sha256::digest(id).into();
            let store = self.store.clone();
            let now = self.now();
            let record = AccountRecord {
                username: username.clone(),
                identity: r.identity,
                signed_prekey: r.signed_prekey,
                registered_at: now,
            };
            let replaced = blocking(move || {
                if !store.redeem_invite(id_hash, now)? {
                    return Ok(false);
                }
                store.replace_account(record, opks).map(|()| true)
            })
            .await?;
            if !replaced {
                return Err(ErrorCode::NotPermitted);
            }
            tracing::info!(user = %username, "account keys reset");
            return Ok(Reply::Ok);
        }
        if self.config.registration == Registration::Invite {
            let (Some(token), Some(key)) = (r.invite.as_deref(), self.config.invite_key.as_ref())
            else {
                return Err(ErrorCode::NotPermitted);
            };
            let id = check_token(key, token).ok_or(ErrorCode::NotPermitted)?;
            let id_hash: [u8; 32] = Sha256::digest(id).into();
            let store = self.store.clone();
            let user = username.clone();
            // Refuse a taken name before spending the invitation.
            if blocking(move || store.account(&user)).await?.is_some() {
                return Err(ErrorCode::UserExists);
            }
            let store = self.store.clone();
            let now = self.now();
            if !blocking(move || store.redeem_invite(id_hash, now)).await? {
                return Err(ErrorCode::NotPermitted);
            }
        }
        let record = AccountRecord {
            username: username.clone(),
            identity: r.identity,
            signed_prekey: r.signed_prekey,
            registered_at: self.now(),
        };
        let store = self.store.clone();
        blocking(move || store.create_account(record, opks)).await?;
        tracing::info!(user = %username, "registered");
        Ok(Reply::Ok)
    }

    async fn login(
        &self,
        s: &mut Session<P>,
        username: &str,
        signature: &[u8],
    ) -> Result<Reply, ErrorCode> {
        if s.user.is_some() {
            // One login per connection: its nonce is spent.
            return Err(ErrorCode::BadRequest);
        }
        let user = name(username)?;
        let store = self.store.clone();
        let lookup = user.clone();
        let account = blocking(move || store.account(&lookup))
            .await?
            .ok_or(ErrorCode::UserNotExist)?;
        let identity =
            PublicIdentity::from_bytes(&account.identity).map_err(|_| ErrorCode::Internal)?;
        let sig: [u8; 64] = signature.try_into().map_err(|_| ErrorCode::BadSignature)?;
        verify_login(identity.identity_key(), &s.nonce, &s.exporter, &sig)
            .map_err(|_| ErrorCode::BadSignature)?;
        // Another user's buckets, should this connection have logged in
        // before, are not this one's.
        s.buckets = None;
        s.user = Some(user.clone());
        let previous = lock(&self.online).insert(
            user.clone(),
            Online {
                conn: s.conn,
                push: s.push.clone(),
                identity: account.identity.clone(),
                live: FxHashMap::default(),
            },
        );
        if let Some(old) = previous {
            old.push.push(Push::Replaced);
            old.push.close("replaced by a new login");
        } else {
            self.tell_friends(&user, true, account.identity.clone());
        }
        tracing::info!(user = %user, "logged in");

        let store = self.store.clone();
        let u = user.clone();
        let (pending, prekeys, incoming, notices, announcements, owned_requests) =
            blocking(move || {
                let (pending, _) = store.mailbox_usage(&u)?;
                let prekeys = store.one_time_prekey_count(&u)?;
                let incoming = store.incoming_requests(&u)?;
                let cursor = store.announcement_cursor(&u)?;
                let announcements = store.announcements_after(cursor)?;
                if let Some(last) = announcements.last() {
                    store.set_announcement_cursor(&u, last.id)?;
                }
                let mut owned = Vec::new();
                for g in store.groups_of(&u)? {
                    if let Some(rec) = store.group(&g)?
                        && rec.owner == u
                    {
                        for who in store.join_requests(&g)? {
                            owned.push((g.clone(), who, true));
                        }
                        for who in store.leave_requests(&g)? {
                            owned.push((g.clone(), who, false));
                        }
                    }
                }
                let notices = store.friend_notices(&u)?;
                Ok((pending, prekeys, incoming, notices, announcements, owned))
            })
            .await?;
        // Notices first, before the pushes that could fill the queue. Each
        // one queued is then forgotten, unless a newer one replaced it
        // meanwhile; one not queued stays for the next login.
        let told: Vec<(String, u64)> = notices
            .into_iter()
            .filter(|n| s.push.push(notice_push(&n.other, n.notice)))
            .map(|n| (n.other, n.number))
            .collect();
        if !told.is_empty() {
            let store = self.store.clone();
            let u = user.clone();
            if let Err(e) = blocking(move || store.forget_friend_notices(&u, &told)).await {
                tracing::warn!(
                    ?e,
                    "friend notices told at login stay kept for the next one"
                );
            }
        }
        for from in incoming {
            s.push.push(Push::FriendRequest { from });
        }
        for a in announcements {
            if let Ok(signed) = postcard::from_bytes::<SignedAnnouncement>(&a.bytes) {
                s.push.push(Push::Announcement(signed));
            }
        }
        for (group, username, join) in owned_requests {
            s.push.push(if join {
                Push::GroupJoinRequest { group, username }
            } else {
                Push::GroupLeaveRequest { group, username }
            });
        }
        if prekeys < PREKEY_LOW_WATER {
            s.push.push(Push::PrekeysLow { remaining: prekeys });
        }
        Ok(Reply::LoggedIn { pending, prekeys })
    }

    async fn fetch_bundle(&self, me: &str, username: &str) -> Result<Reply, ErrorCode> {
        let owner = name(username)?;
        if !lock(&self.bundle_buckets).take(me, self.now_ms()) {
            return Err(ErrorCode::RateLimited);
        }
        let store = self.store.clone();
        let o = owner.clone();
        let (account, opk, remaining) = blocking(move || {
            let Some((account, opk)) = store.take_bundle(&o)? else {
                return Err(StoreError::UnknownUser);
            };
            let remaining = store.one_time_prekey_count(&o)?;
            Ok((account, opk, remaining))
        })
        .await?;
        if opk.is_some() && remaining < PREKEY_LOW_WATER {
            self.push_to(&owner, Push::PrekeysLow { remaining });
        }
        Ok(Reply::Bundle {
            identity: account.identity,
            signed_prekey: account.signed_prekey,
            one_time_prekey: opk.map(|(_, bytes)| bytes),
        })
    }

    async fn upload_prekeys(&self, me: &str, raw: Vec<Vec<u8>>) -> Result<Reply, ErrorCode> {
        if raw.len() > MAX_PREKEYS_PER_UPLOAD {
            return Err(ErrorCode::TooLarge);
        }
        let opks = parse_prekeys(&raw)?;
        let store = self.store.clone();
        let me = me.to_owned();
        let remaining = blocking(move || store.add_one_time_prekeys(&me, opks)).await?;
        Ok(Reply::PrekeyStatus {
            remaining,
            low: remaining < PREKEY_LOW_WATER,
        })
    }

    async fn rotate_signed_prekey(&self, me: &str, raw: Vec<u8>) -> Result<Reply, ErrorCode> {
        let identity = self.identity_of(me).await?;
        let spk = SignedPrekey::from_bytes(&raw).map_err(key_error)?;
        strong_key(spk.key())?;
        spk.verify(identity.identity_key()).map_err(key_error)?;
        let store = self.store.clone();
        let me = me.to_owned();
        blocking(move || store.set_signed_prekey(&me, &raw)).await?;
        Ok(Reply::Ok)
    }

    async fn identity_of(&self, user: &str) -> Result<PublicIdentity, ErrorCode> {
        let store = self.store.clone();
        let u = user.to_owned();
        let account = blocking(move || store.account(&u))
            .await?
            .ok_or(ErrorCode::UserNotExist)?;
        PublicIdentity::from_bytes(&account.identity).map_err(|_| ErrorCode::Internal)
    }

    async fn commit(&self, envelopes: Vec<NewEnvelope>) -> Result<Appended, ErrorCode> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(CommitJob::Append(envelopes, tx)).await?;
        rx.await.map_err(|_| ErrorCode::Internal)
    }

    /// Queues `job` for the group commit. Jobs are committed in the order
    /// they are queued, so a caller that queues in request order gets
    /// sequence numbers in request order, and an ack is applied after every
    /// append queued before it.
    async fn enqueue(&self, job: CommitJob) -> Result<(), ErrorCode> {
        // Enqueue without leaving the async worker when there is room (the
        // common case); a blocking-pool hop per envelope cost more CPU than
        // the commit itself on a loaded 2-core box (docs/benchmarks.md).
        match self.commits.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(job)) => {
                let commits = self.commits.clone();
                // The queue is bounded; waiting for room is the backpressure
                // senders feel.
                tokio::task::spawn_blocking(move || commits.send(job))
                    .await
                    .map_err(|_| ErrorCode::Internal)?
                    .map_err(|_| ErrorCode::Internal)
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(ErrorCode::Internal),
        }
    }

    /// Queues `me`'s `Ack` of `seqs` for the group commit; the returned
    /// receiver yields `Ok` once it is committed (relaxed: see
    /// [`Store::ack`]), `None` when there is nothing to commit (only live
    /// delivery ids, settled at once). Also says whether every live delivery
    /// id among them was outstanding.
    async fn queue_ack(
        &self,
        me: &str,
        seqs: Vec<u64>,
    ) -> Result<(Option<AckReceiver>, bool), ErrorCode> {
        if seqs.len() > MAX_ACKS {
            return Err(ErrorCode::TooLarge);
        }
        let live = seqs.iter().filter(|seq| is_live(**seq)).count();
        let (seqs, all_outstanding) = if live == 0 {
            (seqs, true)
        } else {
            // Those of the live ids already stored are deleted by their seq.
            let (mut stored, unknown) = self.ack_live(me, seqs.iter().filter(|seq| is_live(**seq)));
            if live < seqs.len() {
                stored.extend(seqs.iter().filter(|seq| !is_live(**seq)));
            }
            (stored, unknown == 0)
        };
        if seqs.is_empty() {
            return Ok((None, all_outstanding));
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(CommitJob::Ack(me.to_owned(), seqs, tx))
            .await?;
        Ok((Some(rx), all_outstanding))
    }

    /// Applies `me`'s acknowledgements of live delivery ids: a waiting
    /// sender is answered, one being stored is marked, and the mailbox seqs
    /// of those already stored are returned for deletion. Ids `me` was not
    /// given (or no longer waiting) are ignored, like unknown seqs; how
    /// many there were is returned with the mailbox seqs.
    fn ack_live<'a>(&self, me: &str, ids: impl Iterator<Item = &'a u64>) -> (Vec<u64>, usize) {
        let mut stored = Vec::new();
        let mut unknown = 0;
        let mut online = lock(&self.online);
        let Some(o) = online.get_mut(me) else {
            return (stored, ids.count());
        };
        for id in ids {
            match o.live.get_mut(id) {
                Some(Live::Storing { acked }) => *acked = true,
                Some(Live::Stored(seq)) => {
                    stored.push(*seq);
                    o.live.remove(id);
                }
                Some(Live::Waiting(_)) => {
                    if let Some(Live::Waiting(waiting)) = o.live.remove(id) {
                        // The sender may have gone; the recipient has it.
                        let _ = waiting.send(());
                    }
                }
                None => unknown += 1,
            }
        }
        (stored, unknown)
    }

    async fn finish_ack(acked: Option<AckReceiver>) -> Result<Reply, ErrorCode> {
        if let Some(acked) = acked {
            acked
                .await
                .map_err(|_| ErrorCode::Internal)?
                .map_err(store_error)?;
        }
        Ok(Reply::Ok)
    }

    /// Whether `request` may be pipelined with [`Service::begin`]: a
    /// `Send` or an `Ack`, whose work after queuing is waiting for the
    /// group commit.
    pub fn pipelines(request: &Request) -> bool {
        matches!(request, Request::Send(_) | Request::Ack { .. })
    }

    /// Whether `request` may be exempt from the request rate
    /// ([`crate::handler::Handler::rate_exempt`]): an `Ack` of live
    /// delivery ids only. It settles deliveries the server pushed to this
    /// connection, in memory (at most [`MAX_ACKS`] lookups), and answers
    /// the senders waiting for it. Refused, a notification would be lost
    /// without a word: each of those senders would wait the whole grace
    /// and its envelope would be stored and delivered a second time, more
    /// work for everyone than the `Ack` itself. An `Ack` naming a mailbox
    /// seq (a delete in the group commit) still takes its token, and so
    /// does every `Ack` of a connection once one of its exempt `Ack`s named
    /// a live id that was not outstanding (the per-user rate then applies;
    /// the network layer's per-connection rate never counts these).
    pub fn rate_exempt(request: &Request) -> bool {
        matches!(request, Request::Ack { seqs } if acks_live_only(seqs))
    }

    /// Whether `request` may be begun ahead of this connection's earlier
    /// pipelined requests while they wait for room (the network layer's
    /// read-ahead, [`crate::handler::Handler::begins_ahead`]): an `Ack`.
    /// It only settles live deliveries to, and deletes envelopes of, its
    /// own user, and names only seqs the client was already given, so
    /// none made by this connection's sends not yet begun; its effect is
    /// the one it has in order. Begun early, it answers senders on other
    /// connections that wait for it, which may be the very replies this
    /// connection's full pipeline waits for.
    pub fn begins_ahead(request: &Request) -> bool {
        matches!(request, Request::Ack { .. })
    }

    /// Starts `request` for a pipelined connection: the checks, the rate
    /// limits and queuing into the group commit (a `Send`'s envelope, an
    /// `Ack`'s deletions) happen now, in the caller's order; the returned
    /// future waits for the commit and yields the reply (`Accepted` only
    /// once the envelope is durable). Any other request is handled in full
    /// now.
    pub async fn begin(self: &Arc<Self>, s: &mut Session<P>, request: Request) -> ReplyFuture {
        // Each kind gets its own boxed future, sized for its own wait: the
        // network layer keeps one per pipelined request.
        match request {
            Request::Send(envelope) => match self.start_send(s, envelope).await {
                Ok(QueuedSend::Live {
                    id,
                    acked,
                    deadline,
                    envelope,
                }) => Box::pin(Self::finish_live(
                    Arc::clone(self),
                    id,
                    acked,
                    deadline,
                    envelope,
                )),
                Ok(QueuedSend::Stored(committed)) => {
                    let service = Arc::clone(self);
                    Box::pin(async move { service.finish_stored(committed).await })
                }
                Err(done) => Box::pin(ready(done)),
            },
            Request::Ack { seqs } => match self.start_ack(s, seqs).await {
                Ok(None) => Box::pin(ready(Ok(Reply::Ok))),
                Ok(acked) => Box::pin(Self::finish_ack(acked)),
                Err(done) => Box::pin(ready(done)),
            },
            // Boxed while it runs: the other requests' state (kilobytes)
            // would otherwise be part of this future.
            other => Box::pin(ready(Box::pin(self.handle(s, other)).await)),
        }
    }

    async fn start_send(
        &self,
        s: &mut Session<P>,
        e: OutgoingEnvelope,
    ) -> Result<QueuedSend, Result<Reply, ErrorCode>> {
        self.take_request_token(s).map_err(Err)?;
        let me = s.user.as_deref().ok_or(Err(ErrorCode::NotAuthenticated))?;
        self.queue_send(me, s.buckets.as_ref().map(|b| &b.send), e)
            .await
            .map_err(Err)
    }

    async fn start_ack(
        &self,
        s: &mut Session<P>,
        seqs: Vec<u64>,
    ) -> Result<Option<AckReceiver>, Result<Reply, ErrorCode>> {
        let exempt = s.live_acks_exempt && acks_live_only(&seqs);
        if !exempt {
            self.take_request_token(s).map_err(Err)?;
        }
        let me = s.user.as_deref().ok_or(Err(ErrorCode::NotAuthenticated))?;
        let (acked, all_outstanding) = self.queue_ack(me, seqs).await.map_err(Err)?;
        if exempt && !all_outstanding {
            s.live_acks_exempt = false;
        }
        Ok(acked)
    }

    async fn send(&self, me: &str, e: OutgoingEnvelope) -> Result<Reply, ErrorCode> {
        let queued = self.queue_send(me, None, e).await?;
        self.finish_send(queued).await
    }

    /// A `Send`'s checks, and its envelope queued for the group commit.
    /// `bucket` is `me`'s send bucket if the caller holds it (else it is
    /// looked up).
    async fn queue_send(
        &self,
        me: &str,
        bucket: Option<&SharedBucket>,
        e: OutgoingEnvelope,
    ) -> Result<QueuedSend, ErrorCode> {
        if e.body.len() > MAX_BODY_LEN {
            return Err(ErrorCode::TooLarge);
        }
        if e.to_device != DEFAULT_DEVICE {
            return Err(ErrorCode::BadRequest);
        }
        let to = name(&e.to)?;
        let now = self.now_ms();
        let taken = match bucket {
            Some(bucket) => bucket.take(now),
            None => lock(&self.send_buckets).take(me, now),
        };
        if !taken {
            return Err(ErrorCode::RateLimited);
        }
        // An unknown recipient is refused by the append itself
        // (`StoreError::UnknownUser` inside the same transaction), which
        // saves a read transaction and a blocking-pool hop per envelope.
        let new = NewEnvelope {
            recipient: to,
            sender: me.to_owned(),
            group: None,
            message_id: e.id,
            sent_at: now / 1000,
            body: e.body,
        };
        if let Some((id, acked)) = self.push_live(&new) {
            return Ok(QueuedSend::Live {
                id,
                acked,
                deadline: self.live_deadline(),
                envelope: new,
            });
        }
        let (tx, committed) = oneshot::channel();
        self.enqueue(CommitJob::Append(vec![new], tx)).await?;
        Ok(QueuedSend::Stored(committed))
    }

    /// When a live delivery pushed now takes the stored path unless
    /// acknowledged: now plus the grace (a year if that overflows).
    fn live_deadline(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        now.checked_add(self.config.live_grace)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400))
    }

    /// Pushes `new` to its recipient under a fresh delivery id if they are
    /// online, keep up, and have room in their live window; None otherwise
    /// (the envelope then takes the stored path).
    fn push_live(&self, new: &NewEnvelope) -> Option<(u64, oneshot::Receiver<()>)> {
        let mut online = lock(&self.online);
        let o = online.get_mut(&new.recipient)?;
        if o.live.len() >= self.config.live_window {
            return None;
        }
        let id = LIVE_SEQ_BIT | self.next_live.fetch_add(1, Ordering::Relaxed);
        // Framed under the lock, which the window check and the entry below
        // need anyway: framing first would cost a copy of the body for every
        // recipient found offline.
        let frame = PushFrame::envelope(&envelope_push(new, id))?;
        let pushed = o.push.push_frame(frame);
        if !pushed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        o.live.insert(id, Live::Waiting(tx));
        Some((id, rx))
    }

    /// Waits for the recipient's acknowledgement of a live delivery; when
    /// none comes by `deadline` (or the recipient's connection went),
    /// stores the envelope and answers once it is durable.
    ///
    /// Not an `async fn`: its arguments would be kept twice in the future
    /// (once as given, once moved into the body), which every live send's
    /// reply carries.
    ///
    /// `this` is the service, shared (`Arc`) or borrowed.
    #[allow(clippy::manual_async_fn)] // See above: the layout is the point.
    fn finish_live<S>(
        this: S,
        id: u64,
        mut acked: oneshot::Receiver<()>,
        deadline: tokio::time::Instant,
        envelope: NewEnvelope,
    ) -> impl Future<Output = Result<Reply, ErrorCode>> + Send + use<S, P>
    where
        S: std::ops::Deref<Target = Self> + Send,
    {
        async move {
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, &mut acked).await {
                return Ok(Reply::Accepted {
                    seq: id,
                    duplicate: false,
                });
            }
            // Boxed: the stored path's state would be most of this future.
            Box::pin(this.store_live(id, acked, envelope)).await
        }
    }

    /// A live delivery not acknowledged in time: stores the envelope and
    /// answers once it is durable (see [`Service::finish_live`]).
    async fn store_live(
        &self,
        id: u64,
        mut acked: oneshot::Receiver<()>,
        envelope: NewEnvelope,
    ) -> Result<Reply, ErrorCode> {
        let delivered = Reply::Accepted {
            seq: id,
            duplicate: false,
        };
        let recipient = envelope.recipient.clone();
        // Should this future be dropped before the delivery is settled (the
        // sender's connection went: the network layer drops its pending
        // replies), the delivery id is forgotten, so that it does not hold a
        // place in the recipient's live window for the rest of its
        // connection. A stored copy then stays until acknowledged by its seq.
        let _forget = ForgetUnsettled {
            online: &self.online,
            recipient: &recipient,
            id,
        };
        {
            let mut online = lock(&self.online);
            if let Some(entry) = online.get_mut(&recipient).and_then(|o| o.live.get_mut(&id)) {
                // Still waiting (an acknowledgement removes the entry).
                *entry = Live::Storing { acked: false };
            } else if acked.try_recv().is_ok() {
                // Acknowledged between the timeout and the lock.
                return Ok(delivered);
            }
        }
        let (outcome, mut envelopes) = match self.store_one(envelope).await {
            Ok(stored) => stored,
            Err(e) => {
                // Nothing to map the delivery id to: forget it, so that it
                // does not hold a place in the recipient's live window.
                if let Some(o) = lock(&self.online).get_mut(&recipient) {
                    o.live.remove(&id);
                }
                return Err(e);
            }
        };
        let (seq, duplicate) = match outcome {
            AppendOutcome::Stored { seq } => (seq, false),
            AppendOutcome::Duplicate { seq } => (seq, true),
        };
        let acked_meanwhile = {
            let mut online = lock(&self.online);
            match online.get_mut(&recipient) {
                Some(o) => match o.live.get_mut(&id) {
                    Some(Live::Storing { acked: true }) => {
                        o.live.remove(&id);
                        true
                    }
                    Some(entry) => {
                        *entry = Live::Stored(seq);
                        false
                    }
                    None => {
                        // The connection the envelope was pushed to is gone
                        // and the recipient is back on a new one: push the
                        // stored copy there, as the stored path does.
                        if let (false, Some(new)) = (duplicate, envelopes.pop())
                            && let Some(frame) = PushFrame::envelope(&envelope_push(&new, seq))
                        {
                            o.push.push_frame(frame);
                        }
                        false
                    }
                },
                None => false,
            }
        };
        if acked_meanwhile {
            // The recipient holds it: delete the stored copy (relaxed, like
            // any ack; should it be lost, the copy is delivered again and
            // the client drops the duplicate).
            let (done, _) = self.queue_ack(&recipient, vec![seq]).await?;
            if let Err(e) = Self::finish_ack(done).await {
                tracing::warn!(error = ?e, "deleting a stored copy the recipient acknowledged");
            }
        }
        Ok(Reply::Accepted { seq, duplicate })
    }

    /// Stores one envelope through the group commit; its outcome, and the
    /// envelope back from the writer.
    async fn store_one(
        &self,
        envelope: NewEnvelope,
    ) -> Result<(AppendOutcome, Vec<NewEnvelope>), ErrorCode> {
        let (tx, committed) = oneshot::channel();
        self.enqueue(CommitJob::Append(vec![envelope], tx)).await?;
        let (envelopes, mut results) = committed.await.map_err(|_| ErrorCode::Internal)?;
        let outcome = results
            .pop()
            .ok_or(ErrorCode::Internal)?
            .map_err(store_error)?;
        Ok((outcome, envelopes))
    }

    /// Waits for a live delivery's acknowledgement ([`Service::finish_live`])
    /// or a queued `Send`'s commit; after a commit, pushes the envelope to
    /// its recipient if they are online now (the writer hands the envelope
    /// back, so the body is moved into the push, not copied), and answers.
    async fn finish_send(&self, q: QueuedSend) -> Result<Reply, ErrorCode> {
        match q {
            QueuedSend::Stored(committed) => self.finish_stored(committed).await,
            QueuedSend::Live {
                id,
                acked,
                deadline,
                envelope,
            } => Self::finish_live(self, id, acked, deadline, envelope).await,
        }
    }

    /// The stored path of [`Service::finish_send`]: waits for the commit,
    /// pushes, answers.
    async fn finish_stored(&self, committed: CommitReceiver) -> Result<Reply, ErrorCode> {
        let (mut envelopes, mut results) = committed.await.map_err(|_| ErrorCode::Internal)?;
        let outcome = results
            .pop()
            .ok_or(ErrorCode::Internal)?
            .map_err(store_error)?;
        match outcome {
            AppendOutcome::Stored { seq } => {
                if let Some(new) = envelopes.pop() {
                    self.push_envelope_to(&new.recipient, envelope_push(&new, seq));
                }
                Ok(Reply::Accepted {
                    seq,
                    duplicate: false,
                })
            }
            AppendOutcome::Duplicate { seq } => Ok(Reply::Accepted {
                seq,
                duplicate: true,
            }),
        }
    }

    async fn group_record(&self, group: &str) -> Result<GroupRecord, ErrorCode> {
        let g = group_name(group)?;
        let store = self.store.clone();
        blocking(move || store.group(&g))
            .await?
            .ok_or(ErrorCode::GroupNotExist)
    }

    async fn group_send(
        &self,
        me: &str,
        group: &str,
        id: MessageId,
        body: Vec<u8>,
    ) -> Result<Reply, ErrorCode> {
        if body.len() > MAX_BODY_LEN {
            return Err(ErrorCode::TooLarge);
        }
        let record = self.group_record(group).await?;
        if !record.members.iter().any(|m| m == me) {
            return Err(ErrorCode::NotInGroup);
        }
        // One envelope per other member: a send to a large group (the
        // lobby has no member cap) costs more of the sender's send rate, so
        // that one account cannot make the server write fifty times its
        // rate times the group's size.
        let cost = group_send_cost(record.members.len().saturating_sub(1));
        if !lock(&self.send_buckets).take_n(me, cost, self.now_ms()) {
            return Err(ErrorCode::RateLimited);
        }
        let sent_at = self.now();
        let recipients: Vec<String> = record
            .members
            .iter()
            .filter(|m| *m != me)
            .cloned()
            .collect();
        let envelopes = recipients
            .iter()
            .map(|r| NewEnvelope {
                recipient: r.clone(),
                sender: me.to_owned(),
                group: Some(record.name.clone()),
                message_id: id,
                sent_at,
                body: body.clone(),
            })
            .collect();
        let (_, results) = self.commit(envelopes).await?;
        let (mut any_stored, mut any_duplicate) = (false, false);
        for (recipient, result) in recipients.iter().zip(results) {
            match result {
                Ok(AppendOutcome::Stored { seq }) => {
                    any_stored = true;
                    self.push_envelope_to(
                        recipient,
                        EnvelopePush {
                            seq,
                            from: me,
                            from_device: DEFAULT_DEVICE,
                            group: Some(&record.name),
                            id: &id,
                            sent_at,
                            body: &body,
                        },
                    );
                }
                Ok(AppendOutcome::Duplicate { .. }) => any_duplicate = true,
                // A member whose mailbox is full misses this message; the
                // others do not, so one member who never reads cannot stop
                // a group.
                Err(StoreError::QuotaExceeded { .. }) => {}
                Err(e) => return Err(store_error(e)),
            }
        }
        if !any_stored && !any_duplicate && !recipients.is_empty() {
            // Every member's mailbox is full: nobody holds it.
            return Err(ErrorCode::QuotaExceeded);
        }
        Ok(Reply::Accepted {
            seq: 0,
            duplicate: !any_stored && any_duplicate,
        })
    }

    /// A page of the online users the policy shows `me`, by name after
    /// `after`, and whether more follow.
    async fn users(
        &self,
        me: &str,
        after: Option<&str>,
    ) -> Result<(Vec<UserInfo>, bool), ErrorCode> {
        let past = |n: &str| after.is_none_or(|after| n > after);
        // Friends only: the friend list and me are the candidates;
        // everyone: the online names. Either way only the first page's
        // worth is sorted, so a page costs one pass over the candidates and
        // no copies beyond the page.
        let friends = if self.config.users_policy == UsersPolicy::FriendsOnly {
            let store = self.store.clone();
            let m = me.to_owned();
            let mut friends = blocking(move || store.friends(&m)).await?;
            friends.push(me.to_owned());
            friends.retain(|n| past(n));
            Some(friends)
        } else {
            None
        };
        let online = lock(&self.online);
        let mut names: Vec<&String> = match &friends {
            Some(friends) => friends.iter().filter(|n| online.contains_key(*n)).collect(),
            None => online.keys().filter(|n| past(n)).collect(),
        };
        let page = self.config.users_page.clamp(1, USERS_PAGE);
        if names.len() > page + 1 {
            names.select_nth_unstable(page);
            names.truncate(page + 1);
        }
        names.sort_unstable();
        // A page: at most `page` users and what fits one reply frame.
        let mut users = Vec::with_capacity(names.len().min(page));
        let mut budget = REPLY_BUDGET;
        let mut more = false;
        for n in names {
            let Some(o) = online.get(n) else { continue };
            let cost = n.len() + o.identity.len() + USER_OVERHEAD;
            if users.len() == page || cost > budget {
                more = true;
                break;
            }
            budget -= cost;
            users.push(UserInfo {
                username: n.clone(),
                identity: o.identity.clone(),
                online: true,
            });
        }
        Ok((users, more))
    }

    async fn lookup(&self, me: &str, username: &str) -> Result<Reply, ErrorCode> {
        let user = name(username)?;
        let store = self.store.clone();
        let u = user.clone();
        let account = blocking(move || store.account(&u))
            .await?
            .ok_or(ErrorCode::UserNotExist)?;
        let mut online = lock(&self.online).contains_key(&user);
        if online && user != me && self.config.users_policy == UsersPolicy::FriendsOnly {
            let store = self.store.clone();
            let m = me.to_owned();
            online = blocking(move || store.friends(&m)).await?.contains(&user);
        }
        Ok(Reply::User(UserInfo {
            username: user,
            identity: account.identity,
            online,
        }))
    }

    async fn friend_request(&self, me: &str, username: &str) -> Result<Reply, ErrorCode> {
        let them = name(username)?;
        if them == me {
            return Err(ErrorCode::BadRequest);
        }
        let store = self.store.clone();
        let (a, b) = (me.to_owned(), them.clone());
        let outcome = blocking(move || {
            if store.account(&b)?.is_none() {
                return Err(StoreError::UnknownUser);
            }
            store.friend_request(&a, &b)
        })
        .await?;
        match outcome {
            FriendRequestOutcome::Sent | FriendRequestOutcome::AlreadyRequested => {
                self.push_to(
                    &them,
                    Push::FriendRequest {
                        from: me.to_owned(),
                    },
                );
                Ok(Reply::Ok)
            }
            FriendRequestOutcome::AlreadyFriends => Err(ErrorCode::AlreadyFriend),
            FriendRequestOutcome::AcceptedReverse { notice } => {
                self.became_friends(me, &them, notice).await;
                Ok(Reply::Ok)
            }
        }
    }

    /// `me` and `them` became friends by `me`'s doing; `notice` is the
    /// number of the acceptance kept for `them`.
    async fn became_friends(&self, me: &str, them: &str, notice: u64) {
        self.tell_notice(them, me, FriendNotice::Accepted, notice)
            .await;
        // Both online: each learns the other is here, with their key.
        let (mine, theirs) = {
            let online = lock(&self.online);
            (
                online.get(me).map(|o| o.identity.clone()),
                online.get(them).map(|o| o.identity.clone()),
            )
        };
        if let (Some(mine), Some(theirs)) = (mine, theirs) {
            self.push_to(
                them,
                Push::Presence {
                    username: me.to_owned(),
                    online: true,
                    identity: mine,
                },
            );
            self.push_to(
                me,
                Push::Presence {
                    username: them.to_owned(),
                    online: true,
                    identity: theirs,
                },
            );
        }
    }

    async fn friend_answer(
        &self,
        me: &str,
        username: &str,
        accept: bool,
    ) -> Result<Reply, ErrorCode> {
        let them = name(username)?;
        let store = self.store.clone();
        let (a, b) = (me.to_owned(), them.clone());
        let number = blocking(move || {
            if accept {
                store.friend_accept(&a, &b)
            } else {
                store.friend_decline(&a, &b)
            }
        })
        .await?;
        if accept {
            self.became_friends(me, &them, number).await;
        } else {
            self.tell_notice(&them, me, FriendNotice::Declined, number)
                .await;
        }
        Ok(Reply::Ok)
    }

    /// Tells `user` the notice from `other` that the store kept with the
    /// change under `number`: pushed at once if `user` is online, and then
    /// forgotten (unless a newer one replaced it); otherwise, or if
    /// forgetting fails, it waits for their next login. Best effort beyond
    /// that: a push queued to a connection that then turns out dead is not
    /// told again, and `FriendList` shows the state anyway.
    async fn tell_notice(&self, user: &str, other: &str, notice: FriendNotice, number: u64) {
        if !self.push_to(user, notice_push(other, notice)) {
            return;
        }
        let store = self.store.clone();
        let (user, told) = (user.to_owned(), [(other.to_owned(), number)]);
        if let Err(e) = blocking(move || store.forget_friend_notices(&user, &told)).await {
            tracing::warn!(
                ?e,
                "a friend notice pushed live stays kept for the next login"
            );
        }
    }

    async fn friend_list(&self, me: &str) -> Result<Reply, ErrorCode> {
        let store = self.store.clone();
        let m = me.to_owned();
        let (friends, incoming, outgoing) = blocking(move || {
            let mut friends = Vec::new();
            for f in store.friends(&m)? {
                let identity = store.account(&f)?.map(|a| a.identity).unwrap_or_default();
                friends.push((f, identity));
            }
            Ok((
                friends,
                store.incoming_requests(&m)?,
                store.outgoing_requests(&m)?,
            ))
        })
        .await?;
        let friends = friends
            .into_iter()
            .map(|(username, identity)| UserInfo {
                online: self.is_online(&username),
                username,
                identity,
            })
            .collect();
        Ok(Reply::Friends {
            friends,
            incoming,
            outgoing,
        })
    }

    /// Checks a roster's shape and its owner's signature.
    async fn check_roster(&self, roster: &SignedRoster) -> Result<(), ErrorCode> {
        group_name(&roster.group)?;
        if roster.group == LOBBY || roster.version == 0 {
            return Err(ErrorCode::NotPermitted);
        }
        if roster.members.len() > MAX_GROUP_MEMBERS {
            return Err(ErrorCode::TooLarge);
        }
        let sorted = roster.members.windows(2).all(|w| w[0] < w[1]);
        if !sorted || !roster.members.contains(&roster.owner) {
            return Err(ErrorCode::BadRequest);
        }
        for m in &roster.members {
            if name(m)? != *m {
                return Err(ErrorCode::BadRequest);
            }
        }
        let owner = self.identity_of(&roster.owner).await?;
        let bytes = roster_signed_bytes(
            &roster.group,
            roster.version,
            &roster.owner,
            &roster.members,
        )
        .ok_or(ErrorCode::BadRequest)?;
        let sig: [u8; 64] = roster
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| ErrorCode::BadSignature)?;
        owner
            .identity_key()
            .verify(SigningContext::GroupRoster, &bytes, &sig)
            .map_err(|_| ErrorCode::BadSignature)?;
        let store = self.store.clone();
        let members = roster.members.clone();
        blocking(move || {
            for m in &members {
                if store.account(m)?.is_none() {
                    return Err(StoreError::UnknownUser);
                }
            }
            Ok(())
        })
        .await
    }

    fn record_of(roster: &SignedRoster) -> Result<GroupRecord, ErrorCode> {
        Ok(GroupRecord {
            name: roster.group.clone(),
            owner: roster.owner.clone(),
            version: roster.version,
            members: roster.members.clone(),
            roster_signature: roster.signature.clone(),
            roster_bytes: postcard::to_stdvec(roster).map_err(|_| ErrorCode::Internal)?,
        })
    }

    fn tell_members(&self, members: &[String], except: &str, roster: &SignedRoster) {
        for m in members.iter().filter(|m| *m != except) {
            self.push_to(m, Push::GroupChanged(roster.clone()));
        }
    }

    async fn group_create(&self, me: &str, roster: SignedRoster) -> Result<Reply, ErrorCode> {
        if roster.owner != me {
            return Err(ErrorCode::NotPermitted);
        }
        self.check_roster(&roster).await?;
        let record = Self::record_of(&roster)?;
        let store = self.store.clone();
        blocking(move || store.create_group(record)).await?;
        self.tell_members(&roster.members, me, &roster);
        Ok(Reply::Ok)
    }

    async fn group_join(&self, me: &str, group: &str) -> Result<Reply, ErrorCode> {
        if group == LOBBY {
            return self.lobby_join(me).await;
        }
        let record = self.group_record(group).await?;
        if record.members.iter().any(|m| m == me) {
            return Err(ErrorCode::UserInGroup);
        }
        let store = self.store.clone();
        let (g, m) = (record.name.clone(), me.to_owned());
        blocking(move || store.add_join_request(&g, &m)).await?;
        self.push_to(
            &record.owner,
            Push::GroupJoinRequest {
                group: record.name.clone(),
                username: me.to_owned(),
            },
        );
        Ok(Reply::Ok)
    }

    /// The lobby has no owner: the server keeps its roster, unsigned. It is
    /// public by design, and clients treat it so.
    async fn lobby_join(&self, me: &str) -> Result<Reply, ErrorCode> {
        for _attempt in 0..8 {
            let store = self.store.clone();
            let existing = blocking(move || store.group(LOBBY)).await?;
            // The store wants an owner account; the first joiner is the
            // lobby's nominal owner, with no powers (its roster is unsigned
            // and `GroupUpdate` refuses the lobby).
            let (mut members, version, owner) = match &existing {
                Some(r) => (r.members.clone(), r.version, r.owner.clone()),
                None => (Vec::new(), 0, me.to_owned()),
            };
            if members.iter().any(|m| m == me) {
                return Err(ErrorCode::UserInGroup);
            }
            members.push(me.to_owned());
            members.sort();
            let roster = SignedRoster {
                group: LOBBY.to_owned(),
                version: version + 1,
                owner,
                members,
                signature: Vec::new(),
            };
            let record = Self::record_of(&roster)?;
            let store = self.store.clone();
            let result = match existing {
                None => blocking(move || store.create_group(record)).await,
                Some(_) => blocking(move || store.update_group(LOBBY, version, record)).await,
            };
            match result {
                Ok(()) => return Ok(Reply::Ok),
                // Another join won the race: read again and retry.
                Err(ErrorCode::NotPermitted | ErrorCode::GroupExist) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ErrorCode::Internal)
    }

    async fn group_update(&self, me: &str, roster: SignedRoster) -> Result<Reply, ErrorCode> {
        let current = self.group_record(&roster.group).await?;
        if current.owner != me || roster.owner != me || roster.version <= current.version {
            return Err(ErrorCode::NotPermitted);
        }
        self.check_roster(&roster).await?;
        let record = Self::record_of(&roster)?;
        let store = self.store.clone();
        let (g, expected) = (roster.group.clone(), current.version);
        let added: Vec<String> = roster
            .members
            .iter()
            .filter(|m| !current.members.contains(m))
            .cloned()
            .collect();
        let removed: Vec<String> = current
            .members
            .iter()
            .filter(|m| !roster.members.contains(m))
            .cloned()
            .collect();
        blocking(move || {
            store.update_group(&g, expected, record)?;
            for m in &added {
                store.remove_join_request(&g, m)?;
            }
            for m in &removed {
                store.remove_leave_request(&g, m)?;
            }
            Ok(())
        })
        .await?;
        let mut everyone: Vec<String> = current.members.clone();
        everyone.extend(roster.members.iter().cloned());
        everyone.sort();
        everyone.dedup();
        self.tell_members(&everyone, me, &roster);
        Ok(Reply::Ok)
    }

    async fn group_leave(&self, me: &str, group: &str) -> Result<Reply, ErrorCode> {
        let record = self.group_record(group).await?;
        if !record.members.iter().any(|m| m == me) {
            return Err(ErrorCode::NotInGroup);
        }
        if group == LOBBY {
            // The server keeps the lobby roster itself.
            let mut members = record.members.clone();
            members.retain(|m| m != me);
            let roster = SignedRoster {
                group: LOBBY.to_owned(),
                version: record.version + 1,
                owner: record.owner.clone(),
                members,
                signature: Vec::new(),
            };
            let next = Self::record_of(&roster)?;
            let store = self.store.clone();
            let v = record.version;
            blocking(move || store.update_group(LOBBY, v, next)).await?;
            return Ok(Reply::Ok);
        }
        if record.owner == me {
            // The owner signs the roster; leaving would orphan the group.
            // Refused: the owner can publish a roster of only themself.
            return Err(ErrorCode::NotPermitted);
        }
        // Only the owner can sign a roster without me: ask the owner's
        // client now if it is online, and at each of its logins until it
        // publishes a roster without me (the request is stored).
        let store = self.store.clone();
        let (g, m) = (record.name.clone(), me.to_owned());
        blocking(move || store.add_leave_request(&g, &m)).await?;
        self.push_to(
            &record.owner,
            Push::GroupLeaveRequest {
                group: record.name.clone(),
                username: me.to_owned(),
            },
        );
        Ok(Reply::Ok)
    }

    async fn announce(&self, a: SignedAnnouncement) -> Result<Reply, ErrorCode> {
        let key = self.server_key.ok_or(ErrorCode::NotPermitted)?;
        if a.text.len() > MAX_ANNOUNCEMENT_LEN {
            return Err(ErrorCode::TooLarge);
        }
        let sig: [u8; 64] = a
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| ErrorCode::BadSignature)?;
        key.verify(
            SigningContext::Announcement,
            &announcement_signed_bytes(a.issued_at, &a.text),
            &sig,
        )
        .map_err(|_| ErrorCode::BadSignature)?;
        let bytes = postcard::to_stdvec(&a).map_err(|_| ErrorCode::Internal)?;
        let store = self.store.clone();
        let record = AnnouncementRecord {
            id: 0,
            issued_at: a.issued_at,
            bytes,
        };
        blocking(move || store.add_announcement(record)).await?;
        // Delivered live to everyone online. The per-user cursor moves only
        // when announcements are delivered at login, so a connection that was
        // closing as this went out loses nothing: delivery is at least once,
        // and clients drop repeats by signature.
        let targets: Vec<P> = lock(&self.online)
            .values()
            .map(|o| o.push.clone())
            .collect();
        for push in targets {
            push.push(Push::Announcement(a.clone()));
        }
        Ok(Reply::Ok)
    }
}

/// Whether `seq` names a live delivery ([`LIVE_SEQ_BIT`]), not a mailbox
/// seq.
fn is_live(seq: u64) -> bool {
    seq & LIVE_SEQ_BIT != 0
}

/// Whether `seqs`, an `Ack`'s, are live delivery ids only (and within
/// [`MAX_ACKS`]; a longer one is refused anyway).
fn acks_live_only(seqs: &[u64]) -> bool {
    !seqs.is_empty() && seqs.len() <= MAX_ACKS && seqs.iter().all(|seq| is_live(*seq))
}

/// The push of `new` under `seq` (its mailbox seq or live delivery id).
fn envelope_push(new: &NewEnvelope, seq: u64) -> EnvelopePush<'_> {
    EnvelopePush {
        seq,
        from: &new.sender,
        from_device: DEFAULT_DEVICE,
        group: new.group.as_deref(),
        id: &new.message_id,
        sent_at: new.sent_at,
        body: &new.body,
    }
}

fn roster_of(record: &GroupRecord) -> SignedRoster {
    postcard::from_bytes(&record.roster_bytes).unwrap_or_else(|_| SignedRoster {
        group: record.name.clone(),
        version: record.version,
        owner: record.owner.clone(),
        members: record.members.clone(),
        signature: record.roster_signature.clone(),
    })
}

fn group_name(raw: &str) -> Result<String, ErrorCode> {
    let n = name(raw)?;
    if n != raw {
        return Err(ErrorCode::BadRequest);
    }
    Ok(n)
}

fn key_error(e: messenger_crypto::identity::KeyError) -> ErrorCode {
    use messenger_crypto::identity::KeyError;
    match e {
        KeyError::BadSignature(_) => ErrorCode::BadSignature,
        _ => ErrorCode::BadRequest,
    }
}

/// Other members whose envelopes cost one more token of the sender's send
/// rate, on top of the one every send costs.
pub const FAN_OUT_PER_SEND_TOKEN: usize = 20;

/// Tokens of the send rate a group send to `others` other members takes:
/// 1, plus one per [`FAN_OUT_PER_SEND_TOKEN`] of them. A cost above the
/// bucket's burst passes from a full bucket and leaves it in debt
/// ([`crate::rate::Buckets::take_n`]), so a send to any group can pass and
/// the envelopes one account makes stay near 50 × 20 a second.
fn group_send_cost(others: usize) -> f64 {
    1.0 + others as f64 / FAN_OUT_PER_SEND_TOKEN as f64
}

/// Refuses a published X25519 key that is low-order, torsioned or not on
/// the curve (`bad_request`): an honest client's keys never are, and a
/// low-order one would make every agreement with it predictable.
fn strong_key(key: &messenger_crypto::dh::DhPublicKey) -> Result<(), ErrorCode> {
    key.check_torsion_free().map_err(|_| ErrorCode::BadRequest)
}

fn parse_prekeys(raw: &[Vec<u8>]) -> Result<Vec<(u32, Vec<u8>)>, ErrorCode> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for bytes in raw {
        let opk = OneTimePrekey::from_bytes(bytes).map_err(|_| ErrorCode::BadRequest)?;
        strong_key(opk.key())?;
        if !seen.insert(opk.id()) {
            return Err(ErrorCode::BadRequest);
        }
        out.push((opk.id(), bytes.clone()));
    }
    Ok(out)
}

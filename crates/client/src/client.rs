//! The client as one object: an unlocked home, its local store and, when
//! needed, a logged-in connection to the server it is registered with.
//!
//! Every command of the CLI is one method here. The rules it keeps:
//!
//! - **Nothing leaves before it is saved.** `send` encrypts through the
//!   engine, which commits the new ratchet state, the ciphertext (in the
//!   outbox) and the history row in one transaction; only then is the
//!   ciphertext written to the server. Whatever was not acknowledged stays in
//!   the outbox and is sent again, byte for byte, on the next connection.
//! - **Nothing is acknowledged before it is saved.** `pull` stores each
//!   decrypted message (history, session, seen marker) before it sends the
//!   server the acknowledgement that lets it delete the envelope.
//! - **Key changes are loud.** Before a send the contact's current
//!   directory entry is compared with the key on record; a change is
//!   reported as a [`Warning`], and a verified contact whose key changed is
//!   blocked until verified again.
//! - **Upkeep on login.** After logging in the client sends its outbox, tops
//!   up its one-time prekeys when the server holds fewer than
//!   [`PREKEY_LOW_WATER`] and rotates its signed prekey when due.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use messenger_crypto::fingerprint::SafetyNumber;
use messenger_crypto::identity::{IdentityKey, PublicIdentity, SigningContext, Username};
use messenger_crypto::prekey::{OneTimePrekey, SignedPrekey, VerifiedBundle};
use messenger_proto::ErrorCode;
use messenger_proto::msg::{
    Envelope, MAX_ACKS, MAX_PULL, Push, Register, Reply, Request, SignedAnnouncement, UserInfo,
    announcement_signed_bytes,
};
use tokio::sync::mpsc;

use crate::conn::{ClosedReason, ConnError, ConnectOptions, Connection, PinPolicy, resolve};
use crate::engine::{Engine, EngineError, KeyStatus, NewSession, Received};
use crate::home::{Home, HomeError, Profile, ServerInfo};
use crate::passphrase::PassphraseSource;
use crate::store::OutboxEntry;

pub use crate::store::{Direction, HistoryEntry};

/// One-time prekeys uploaded at registration and kept on the server: 100,
/// enough for 100 first contacts while this client is offline.
pub const PREKEY_TARGET: u32 = 100;

/// Below this many one-time prekeys on the server the client uploads more,
/// back up to [`PREKEY_TARGET`]: a quarter of the target leaves room for a
/// burst of first contacts between two logins.
pub const PREKEY_LOW_WATER: u32 = 25;

/// Online users `users` lists at most, page after page: 100,000 (about a
/// hundred requests). Past that the listing is cut.
pub const MAX_USERS_LISTED: usize = 100_000;

/// Why a client operation failed. Messages are one line, with the user or
/// server they concern; none carries key bytes or message text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The home could not be opened or unlocked.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The home is not registered with a server.
    #[error("{name} is not registered with a server")]
    NotRegistered {
        /// The local name.
        name: String,
    },
    /// A name that cannot be a username.
    #[error("invalid username {0:?}: use 1-32 characters of a-z, 0-9, '_', '.', '-'")]
    InvalidUsername(String),
    /// The server has no such user.
    #[error("no user {user} on {server}")]
    UnknownUser {
        /// Whom.
        user: String,
        /// The server.
        server: String,
    },
    /// The server could not be reached or refused the connection.
    #[error("cannot reach the server {server}")]
    Connect {
        /// The server.
        server: String,
        /// Why.
        #[source]
        source: ConnError,
    },
    /// A request failed.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The local store or the cryptography refused.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The message is saved and will be sent on the next run, but the
    /// server could not be reached now.
    #[error("the message to {user} is saved in the outbox but not sent: {reason}")]
    Queued {
        /// The recipient.
        user: String,
        /// Why it is not sent.
        reason: String,
    },
    /// Not connected, and a first message needs the recipient's keys from
    /// the server: nothing was saved.
    #[error("not connected: a first message to {user} needs their keys from the server")]
    NeedsServer {
        /// The recipient.
        user: String,
    },
    /// The server answered with something this operation does not expect.
    #[error("the server answered a {0} request with a reply of another kind")]
    UnexpectedReply(&'static str),
    /// The directory's prekey bundle is malformed or its signatures do not
    /// verify (a forged signed prekey, a weak key): nothing was sent.
    #[error("the server's prekey bundle for this user does not verify; nothing was sent")]
    BadBundle,
    /// A safety number that is not 60 digits.
    #[error("a safety number is 60 digits (spaces are ignored)")]
    BadSafetyNumber,
    /// No async runtime could be made.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

impl ClientError {
    /// Whether trying the same again later may succeed: the server could
    /// not be reached, or the connection ended for a passing reason
    /// ([`ConnError::is_transient`]). Not for a changed certificate, a
    /// refused login, a replaced connection, or anything local.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { source, .. } | Self::Conn(source) => source.is_transient(),
            _ => false,
        }
    }
}

/// Something the user should see besides the result: printed on standard
/// error by the CLI, as events in `chat`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// A contact's identity key is not the one on record.
    KeyChanged {
        /// The contact.
        user: String,
        /// Whether the contact had been verified (sending is then blocked
        /// until verified again).
        was_verified: bool,
    },
    /// A message could not be decrypted; it is acknowledged so that it does
    /// not come back, and reported.
    Undecryptable {
        /// The sender.
        from: String,
        /// Why, in words.
        reason: String,
    },
    /// One-time prekeys could not be topped up or the signed prekey rotated.
    Upkeep(String),
    /// An announcement not signed by the key the server showed at the
    /// start of this connection; dropped (T-77).
    BadAnnouncement,
    /// A message waiting in the outbox was refused for a reason of its
    /// recipient's (a full mailbox, an account gone); the others went on.
    NotDelivered {
        /// The recipient.
        user: String,
        /// What happened, and what becomes of the message.
        reason: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KeyChanged {
                user,
                was_verified: true,
            } => write!(
                f,
                "the identity key of {user} CHANGED and {user} was verified: sending to {user} is blocked until you compare safety numbers again (`messenger fingerprint {user}`, then `messenger verify {user} NUMBER`)"
            ),
            Self::KeyChanged { user, .. } => write!(
                f,
                "the identity key of {user} CHANGED: they may have reinstalled, or someone may be impersonating them; compare safety numbers (`messenger fingerprint {user}`)"
            ),
            Self::Undecryptable { from, reason } => {
                write!(f, "a message from {from} could not be decrypted ({reason})")
            }
            Self::Upkeep(what) => write!(f, "key upkeep failed: {what}"),
            Self::BadAnnouncement => {
                f.write_str("dropped an announcement that the server's key did not sign")
            }
            Self::NotDelivered { user, reason } => {
                write!(
                    f,
                    "an earlier message to {user} was not delivered: {reason}"
                )
            }
        }
    }
}

/// A message shown to the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sender.
    pub from: String,
    /// The text.
    pub text: String,
    /// The sender's message id, as 32 hex digits.
    pub id: String,
    /// When the server accepted it, seconds since the Unix epoch.
    pub sent_at: u64,
}

/// What happens while a client is online, for `chat` and `pull`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A new message, already in the local history.
    Message(Message),
    /// Someone came online or went offline.
    Presence {
        /// Who.
        user: String,
        /// Online now.
        online: bool,
    },
    /// A friend request arrived.
    FriendRequest {
        /// From whom.
        from: String,
    },
    /// An answer to my friend request.
    FriendAnswer {
        /// Who answered.
        from: String,
        /// Accepted or declined.
        accepted: bool,
    },
    /// A friend removed me.
    FriendRemoved {
        /// Who.
        from: String,
    },
    /// An announcement signed by the server's key.
    Announcement {
        /// The text.
        text: String,
    },
    /// Something to warn about.
    Warning(Warning),
    /// The connection ended (another login replaced it, the server stopped).
    Disconnected {
        /// Why, in words.
        reason: String,
    },
}

/// The result of [`Client::send`]. Warnings about the recipient are in
/// [`Client::take_events`], whether the send succeeded or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The message id, as 32 hex digits.
    pub id: String,
    /// Earlier messages from the outbox that went out too.
    pub flushed: usize,
}

/// A safety number with the contact it is shared with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Safety {
    /// The contact.
    pub user: String,
    /// The 60 digits in 12 groups of 5, separated by spaces.
    pub grouped: String,
    /// The 60 digits.
    pub digits: String,
    /// Whether the contact is verified.
    pub verified: bool,
    /// Warnings to show.
    pub warnings: Vec<Warning>,
}

/// A logged-in or offline client; see the [module](self) docs.
pub struct Client {
    server: ServerInfo,
    engine: Engine,
    options: ConnectOptions,
    conn: Option<Connection>,
    pushes: Option<mpsc::Receiver<Push>>,
    /// Events seen while doing something else (pushes read during a
    /// request), handed out by [`Client::next_event`].
    pending: Vec<Event>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.engine.me().as_str())
            .field("server", &self.server.address)
            .field("online", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn username(name: &str) -> Result<Username, ClientError> {
    Username::parse(name).map_err(|_| ClientError::InvalidUsername(name.to_owned()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Registers the identity in `home` with the server at `address` and
/// remembers the server and its certificate fingerprint in the profile.
/// With `fingerprint` the certificate must match it; without, the one the
/// server presents is trusted on first use and pinned.
///
/// # Errors
///
/// [`ClientError::Connect`] when the server cannot be reached or its
/// certificate does not match; [`ClientError::Conn`] with the server's
/// typed error (`user_exists`, `not_permitted` for a missing invitation).
pub async fn register(
    home: &Home,
    passphrases: &mut dyn PassphraseSource,
    address: &str,
    fingerprint: Option<&str>,
    invite: Option<String>,
    options: &ConnectOptions,
) -> Result<Profile, ClientError> {
    let unlocked = home.unlock(passphrases)?;
    let connect_error = |source| ClientError::Connect {
        server: address.to_owned(),
        source,
    };
    let addr = resolve(address).await.map_err(connect_error)?;
    let pin = match fingerprint {
        Some(fp) => PinPolicy::Pinned(fp.to_owned()),
        None => PinPolicy::TrustOnFirstUse,
    };
    let conn = Connection::connect(addr, &pin, options)
        .await
        .map_err(connect_error)?;
    let engine = Engine::open(&home.store_path(), unlocked)?;
    let unlocked = engine.unlocked();
    let material = engine.registration_material(&mut rand::rng(), now())?;
    let spk_id = SignedPrekey::from_bytes(&material.signed_prekey)
        .map_err(|_| ClientError::UnexpectedReply("register"))?
        .id();
    let request = Request::Register(Register {
        username: unlocked.profile().name().as_str().to_owned(),
        identity: material.identity,
        signed_prekey: material.signed_prekey,
        one_time_prekeys: material.one_time_prekeys,
        invite,
    });
    let mut reply = conn.request(request).await;
    if let Err(ConnError::Server(ErrorCode::UserExists)) = reply {
        // Already ours? Then registering again only updates the pin (after
        // an operator changed the certificate, say).
        if conn
            .login(unlocked.profile().name(), unlocked.identity())
            .await
            .is_ok()
        {
            reply = Ok(Reply::Ok);
        }
    }
    let seen = conn.fingerprint().to_owned();
    conn.close().await;
    match reply? {
        Reply::Ok => {}
        _ => return Err(ClientError::UnexpectedReply("register")),
    }
    engine.confirm_signed_prekey(spk_id)?;
    Ok(home.set_server(ServerInfo {
        address: address.to_owned(),
        fingerprint: seen,
    })?)
}

impl Client {
    /// Unlocks `home` and opens its store. Needs a registered home; does not
    /// connect yet.
    ///
    /// # Errors
    ///
    /// [`ClientError::Home`] (e.g. a wrong passphrase),
    /// [`ClientError::NotRegistered`], [`ClientError::Engine`].
    pub fn open(
        home: &Home,
        passphrases: &mut dyn PassphraseSource,
        options: ConnectOptions,
    ) -> Result<Self, ClientError> {
        let profile = home.profile()?;
        let Some(server) = profile.server().cloned() else {
            return Err(ClientError::NotRegistered {
                name: profile.name().to_string(),
            });
        };
        let unlocked = home.unlock(passphrases)?;
        let engine = Engine::open(&home.store_path(), unlocked)?;
        Ok(Self {
            server,
            engine,
            options,
            conn: None,
            pushes: None,
            pending: Vec::new(),
        })
    }

    /// The profile.
    pub fn profile(&self) -> &Profile {
        self.engine.unlocked().profile()
    }

    /// The server this client is registered with.
    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    /// Connects and logs in if not yet online, then does the upkeep: sends
    /// the outbox, tops up one-time prekeys, rotates the signed prekey when
    /// due. Returns how many outbox messages went out.
    ///
    /// # Errors
    ///
    /// [`ClientError::Connect`] when the server cannot be reached, its
    /// certificate changed, or it refuses the login.
    pub async fn connect(&mut self) -> Result<usize, ClientError> {
        if self.conn.is_some() {
            return Ok(0);
        }
        let connect_error = |source| ClientError::Connect {
            server: self.server.address.clone(),
            source,
        };
        let addr = resolve(&self.server.address).await.map_err(connect_error)?;
        let pin = PinPolicy::Pinned(self.server.fingerprint.clone());
        let conn = Connection::connect(addr, &pin, &self.options)
            .await
            .map_err(connect_error)?;
        let unlocked = self.engine.unlocked();
        let logged_in = conn
            .login(unlocked.profile().name(), unlocked.identity())
            .await
            .map_err(connect_error)?;
        self.pushes = conn.take_pushes();
        self.conn = Some(conn);
        let flushed = self.flush_outbox().await?;
        self.upkeep(logged_in.prekeys).await;
        Ok(flushed)
    }

    fn conn(&self) -> Result<&Connection, ClientError> {
        self.conn
            .as_ref()
            .ok_or(ClientError::Conn(ConnError::Closed {
                reason: ClosedReason::Local,
            }))
    }

    /// Sends every outbox entry, oldest first, each with its saved
    /// ciphertext and id. A refusal that concerns one recipient (their
    /// mailbox is full, their account is gone) holds back only that
    /// recipient's later entries, so their order holds and nobody else
    /// waits behind them; it is told as a [`Warning::NotDelivered`]. Any
    /// other failure (the connection, the server) stops the flush, and the
    /// rest stay.
    async fn flush_outbox(&mut self) -> Result<usize, ClientError> {
        let mut sent = 0;
        let mut held: Vec<Username> = Vec::new();
        for entry in self.engine.outbox()? {
            if held.contains(&entry.to) {
                continue;
            }
            match self.deliver(&entry).await {
                Ok(()) => sent += 1,
                Err(e) => {
                    let reason = match e {
                        ClientError::UnknownUser { .. } => {
                            "the account no longer exists; the message is marked failed"
                        }
                        ClientError::Conn(ConnError::Server(ErrorCode::QuotaExceeded)) => {
                            "their mailbox on the server is full; it stays in the outbox and goes out with a later send"
                        }
                        e => return Err(e),
                    };
                    self.pending.push(Event::Warning(Warning::NotDelivered {
                        user: entry.to.to_string(),
                        reason: reason.to_owned(),
                    }));
                    held.push(entry.to);
                }
            }
        }
        Ok(sent)
    }

    /// Writes one saved outbox entry to the server and, once accepted,
    /// marks it sent.
    async fn deliver(&mut self, entry: &OutboxEntry) -> Result<(), ClientError> {
        let request = Request::Send(entry.to_envelope());
        match self.request_keeping_pushes(request).await? {
            Ok(Reply::Accepted { seq, .. }) => {
                self.engine.mark_sent(&entry.id, seq, now())?;
                Ok(())
            }
            Ok(_) => Err(ClientError::UnexpectedReply("send")),
            Err(ConnError::Server(ErrorCode::UserNotExist)) => {
                // The account is gone: the message can never be delivered.
                self.engine.mark_failed(&entry.id, now())?;
                Err(ClientError::UnknownUser {
                    user: entry.to.to_string(),
                    server: self.server.address.clone(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `request` and waits for its reply while keeping and
    /// acknowledging the envelopes pushed meanwhile. A recipient online now
    /// gets a `Send` live, and the server answers it only once that
    /// recipient acknowledged it (docs/protocol.md §4): two people writing
    /// to each other at the same moment would otherwise each wait for the
    /// other's acknowledgement until the server's grace ran out. Other
    /// pushes are handled after the reply. Their events wait in
    /// [`Client::take_events`].
    async fn request_keeping_pushes(
        &mut self,
        request: Request,
    ) -> Result<Result<Reply, ConnError>, ClientError> {
        // Out of `self` while the reply is awaited, so that pushes can be
        // kept (which needs `&mut self`) meanwhile; put back on every path.
        let conn = self
            .conn
            .take()
            .ok_or(ClientError::Conn(ConnError::Closed {
                reason: ClosedReason::Local,
            }))?;
        let mut later = Vec::new();
        let result = self.await_reply(&conn, request, &mut later).await;
        self.conn = Some(conn);
        for push in later {
            if let Some(event) = self.on_push(push)? {
                self.pending.push(event);
            }
        }
        result
    }

    async fn await_reply(
        &mut self,
        conn: &Connection,
        request: Request,
        later: &mut Vec<Push>,
    ) -> Result<Result<Reply, ConnError>, ClientError> {
        let reply = conn.request(request);
        tokio::pin!(reply);
        loop {
            let Some(rx) = self.pushes.as_mut() else {
                // No pushes (or no more): just the reply.
                return Ok(reply.await);
            };
            let push = tokio::select! {
                biased;
                result = &mut reply => {
                    // The server writes the pushes queued before a reply
                    // ahead of it (docs/protocol.md §4), so the envelopes
                    // that the reply waited for (the other side writing to
                    // us at the same moment) are queued here by now: the
                    // connection's reader hands frames over in stream
                    // order. Keep and acknowledge them too: left for later,
                    // their senders would wait the server's grace for our
                    // acknowledgement.
                    // Only those already there: pushes that keep coming do
                    // not hold the reply back.
                    let queued = self.pushes.as_ref().map_or(0, mpsc::Receiver::len);
                    for _ in 0..queued {
                        let Some(push) = self.pushes.as_mut().and_then(|rx| rx.try_recv().ok())
                        else {
                            break;
                        };
                        if !matches!(self.keep_push(conn, push, later).await, Ok(Ok(()))) {
                            // Not acknowledged (the server delivers it again)
                            // or not kept: the reply in hand still counts.
                            break;
                        }
                    }
                    return Ok(result);
                }
                push = rx.recv() => push,
            };
            match push {
                Some(push) => {
                    if let Err(e) = self.keep_push(conn, push, later).await? {
                        return Ok(Err(e));
                    }
                }
                None => return Ok(reply.await),
            }
        }
    }

    /// Keeps an envelope pushed while a reply is awaited and acknowledges
    /// it with a notification; other pushes are put in `later`.
    async fn keep_push(
        &mut self,
        conn: &Connection,
        push: Push,
        later: &mut Vec<Push>,
    ) -> Result<Result<(), ConnError>, ClientError> {
        let Push::Envelope(envelope) = push else {
            later.push(push);
            return Ok(Ok(()));
        };
        if let Some(event) = self.receive(&envelope)? {
            self.pending.push(event);
        }
        // Kept (or dropped as a duplicate or unreadable, as `handle_push`
        // does): acknowledge it, unanswered.
        Ok(conn
            .notify(Request::Ack {
                seqs: vec![envelope.seq],
            })
            .await)
    }

    /// Tops up one-time prekeys and rotates the signed prekey; failures are
    /// kept as warnings, not errors: the command the user asked for goes on.
    async fn upkeep(&mut self, on_server: u32) {
        if let Err(e) = self.try_upkeep(on_server).await {
            self.pending
                .push(Event::Warning(Warning::Upkeep(one_line(&e))));
        }
    }

    async fn try_upkeep(&mut self, on_server: u32) -> Result<(), ClientError> {
        if on_server < PREKEY_LOW_WATER {
            let publics = self
                .engine
                .one_time_prekeys(PREKEY_TARGET - on_server, &mut rand::rng())?;
            self.conn()?
                .request(Request::UploadPrekeys {
                    one_time_prekeys: publics,
                })
                .await?;
        }
        if let Some(upload) = self
            .engine
            .rotate_signed_prekey_if_due(&mut rand::rng(), now())?
        {
            self.conn()?
                .request(Request::RotateSignedPrekey {
                    signed_prekey: upload.signed_prekey,
                })
                .await?;
            self.engine.confirm_signed_prekey(upload.id)?;
        }
        Ok(())
    }

    /// Compares `user`'s directory entry with the key on record (recording
    /// it on first sight) and returns the warning to show, if any.
    async fn check_identity(&mut self, user: &Username) -> Result<Option<Warning>, ClientError> {
        let info = self.lookup(user).await?;
        let identity = PublicIdentity::from_bytes(&info.identity)
            .map_err(|_| ClientError::UnexpectedReply("lookup"))?;
        Ok(self.observe(user, &identity)?)
    }

    fn observe(
        &mut self,
        user: &Username,
        identity: &PublicIdentity,
    ) -> Result<Option<Warning>, EngineError> {
        Ok(match self.engine.observe_identity(user, identity, now())? {
            KeyStatus::Changed { was_verified } => Some(Warning::KeyChanged {
                user: user.to_string(),
                was_verified,
            }),
            _ => None,
        })
    }

    async fn lookup(&mut self, user: &Username) -> Result<UserInfo, ClientError> {
        let reply = self
            .conn()?
            .request(Request::Lookup {
                username: user.as_str().to_owned(),
            })
            .await;
        match reply {
            Ok(Reply::User(info)) => Ok(info),
            Ok(_) => Err(ClientError::UnexpectedReply("lookup")),
            Err(ConnError::Server(ErrorCode::UserNotExist)) => Err(ClientError::UnknownUser {
                user: user.to_string(),
                server: self.server.address.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Queues the standing warning about `user` (their key changed and has
    /// not been verified since), if any.
    fn warn_if_changed(&mut self, user: &Username) -> Result<(), ClientError> {
        if let Some(contact) = self.engine.contact(user)?
            && contact.key_changed
        {
            self.pending.push(Event::Warning(Warning::KeyChanged {
                user: user.to_string(),
                was_verified: contact.blocked,
            }));
        }
        Ok(())
    }

    /// Encrypts `text` for `to` and sends it; see the [module](self) docs
    /// for the order of saving and sending.
    ///
    /// # Errors
    ///
    /// [`ClientError::UnknownUser`]; [`ClientError::Engine`] when `to` is
    /// blocked (a verified contact whose key changed) — nothing is saved or
    /// sent; [`ClientError::Queued`] when the message is saved but the
    /// server could not be reached; [`ClientError::Connect`] when the server
    /// cannot be reached for a first message (the recipient's keys are
    /// needed, nothing is saved).
    pub async fn send(&mut self, to: &str, text: &str) -> Result<Sent, ClientError> {
        let to = username(to)?;
        let was_connected = self.is_connected();
        let ready = match self.connect().await {
            // Messages a send could not deliver while connected are still in
            // the outbox: they go first, so the order holds.
            Ok(_) if was_connected => self.flush_outbox().await,
            other => other,
        };
        let flushed = match ready {
            Ok(flushed) => flushed,
            Err(e) if !self.engine.needs_bundle(&to)? => {
                // Offline, but a session exists: save it for the next run.
                let id = self.save_for_later(&to, text)?;
                return Err(ClientError::Queued {
                    user: to.to_string(),
                    reason: format!("{}; id {id}", one_line(&e)),
                });
            }
            Err(e) => return Err(e),
        };
        match self.check_identity(&to).await? {
            Some(w) => self.pending.push(Event::Warning(w)),
            None => self.warn_if_changed(&to)?,
        }
        let bundle = if self.engine.needs_bundle(&to)? {
            Some(self.fetch_bundle(&to).await?)
        } else {
            None
        };
        let entry =
            self.engine
                .prepare_send(&to, bundle.as_ref(), text, &mut rand::rng(), now())?;
        if let Err(e) = self.deliver(&entry).await {
            return Err(match e {
                e @ ClientError::UnknownUser { .. } => e,
                e => ClientError::Queued {
                    user: to.to_string(),
                    reason: one_line(&e),
                },
            });
        }
        Ok(Sent {
            id: hex(&entry.id),
            flushed,
        })
    }

    /// Saves a message for `to` in the outbox without connecting, for a
    /// caller that knows the server is out of reach (`chat` between its
    /// tries to connect again); it goes out, in order, with the next
    /// connection. Returns its id (hex).
    ///
    /// # Errors
    ///
    /// [`ClientError::NeedsServer`] for a first message (the recipient's
    /// keys come from the server); as [`Client::send`] for a blocked
    /// contact or a storage failure.
    pub fn send_later(&mut self, to: &str, text: &str) -> Result<String, ClientError> {
        let to = username(to)?;
        if self.engine.needs_bundle(&to)? {
            return Err(ClientError::NeedsServer {
                user: to.to_string(),
            });
        }
        self.save_for_later(&to, text)
    }

    /// Encrypts a message for `to` over the existing session and keeps it in
    /// the outbox; its id (hex).
    fn save_for_later(&mut self, to: &Username, text: &str) -> Result<String, ClientError> {
        self.warn_if_changed(to)?;
        let entry = self
            .engine
            .prepare_send(to, None, text, &mut rand::rng(), now())?;
        Ok(hex(&entry.id))
    }

    async fn fetch_bundle(&mut self, to: &Username) -> Result<VerifiedBundle, ClientError> {
        let reply = self
            .conn()?
            .request(Request::FetchBundle {
                username: to.as_str().to_owned(),
            })
            .await;
        let (identity, signed_prekey, one_time_prekey) = match reply {
            Ok(Reply::Bundle {
                identity,
                signed_prekey,
                one_time_prekey,
            }) => (identity, signed_prekey, one_time_prekey),
            Ok(_) => return Err(ClientError::UnexpectedReply("fetch bundle")),
            Err(ConnError::Server(ErrorCode::UserNotExist)) => {
                return Err(ClientError::UnknownUser {
                    user: to.to_string(),
                    server: self.server.address.clone(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let bundle = parse_bundle(&identity, &signed_prekey, one_time_prekey.as_deref())?;
        if let Some(w) = self.observe(to, bundle.identity())? {
            self.pending.push(Event::Warning(w));
        }
        Ok(bundle)
    }

    /// Fetches, decrypts and stores every waiting message, acknowledging
    /// each to the server only after it is stored. Returns the messages and
    /// other events in order.
    ///
    /// # Errors
    ///
    /// [`ClientError::Connect`] and request errors; a message that cannot
    /// be decrypted is a [`Warning`] event, not an error.
    pub async fn pull(&mut self) -> Result<Vec<Event>, ClientError> {
        self.connect().await?;
        let mut events = std::mem::take(&mut self.pending);
        let mut after = 0;
        loop {
            let reply = self
                .conn()?
                .request(Request::Pull {
                    after,
                    max: MAX_PULL,
                })
                .await?;
            let Reply::Envelopes { envelopes, more } = reply else {
                return Err(ClientError::UnexpectedReply("pull"));
            };
            let mut acks = Vec::with_capacity(envelopes.len());
            for envelope in envelopes {
                after = after.max(envelope.seq);
                acks.push(envelope.seq);
                if let Some(event) = self.receive(&envelope)? {
                    events.push(event);
                }
            }
            if !acks.is_empty() {
                self.conn()?.request(Request::Ack { seqs: acks }).await?;
            }
            if !more {
                break;
            }
        }
        // Pushes that came during the pull: an envelope pushed after its
        // commit is a duplicate of one pulled (the engine drops it), one
        // delivered live is not in the mailbox at all, and its sender waits
        // for the acknowledgement; every envelope kept is acknowledged.
        // Other pushes are kept as events.
        let kept = self.drain_pushes(&mut events)?;
        for seqs in kept.chunks(MAX_ACKS) {
            self.conn()?
                .notify(Request::Ack {
                    seqs: seqs.to_vec(),
                })
                .await?;
        }
        Ok(events)
    }

    /// Decrypts and stores one envelope; `None` for a duplicate.
    fn receive(&mut self, envelope: &Envelope) -> Result<Option<Event>, ClientError> {
        match self.engine.receive(envelope, &mut rand::rng(), now()) {
            Ok(Received::Message(received)) => {
                if let Some(NewSession {
                    key_status: KeyStatus::Changed { was_verified },
                    ..
                }) = received.new_session
                {
                    self.pending.push(Event::Warning(Warning::KeyChanged {
                        user: envelope.from.clone(),
                        was_verified,
                    }));
                }
                Ok(Some(Event::Message(Message {
                    from: envelope.from.clone(),
                    text: received.entry.text,
                    id: hex(&envelope.id),
                    sent_at: envelope.sent_at,
                })))
            }
            Ok(Received::Duplicate) => Ok(None),
            Err(e @ EngineError::Store(_)) => Err(e.into()),
            Err(e) => Ok(Some(Event::Warning(Warning::Undecryptable {
                from: envelope.from.clone(),
                reason: one_line(&e),
            }))),
        }
    }

    /// Handles the pushes queued now; returns the seqs of the envelopes
    /// among them, kept (stored, or dropped as duplicates or unreadable,
    /// as [`Client::handle_push`] does) and to be acknowledged.
    fn drain_pushes(&mut self, events: &mut Vec<Event>) -> Result<Vec<u64>, ClientError> {
        let mut pushes = Vec::new();
        if let Some(rx) = self.pushes.as_mut() {
            while let Ok(push) = rx.try_recv() {
                pushes.push(push);
            }
        }
        let mut kept = Vec::new();
        for push in pushes {
            let seq = match &push {
                Push::Envelope(e) => Some(e.seq),
                _ => None,
            };
            if let Some(event) = self.on_push(push)? {
                events.push(event);
            }
            kept.extend(seq);
        }
        events.append(&mut self.pending);
        Ok(kept)
    }

    /// Turns one push into an event, storing (and acknowledging) an
    /// envelope first.
    fn on_push(&mut self, push: Push) -> Result<Option<Event>, ClientError> {
        Ok(match push {
            Push::Envelope(envelope) => self.receive(&envelope)?,
            Push::Presence {
                username, online, ..
            } => Some(Event::Presence {
                user: username,
                online,
            }),
            Push::FriendRequest { from } => Some(Event::FriendRequest { from }),
            Push::FriendAnswer { from, accepted } => Some(Event::FriendAnswer { from, accepted }),
            Push::FriendRemoved { from } => Some(Event::FriendRemoved { from }),
            Push::Announcement(a) => {
                let key = self.conn.as_ref().map(Connection::server_key);
                Some(match key {
                    Some(key) if announcement_is_genuine(&key, &a) => {
                        Event::Announcement { text: a.text }
                    }
                    _ => Event::Warning(Warning::BadAnnouncement),
                })
            }
            Push::Replaced => Some(Event::Disconnected {
                reason: "this user logged in elsewhere".to_owned(),
            }),
            _ => None,
        })
    }

    /// Waits for the next push while online (for `chat`); `None` once the
    /// connection has ended (then [`Client::disconnect_reason`] says why).
    /// Cancel-safe: a push is either returned or still queued.
    pub async fn next_push(&mut self) -> Option<Push> {
        let rx = self.pushes.as_mut()?;
        rx.recv().await
    }

    /// Why the connection ended ([`fmt::Display`] says it in words), and
    /// forgets it: the next command, or [`Client::connect`], connects again.
    pub fn disconnect_reason(&mut self) -> ClosedReason {
        self.pushes = None;
        let reason = self
            .conn
            .as_ref()
            .and_then(Connection::close_reason)
            .unwrap_or_else(|| ClosedReason::Lost("the connection ended".to_owned()));
        self.conn = None;
        reason
    }

    /// Whether a connection is open (it may still turn out to have ended:
    /// then [`Client::next_push`] returns `None`).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Handles one push from [`Client::next_push`]: an envelope is stored,
    /// then acknowledged (a notification: no reply is awaited). Returns the
    /// events to show, warnings first.
    ///
    /// # Errors
    ///
    /// Storage failures, and a connection that ended before the
    /// acknowledgement could be queued.
    pub async fn handle_push(&mut self, push: Push) -> Result<Vec<Event>, ClientError> {
        let seq = match &push {
            Push::Envelope(e) => Some(e.seq),
            Push::PrekeysLow { remaining } => {
                // Others took one-time prekeys while I am online.
                self.upkeep(*remaining).await;
                None
            }
            _ => None,
        };
        let event = self.on_push(push)?;
        if let Some(seq) = seq {
            // A notification: the chat goes on without waiting a round trip
            // for an `Ok` it has no use for.
            self.conn()?
                .notify(Request::Ack { seqs: vec![seq] })
                .await?;
        }
        let mut events = std::mem::take(&mut self.pending);
        events.extend(event);
        Ok(events)
    }

    /// Events gathered while doing something else (upkeep warnings, pushes
    /// read during a pull), to show now.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.pending)
    }

    /// The last `limit` messages with `user`, oldest first.
    ///
    /// # Errors
    ///
    /// [`ClientError::Engine`] on a storage failure.
    pub fn history(&mut self, user: &str, limit: usize) -> Result<Vec<HistoryEntry>, ClientError> {
        let user = username(user)?;
        self.warn_if_changed(&user)?;
        Ok(self.engine.history(&user, limit)?)
    }

    /// Who is online (as the server's policy lets me see).
    ///
    /// # Errors
    ///
    /// Connection and request errors.
    pub async fn users(&mut self) -> Result<Vec<UserInfo>, ClientError> {
        self.connect().await?;
        let mut users: Vec<UserInfo> = Vec::new();
        loop {
            let after = users.last().map(|u| u.username.clone());
            let Reply::UsersPage { users: page, more } = self
                .conn()?
                .request(Request::UsersAfter {
                    after: after.clone(),
                })
                .await?
            else {
                return Err(ClientError::UnexpectedReply("users"));
            };
            // Names must rise strictly, from past the last page on: a
            // faulty server can then neither repeat anyone nor keep this
            // loop going.
            let mut last = after.as_deref();
            for u in &page {
                if last.is_some_and(|l| u.username.as_str() <= l) {
                    return Err(ClientError::UnexpectedReply("users"));
                }
                last = Some(&u.username);
            }
            let done = !more || page.is_empty();
            users.extend(page);
            if done || users.len() >= MAX_USERS_LISTED {
                break;
            }
        }
        // The listing carries identity keys: compare those of contacts.
        for user in &users {
            let (Ok(name), Ok(identity)) = (
                Username::parse(&user.username),
                PublicIdentity::from_bytes(&user.identity),
            ) else {
                continue;
            };
            if name != *self.engine.me()
                && self.engine.contact(&name)?.is_some()
                && let Some(w) = self.observe(&name, &identity)?
            {
                self.pending.push(Event::Warning(w));
            }
        }
        Ok(users)
    }

    /// A friend request, answer or removal.
    ///
    /// # Errors
    ///
    /// The server's typed errors (`user_not_exist`, `already_friend`,
    /// `not_friend`, `not_permitted`).
    pub async fn friend(&mut self, action: FriendAction, user: &str) -> Result<(), ClientError> {
        let name = username(user)?.as_str().to_owned();
        self.connect().await?;
        let request = match action {
            FriendAction::Add => Request::FriendRequest { username: name },
            FriendAction::Accept => Request::FriendAccept { username: name },
            FriendAction::Decline => Request::FriendDecline { username: name },
            FriendAction::Remove => Request::FriendRemove { username: name },
        };
        match self.conn()?.request(request).await {
            Ok(_) => Ok(()),
            Err(ConnError::Server(ErrorCode::UserNotExist)) => Err(ClientError::UnknownUser {
                user: user.to_owned(),
                server: self.server.address.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Friends (with presence) and pending requests both ways.
    ///
    /// # Errors
    ///
    /// Connection and request errors.
    pub async fn friends(&mut self) -> Result<Friends, ClientError> {
        self.connect().await?;
        match self.conn()?.request(Request::FriendList).await? {
            Reply::Friends {
                friends,
                incoming,
                outgoing,
            } => Ok(Friends {
                friends,
                incoming,
                outgoing,
            }),
            _ => Err(ClientError::UnexpectedReply("friend list")),
        }
    }

    /// The safety number shared with `user`, from the key on record, or
    /// from the directory (recorded on first sight) when the server can be
    /// reached; the directory's key is compared with the record either way.
    ///
    /// # Errors
    ///
    /// [`ClientError::UnknownUser`]; connection errors when there is no key
    /// on record and the server cannot be reached.
    pub async fn safety_number(&mut self, user: &str) -> Result<Safety, ClientError> {
        let name = username(user)?;
        let mut warnings = Vec::new();
        match self.connect().await {
            Ok(_) => match self.check_identity(&name).await? {
                Some(w) => warnings.push(w),
                None => {
                    self.warn_if_changed(&name)?;
                    warnings.extend(self.pending.drain(..).filter_map(|e| match e {
                        Event::Warning(w) => Some(w),
                        _ => None,
                    }));
                }
            },
            Err(e) if self.engine.contact(&name)?.is_none() => return Err(e),
            Err(_) => {}
        }
        let number: SafetyNumber = self.engine.safety_number(&name)?;
        let contact = self.engine.contact(&name)?;
        Ok(Safety {
            user: name.to_string(),
            grouped: number.to_string(),
            digits: number.digits().to_owned(),
            verified: contact.is_some_and(|c| c.verified && !c.key_changed),
            warnings,
        })
    }

    /// Marks `user` verified if `number` (60 digits, spaces ignored) is the
    /// safety number shared with them.
    ///
    /// # Errors
    ///
    /// [`ClientError::BadSafetyNumber`] for a malformed number;
    /// [`ClientError::Engine`] when it does not match (nothing changes).
    pub fn verify(&mut self, user: &str, number: &str) -> Result<(), ClientError> {
        let name = username(user)?;
        let digits: String = number.chars().filter(|c| !c.is_whitespace()).collect();
        if digits.len() != 60 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ClientError::BadSafetyNumber);
        }
        Ok(self.engine.verify(&name, &digits)?)
    }

    /// Closes the connection, if any, letting the server see it end.
    /// Pushes not yet handled are dropped unacknowledged: the server
    /// delivers them again at the next login.
    pub async fn close(mut self) {
        // Pushes not handled by now are not acknowledged either: the server
        // keeps them for the next login. Dropping their receiver first lets
        // the connection's reader discard the rest instead of waiting, behind
        // a full buffer, for room that would never come (and the close with
        // it, for its whole timeout).
        drop(self.pushes.take());
        if let Some(conn) = self.conn.take() {
            conn.close().await;
        }
    }
}

/// A friend operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FriendAction {
    /// Ask.
    Add,
    /// Accept a request.
    Accept,
    /// Decline a request.
    Decline,
    /// Stop being friends.
    Remove,
}

/// Friends and requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Friends {
    /// Friends, with presence.
    pub friends: Vec<UserInfo>,
    /// Requests waiting for my answer.
    pub incoming: Vec<String>,
    /// My requests waiting for theirs.
    pub outgoing: Vec<String>,
}

/// Parses and verifies a bundle from the directory (the signed prekey's
/// signature under the identity key; weak keys refused).
fn parse_bundle(
    identity: &[u8],
    signed_prekey: &[u8],
    one_time_prekey: Option<&[u8]>,
) -> Result<VerifiedBundle, ClientError> {
    let bad = |_| ClientError::BadBundle;
    let identity = PublicIdentity::from_bytes(identity).map_err(bad)?;
    let spk = SignedPrekey::from_bytes(signed_prekey).map_err(bad)?;
    let opk = one_time_prekey
        .map(OneTimePrekey::from_bytes)
        .transpose()
        .map_err(bad)?;
    VerifiedBundle::verify(identity, spk, opk).map_err(bad)
}

/// Whether `a` is signed by `server_key` (the key from the connection's
/// hello, learned over the pinned TLS connection), as
/// `announcement_signed_bytes` under the announcement signing context.
fn announcement_is_genuine(server_key: &[u8; 32], a: &SignedAnnouncement) -> bool {
    let Ok(key) = IdentityKey::from_bytes(server_key) else {
        return false;
    };
    let Ok(signature) = <[u8; 64]>::try_from(a.signature.as_slice()) else {
        return false;
    };
    key.verify(
        SigningContext::Announcement,
        &announcement_signed_bytes(a.issued_at, &a.text),
        &signature,
    )
    .is_ok()
}

/// An error and its causes on one line.
fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use messenger_crypto::identity::IdentityKeyPair;
    use rand::SeedableRng as _;

    use super::*;

    /// T-77: only the server's key, over exactly these bytes, passes.
    #[test]
    fn announcements_must_carry_the_server_signature() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(77);
        let server = IdentityKeyPair::generate(&mut rng);
        let other = IdentityKeyPair::generate(&mut rng);
        let key = server.identity_key().to_bytes();
        let signed = |by: &IdentityKeyPair, text: &str| SignedAnnouncement {
            issued_at: 5,
            text: text.to_owned(),
            signature: by
                .sign(
                    SigningContext::Announcement,
                    &announcement_signed_bytes(5, text),
                )
                .to_vec(),
        };
        let good = signed(&server, "maintenance at noon");
        assert!(announcement_is_genuine(&key, &good));
        assert!(!announcement_is_genuine(
            &key,
            &signed(&other, "maintenance at noon")
        ));
        let mut changed = good.clone();
        changed.text.push('!');
        assert!(!announcement_is_genuine(&key, &changed));
        let mut later = good.clone();
        later.issued_at += 1;
        assert!(!announcement_is_genuine(&key, &later));
        for i in 0..good.signature.len() * 8 {
            let mut flipped = good.clone();
            flipped.signature[i / 8] ^= 1 << (i % 8);
            assert!(!announcement_is_genuine(&key, &flipped), "bit {i}");
        }
        let mut short = good;
        short.signature.pop();
        assert!(!announcement_is_genuine(&key, &short));
    }
}

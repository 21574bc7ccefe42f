//! The running server: the [`Service`] behind the network layer's
//! [`Handler`], the server signing key, and the startup and shutdown steps the
//! `rendezvous` binary performs.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use messenger_crypto::identity::{IdentityKeyPair, SigningContext};
use messenger_proto::ErrorCode;
use messenger_proto::msg::{Push, Reply, Request};
use zeroize::Zeroizing;

use crate::handler::{
    CloseReason, ConnectionContext, Handler, PendingReply, PushFrame, PushSender,
};
use crate::server::{Server, ServerConfig, ServerError, ServerHandle};
use crate::service::{PushTarget, Service, ServiceConfig, Session, system_clock};
use crate::store::{Store, StoreError, StoreOptions};

/// File of the server signing key (Ed25519 seed and an X25519 secret, 64
/// bytes, mode 0600) in the data directory. It signs announcements.
pub const SERVER_KEY_FILE: &str = "server.key";
/// File of the redb database in the data directory.
pub const DATABASE_FILE: &str = "rendezvous.redb";

impl PushTarget for PushSender {
    fn push(&self, push: Push) -> bool {
        PushSender::push(self, push).is_ok()
    }

    fn push_frame(&self, frame: PushFrame) -> bool {
        PushSender::push_frame(self, frame).is_ok()
    }

    fn close(&self, _reason: &'static str) {
        self.disconnect(CloseReason::Replaced);
    }
}

/// The service as the network layer's handler.
#[derive(Debug)]
pub struct App {
    service: Arc<Service<PushSender>>,
    server_key: [u8; 32],
}

impl App {
    /// Wraps a service whose announcements are signed by `server_key`.
    pub fn new(service: Arc<Service<PushSender>>, server_key: [u8; 32]) -> Self {
        Self {
            service,
            server_key,
        }
    }
}

impl Handler for App {
    type Session = Session<PushSender>;

    fn server_key(&self) -> [u8; 32] {
        self.server_key
    }

    fn on_connect(&self, ctx: &ConnectionContext) -> Self::Session {
        self.service
            .connect(ctx.id, ctx.nonce, ctx.exporter, ctx.pushes.clone())
    }

    async fn handle(
        &self,
        ctx: &mut ConnectionContext,
        session: &mut Self::Session,
        request: Request,
    ) -> Result<Reply, ErrorCode> {
        let reply = self.service.handle(session, request).await;
        note_user(ctx, session);
        reply
    }

    fn pipelines(&self, request: &Request) -> bool {
        Service::<PushSender>::pipelines(request)
    }

    fn begins_ahead(&self, request: &Request) -> bool {
        Service::<PushSender>::begins_ahead(request)
    }

    fn rate_exempt(&self, request: &Request) -> bool {
        Service::<PushSender>::rate_exempt(request)
    }

    async fn begin(
        &self,
        ctx: &mut ConnectionContext,
        session: &mut Self::Session,
        request: Request,
    ) -> PendingReply {
        let reply = self.service.begin(session, request).await;
        note_user(ctx, session);
        reply
    }

    async fn on_disconnect(&self, _ctx: &ConnectionContext, session: Self::Session) {
        self.service.disconnect(&session);
    }
}

/// Copies the session's user into the context for logs, only when it
/// changed (login): not an allocation per request.
fn note_user(ctx: &mut ConnectionContext, session: &Session<PushSender>) {
    if ctx.user.as_deref() != session.user() {
        ctx.user = session.user().map(str::to_owned);
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The data directory or the key file could not be used.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The key file exists but is not a server key.
    #[error("{path} is not a server key (64 bytes expected); restore it from a backup")]
    BadKey {
        /// Where.
        path: PathBuf,
    },
    /// The key file could not be written.
    #[error("server key: {0}")]
    KeyFile(#[source] crate::tls::TlsError),
    /// The database could not be opened.
    #[error("database {path}: {source}")]
    Store {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The network layer could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// File in the data directory holding the bound address of the running
/// server and, on a second line, the fingerprint of the certificate it
/// serves, for `rendezvous announce`.
pub const ADDRESS_FILE: &str = "rendezvous.addr";

/// Loads the server's secret key bytes (64: an Ed25519 seed and an X25519
/// secret), creating them (mode 0600) on first start.
pub fn load_or_create_server_secret(data_dir: &Path) -> Result<Zeroizing<[u8; 64]>, StartError> {
    let path = data_dir.join(SERVER_KEY_FILE);
    let io = |action, source| StartError::Io {
        action,
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let mut out = Zeroizing::new([0u8; 64]);
            if bytes.len() != 64 {
                return Err(StartError::BadKey { path });
            }
            out.copy_from_slice(&bytes);
            Ok(out)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir).map_err(|e| io("create", e))?;
            let mut secret = Zeroizing::new([0u8; 64]);
            rand::fill(&mut secret[..]);
            match crate::tls::write_new_file(data_dir, &path, &secret[..], 0o600) {
                Ok(()) => Ok(secret),
                // Another process (a starting server, `rendezvous invite`)
                // created it first: use that key, never replace it.
                Err(_) if path.exists() => load_or_create_server_secret(data_dir),
                Err(e) => Err(StartError::KeyFile(e)),
            }
        }
        Err(e) => Err(io("read", e)),
    }
}

/// The server signing key from its secret bytes.
pub fn server_key_pair(secret: &[u8; 64]) -> IdentityKeyPair {
    let mut ed = [0u8; 32];
    let mut x = [0u8; 32];
    ed.copy_from_slice(&secret[..32]);
    x.copy_from_slice(&secret[32..]);
    let key = IdentityKeyPair::from_secret_bytes(&ed, &x);
    zeroize::Zeroize::zeroize(&mut ed);
    zeroize::Zeroize::zeroize(&mut x);
    key
}

/// How often expired envelopes are purged: often enough that a 30-day
/// lifetime is kept to within minutes, rarely enough to cost nothing.
pub const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Most [`Store::compact_segments`] calls per purge round (16 MiB of bodies
/// each): a round never runs for long, and what is left waits for the next.
pub const COMPACT_CALLS_PER_ROUND: usize = 16;

/// Purges expired envelopes now and every [`PURGE_INTERVAL`] until the store
/// is dropped, then moves the few bodies left in mostly empty segment files
/// so those files can go ([`Store::compact_segments`]). Call inside a tokio
/// runtime.
pub fn spawn_purger(store: Store) {
    spawn_purger_every(store, PURGE_INTERVAL);
}

/// [`spawn_purger`], every `interval` (tests use a short one).
fn spawn_purger_every(store: Store, interval: std::time::Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let store = store.clone();
            let purged = tokio::task::spawn_blocking(move || {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let mut total = 0u64;
                loop {
                    let purged = store.purge_expired(now)?;
                    total += u64::from(purged.envelopes);
                    if !purged.more {
                        break;
                    }
                }
                let mut freed = 0usize;
                for _ in 0..COMPACT_CALLS_PER_ROUND {
                    let compacted = store.compact_segments()?;
                    freed += compacted.segments;
                    if !compacted.more {
                        break;
                    }
                }
                Ok::<_, crate::store::StoreError>((total, freed))
            })
            .await;
            match purged {
                Ok(Ok((0, 0))) => {}
                Ok(Ok((envelopes, segments))) => tracing::info!(
                    envelopes,
                    segments,
                    "purged expired envelopes, compacted segment files"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "purging or compacting failed"),
                Err(_) => tracing::warn!("purge task failed"),
            }
        }
    });
}

/// Everything a running server holds.
#[derive(Debug)]
pub struct Running {
    /// The network layer.
    pub handle: ServerHandle,
    /// The service (and through it the store).
    pub service: Arc<Service<PushSender>>,
    /// The server's public signing key.
    pub server_key: [u8; 32],
}

/// Opens the store, makes the keys, binds and serves. Call inside a tokio runtime.
pub fn start(
    config: ServerConfig,
    mut service_config: ServiceConfig,
    store_options: StoreOptions,
) -> Result<Running, StartError> {
    fs::create_dir_all(&config.data_dir).map_err(|source| StartError::Io {
        action: "create",
        path: config.data_dir.clone(),
        source,
    })?;
    let secret = load_or_create_server_secret(&config.data_dir)?;
    let server_key = server_key_pair(&secret).identity_key().to_bytes();
    service_config.invite_key = Some(crate::invite::invite_key(&secret[..]));
    let db = config.data_dir.join(DATABASE_FILE);
    let store = Store::open(&db, store_options).map_err(|source| StartError::Store {
        path: db.clone(),
        source,
    })?;
    spawn_purger(store.clone());
    let service = Arc::new(Service::new(
        store,
        service_config,
        Some(server_key),
        system_clock(),
    ));
    let data_dir = config.data_dir.clone();
    let handle = Server::spawn(config, App::new(Arc::clone(&service), server_key))?;
    // Best effort: only `rendezvous announce` reads it. The certificate's
    // fingerprint too, as it may be a CA-issued one (`--cert`) rather than
    // the self-signed one in the data directory.
    let _ = fs::write(
        data_dir.join(ADDRESS_FILE),
        format!("{}\n{}\n", handle.local_addr(), handle.fingerprint()),
    );
    Ok(Running {
        handle,
        service,
        server_key,
    })
}

/// Signs an announcement with the server key from `data_dir`.
pub fn sign_announcement(
    key: &IdentityKeyPair,
    issued_at: u64,
    text: &str,
) -> messenger_proto::msg::SignedAnnouncement {
    let bytes = messenger_proto::msg::announcement_signed_bytes(issued_at, text);
    messenger_proto::msg::SignedAnnouncement {
        issued_at,
        text: text.to_owned(),
        signature: key.sign(SigningContext::Announcement, &bytes).to_vec(),
    }
}

/// The address to print: the bound one.
pub fn listening_line(addr: SocketAddr) -> String {
    format!("listening on {addr}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewEnvelope, StoreOptions};

    /// The purger removes what has expired, on its first round and on
    /// later ones, and keeps the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_purger_removes_expired_envelopes_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            envelope_ttl_secs: 3,
            ..StoreOptions::default()
        };
        let store = Store::open(&dir.path().join("db.redb"), options).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let envelope = |recipient: &str, id: u8, sent_at: u64| NewEnvelope {
            recipient: recipient.to_owned(),
            sender: "alice".to_owned(),
            group: None,
            message_id: [id; 16],
            sent_at,
            body: vec![id; 100],
        };
        for name in ["alice", "bob", "carol", "dave"] {
            store
                .create_account(crate::store::tests::account(name), Vec::new())
                .unwrap();
        }
        // Expired already; fresh (expires in 3 s); for a long time.
        let appended = store.append(vec![
            envelope("bob", 1, now - 60),
            envelope("carol", 2, now),
            envelope("dave", 3, now + 3_600),
        ]);
        assert!(appended.iter().all(Result::is_ok), "{appended:?}");
        spawn_purger_every(store.clone(), std::time::Duration::from_millis(200));
        let gone = |who: &str| store.mailbox_usage(who).unwrap().0 == 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !(gone("bob") && gone("carol")) {
            assert!(
                std::time::Instant::now() < deadline,
                "not purged: bob {:?}, carol {:?}",
                store.mailbox_usage("bob"),
                store.mailbox_usage("carol")
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(store.mailbox_usage("dave").unwrap().0, 1);
    }

    /// Several processes creating the key at once all end up with the same
    /// key (none replaces another's), and later loads return it.
    #[test]
    fn server_key_created_once_even_under_races() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let keys: Vec<[u8; 64]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| *load_or_create_server_secret(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(*load_or_create_server_secret(&path).unwrap(), keys[0]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(path.join(SERVER_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::write(path.join(SERVER_KEY_FILE), [0u8; 63]).unwrap();
        assert!(matches!(
            load_or_create_server_secret(&path),
            Err(StartError::BadKey { .. })
        ));
    }
}

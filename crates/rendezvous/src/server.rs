//! Starting and stopping a server: [`Server::spawn`] binds the UDP socket,
//! loads or creates the TLS identity and runs the accept loop on the
//! current tokio runtime; the [`ServerHandle`] it returns stops the server
//! when dropped or shut down.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::handler::{CloseReason, Handler};
use crate::limits::Limits;
use crate::net::{self, Shared};
use crate::tls::{ServerIdentity, TlsError, certificate_fingerprint};

/// Send and receive buffer asked for the server's UDP socket: 4 MiB.
///
/// Linux's default (208 KiB on the bench machine) overflowed under relay
/// load: 1,000 clients with a few KiB in flight each arrive in bursts of
/// megabytes, a full buffer drops datagrams, and QUIC resends them only
/// after a loss timeout (docs/benchmarks.md §3: tens of thousands of drops
/// per run, p99 of seconds). The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max`; a smaller grant is not an error.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Binds the server's UDP socket at `addr`, asking for
/// [`UDP_SOCKET_BUFFER`] bytes of receive and send buffer.
///
/// # Errors
///
/// The bind's error.
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Capped by the kernel's maximum; whatever is granted is used.
    let _ = state.set_recv_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
    Ok(socket)
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The self-signed identity in the data directory is unusable.
    #[error("cannot load the server's TLS identity")]
    Identity(#[from] TlsError),
    /// A certificate or key PEM file given by the operator is unusable.
    #[error("cannot use {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong (never key material).
        reason: &'static str,
    },
    /// rustls refused the certificate or key.
    #[error("the TLS configuration was refused")]
    Tls(#[source] rustls::Error),
    /// A limit or setting cannot be used.
    #[error("invalid server setting: {0}")]
    Config(&'static str),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// [`Server::spawn`] was called outside a tokio runtime.
    #[error("the server must be started inside a tokio runtime")]
    NoRuntime,
}

/// What a server needs to start.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerConfig {
    /// UDP address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Directory of the server's state; the self-signed certificate is kept
    /// here.
    pub data_dir: PathBuf,
    /// Network limits.
    pub limits: Limits,
    /// A CA-issued certificate chain and key (PEM files) to use instead of
    /// the self-signed certificate.
    pub cert: Option<(PathBuf, PathBuf)>,
}

impl ServerConfig {
    /// A configuration with default limits and the self-signed certificate.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            limits: Limits::default(),
            cert: None,
        }
    }
}

/// Starts servers.
#[derive(Debug)]
#[non_exhaustive]
pub struct Server;

impl Server {
    /// Binds `config.listen`, loads or creates the TLS identity and spawns
    /// the accept loop on the current tokio runtime, serving requests with
    /// `handler`.
    ///
    /// # Errors
    ///
    /// [`ServerError`] if the identity, certificate, settings or socket
    /// cannot be used, or there is no runtime.
    pub fn spawn<H: Handler>(
        config: ServerConfig,
        handler: H,
    ) -> Result<ServerHandle, ServerError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ServerError::NoRuntime)?;
        let (chain, key) = match &config.cert {
            Some((cert, key)) => net::load_pem_pair(cert, key)?,
            None => {
                let identity = ServerIdentity::load_or_create(&config.data_dir)?;
                (
                    vec![identity.cert_der().clone()],
                    identity.key_der().to_rustls(),
                )
            }
        };
        let fingerprint = chain
            .first()
            .map(|cert| certificate_fingerprint(cert))
            .ok_or(ServerError::Config("no certificate"))?;
        let tls = net::tls_config(chain, key)?;
        let quinn_config = net::quinn_config(tls, &config.limits)?;
        let endpoint = {
            let _guard = runtime.enter();
            bind_udp(config.listen)
                .and_then(|socket| {
                    quinn::Endpoint::new(
                        quinn::EndpointConfig::default(),
                        Some(quinn_config),
                        socket,
                        Arc::new(quinn::TokioRuntime),
                    )
                })
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?
        };
        let local_addr = endpoint.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let shared = Arc::new(Shared::new(Arc::new(handler), config.limits));
        let task = runtime.spawn(net::accept_loop(endpoint.clone(), shared, stopped));
        tracing::info!(%local_addr, %fingerprint, "listening");
        Ok(ServerHandle {
            endpoint,
            local_addr,
            fingerprint,
            stop,
            task: Some(task),
        })
    }
}

/// A running server; stops it when dropped.
///
/// Dropping closes every connection at once ([`CloseReason::ShuttingDown`]);
/// [`shutdown`](Self::shutdown) first lets connections finish the request
/// they are handling.
#[derive(Debug)]
pub struct ServerHandle {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    fingerprint: String,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port when 0 was
    /// asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The `SHA256:` fingerprint of the server's certificate, which clients
    /// pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Stops accepting, lets each connection finish its current request
    /// (up to [`Limits::shutdown_grace`]), closes every connection with
    /// [`CloseReason::ShuttingDown`] and waits for the server's tasks to end.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::warn!(%error, "the accept loop ended abnormally");
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        net::close_endpoint(&self.endpoint, CloseReason::ShuttingDown);
    }
}

//! The twin's side: accept cars over mutual TLS, know which car each connection is, hand every
//! connection to an [`Acceptor`] as a [`Session`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rsocket_rust::frame;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::bounds::Bounds;
use crate::conn::{CloseSignal, ConnOptions, Io, LinkConnection};
use crate::requester::Requester;
use crate::router::Responder;
use crate::socket::{self, Role, Served, Socket};
use crate::tls::{PeerRegistry, fingerprint};
use crate::{Error, Limits, Refusal};

/// How cars prove who they are.
#[derive(Clone)]
pub enum ServerSecurity {
    /// Production: TLS 1.3, client certificates from the fleet CA, registered fingerprints only.
    MutualTls {
        config: Arc<rustls::ServerConfig>,
        registry: PeerRegistry,
    },
    /// Local development only (`--insecure-plaintext`): no TLS, the car names itself.
    InsecurePlaintext,
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MutualTls { .. } => "MutualTls",
            Self::InsecurePlaintext => "InsecurePlaintext",
        })
    }
}

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The heartbeat interval cars are told to keep; a car silent for 3 of them is dropped.
    pub heartbeat: Duration,
    /// Deadline of requests the twin makes to a car (e.g. `twin.inspect`).
    pub request_deadline: Duration,
    pub handshake_timeout: Duration,
    pub limits: Limits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            request_deadline: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            limits: Limits::default(),
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Proven by a registered certificate.
    Authenticated(String),
    /// Plaintext development mode: only the peer's word.
    Unauthenticated,
}

/// One connected peer, after SETUP.
#[derive(Debug)]
pub struct Session {
    pub conn_id: u64,
    pub peer: Peer,
    pub remote: SocketAddr,
    /// SETUP data as the peer sent it.
    pub setup_data: Bytes,
    /// Requests to the peer; also tells when the connection is over.
    pub requester: Requester,
}

/// Decides what serves a new connection, or refuses it (the message reaches the peer).
pub trait Acceptor: Send + Sync + 'static {
    fn accept(&self, session: Session) -> Result<Arc<dyn Responder>, Refusal>;
}

/// Counters for tests and benchmarks.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub open_connections: AtomicU64,
    pub handshakes_refused: AtomicU64,
    pub sessions_accepted: AtomicU64,
}

struct Ctx {
    security: ServerSecurity,
    tls: Option<tokio_rustls::TlsAcceptor>,
    options: ServerOptions,
    next_id: AtomicU64,
    shutdown: watch::Receiver<bool>,
    stats: Arc<ServerStats>,
}

pub struct LinkServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    ctx: Arc<Ctx>,
    shutdown_tx: watch::Sender<bool>,
}

impl std::fmt::Debug for LinkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl LinkServer {
    pub async fn bind(
        addr: SocketAddr,
        security: ServerSecurity,
        options: ServerOptions,
    ) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Connect {
            addr: addr.to_string(),
            source,
        })?;
        let tls = match &security {
            ServerSecurity::MutualTls { config, .. } => {
                Some(tokio_rustls::TlsAcceptor::from(config.clone()))
            }
            ServerSecurity::InsecurePlaintext => None,
        };
        let (shutdown_tx, shutdown) = watch::channel(false);
        Ok(Self {
            listener,
            local_addr,
            ctx: Arc::new(Ctx {
                security,
                tls,
                options,
                next_id: AtomicU64::new(1),
                shutdown,
                stats: Arc::new(ServerStats::default()),
            }),
            shutdown_tx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> Arc<ServerStats> {
        self.ctx.stats.clone()
    }

    /// Serve until `shutdown` resolves; then every connection is closed.
    pub async fn serve(
        self,
        acceptor: Arc<dyn Acceptor>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let ctx = self.ctx.clone();
        let listener = self.listener;
        let accepting = async {
            loop {
                match listener.accept().await {
                    Ok((stream, remote)) => {
                        // The handshake runs on the connection's own task, so a slow one never
                        // delays the accept loop.
                        tokio::spawn(open(ctx.clone(), acceptor.clone(), stream, remote));
                    }
                    Err(e) => {
                        // EMFILE and friends: wait instead of spinning; the listener stays.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        tokio::select! {
            () = accepting => {}
            () = shutdown => {}
        }
        self.shutdown_tx.send_replace(true);
        Ok(())
    }
}

/// What the handshake proved, kept until SETUP.
struct Pending {
    peer: Peer,
    /// The certificate's fingerprint, checked again at SETUP: a car revoked between its
    /// handshake and its SETUP must not get a session (nor one in the name of its re-provisioned
    /// successor).
    fingerprint: Option<String>,
    remote: SocketAddr,
    conn_id: u64,
}

/// Close the connection shortly after a refusal, so the REJECTED_SETUP error frame can leave first.
fn close_soon(close: &CloseSignal) {
    let close = close.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        close.close();
    });
}

fn accept(
    ctx: &Ctx,
    acceptor: &dyn Acceptor,
    pending: Pending,
    setup: frame::Setup,
    requester: Requester,
) -> Result<Served, Refusal> {
    if let (Some(print), ServerSecurity::MutualTls { registry, .. }) =
        (&pending.fingerprint, &ctx.security)
        && registry.lookup(print).as_ref()
            != Some(&match &pending.peer {
                Peer::Authenticated(id) => id.clone(),
                Peer::Unauthenticated => String::new(),
            })
    {
        tracing::warn!(remote = %pending.remote, "refused SETUP: the certificate was revoked after the handshake");
        close_soon(&requester.close);
        return Err(Refusal::new(
            "this car's certificate was revoked; a re-provisioned car connects with its new one",
        ));
    }
    let peer_label = match &pending.peer {
        Peer::Authenticated(id) => id.clone(),
        Peer::Unauthenticated => format!("{} (unauthenticated)", pending.remote),
    };
    let metadata_mime = setup
        .get_mime_metadata()
        .unwrap_or(crate::router::MIME_COMPOSITE)
        .to_owned();
    let close = requester.close.clone();
    let session = Session {
        conn_id: pending.conn_id,
        peer: pending.peer,
        remote: pending.remote,
        setup_data: setup.get_data().cloned().unwrap_or_default(),
        requester,
    };
    match acceptor.accept(session) {
        Ok(responder) => {
            ctx.stats.sessions_accepted.fetch_add(1, Ordering::Relaxed);
            Ok(Served {
                responder,
                metadata_mime,
                max_payload: ctx.options.limits.max_payload,
                peer_label,
            })
        }
        Err(refusal) => {
            tracing::warn!(peer = %peer_label, "refused SETUP: {refusal}");
            close_soon(&close);
            Err(refusal)
        }
    }
}

/// One accepted TCP connection: the TLS handshake, then the connection until it ends.
async fn open(ctx: Arc<Ctx>, acceptor: Arc<dyn Acceptor>, stream: TcpStream, remote: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (io, peer, print): (Box<dyn Io>, Peer, Option<String>) = match (&ctx.tls, &ctx.security) {
        (Some(tls), ServerSecurity::MutualTls { registry, .. }) => {
            let handshake =
                tokio::time::timeout(ctx.options.handshake_timeout, tls.accept(stream)).await;
            let tls_stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => {
                    ctx.stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%remote, error = %source, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    ctx.stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%remote, timeout = ?ctx.options.handshake_timeout,
                        "TLS handshake did not finish in time");
                    return;
                }
            };
            let print = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|cert| fingerprint(cert));
            let car = print.as_deref().and_then(|p| registry.lookup(p));
            let Some(car) = car else {
                // The verifier already checked registration; a car removed in between
                // lands here.
                ctx.stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%remote, "certificate no longer registered");
                return;
            };
            (Box::new(tls_stream), Peer::Authenticated(car), print)
        }
        _ => (Box::new(stream), Peer::Unauthenticated, None),
    };
    let conn_id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let close = CloseSignal::new();
    let limits = ctx.options.limits;
    let bounds = Arc::new(Bounds::new(close.clone(), &limits, false, true));
    ctx.stats.open_connections.fetch_add(1, Ordering::Relaxed);
    {
        let ctx = ctx.clone();
        let close = close.clone();
        tokio::spawn(async move {
            close.closed().await;
            ctx.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let label = match &peer {
        Peer::Authenticated(id) => id.clone(),
        Peer::Unauthenticated => remote.to_string(),
    };
    let conn = LinkConnection::new(
        io,
        ConnOptions {
            idle_timeout: ctx.options.heartbeat * 3,
            max_frame: limits.max_frame,
            max_payload: limits.max_payload,
            we_open_odd_streams: false,
        },
        bounds.clone(),
        ctx.shutdown.clone(),
        label,
    );
    let (tx, incoming) = conn.split();
    let socket = Arc::new(Socket::new(tx, 2, limits.mtu, close.clone()));
    let requester = Requester {
        _owner: None,
        socket: socket.clone(),
        close,
        deadline: ctx.options.request_deadline,
        max_payload: limits.max_payload,
    };
    let pending = Pending {
        peer,
        fingerprint: print,
        remote,
        conn_id,
    };
    let decide = {
        let ctx = ctx.clone();
        Box::new(move |setup: frame::Setup| accept(&ctx, &*acceptor, pending, setup, requester))
    };
    let _ = socket::start(&socket, None, bounds, incoming, Role::Server(decide)).await;
}

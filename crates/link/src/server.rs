//! The twin's side: accept cars over mutual TLS, know which car each connection is, hand every
//! connection to an [`Acceptor`] as a [`Session`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rsocket_rust::prelude::{RSocket, RSocketFactory, ServerTransport, SetupPayload, Transport};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::bounds::Bounds;
use crate::conn::{CloseSignal, ConnOptions, Io, LinkConnection};
use crate::requester::Requester;
use crate::router::{Responder, Router};
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

struct Pending {
    peer: Peer,
    /// The certificate's fingerprint, checked again at SETUP: a car revoked between its
    /// handshake and its SETUP must not get a session (nor one in the name of its re-provisioned
    /// successor).
    fingerprint: Option<String>,
    remote: SocketAddr,
    bounds: Arc<Bounds>,
}

struct Ctx {
    security: ServerSecurity,
    tls: Option<tokio_rustls::TlsAcceptor>,
    options: ServerOptions,
    pending: Mutex<HashMap<u64, Pending>>,
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
                pending: Mutex::new(HashMap::new()),
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
        let limits = ctx.options.limits;
        let on_setup = {
            let ctx = ctx.clone();
            move |setup: SetupPayload, requester: Box<dyn RSocket>| {
                accept(&ctx, &*acceptor, setup, requester).map_err(anyhow::Error::new)
            }
        };
        let listener = Listener {
            listener: Some(self.listener),
            ctx: ctx.clone(),
        };
        let server = RSocketFactory::receive()
            .transport(listener)
            .fragment(limits.mtu)
            .acceptor(Box::new(on_setup))
            .serve();
        tokio::select! {
            result = server => result.map_err(|e| Error::Setup(e.to_string()))?,
            () = shutdown => {}
        }
        self.shutdown_tx.send_replace(true);
        Ok(())
    }
}

fn accept(
    ctx: &Arc<Ctx>,
    acceptor: &dyn Acceptor,
    setup: SetupPayload,
    requester: Box<dyn RSocket>,
) -> Result<Box<dyn RSocket>, Refusal> {
    let token = setup
        .metadata()
        .and_then(|m| <[u8; 8]>::try_from(&m[..]).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Refusal::new("SETUP did not pass through the cardeploy transport"))?;
    let pending = ctx
        .pending
        .lock()
        .ok()
        .and_then(|mut map| map.remove(&token))
        .ok_or_else(|| Refusal::new("a connection may send SETUP only once"))?;
    if let (Some(print), ServerSecurity::MutualTls { registry, .. }) =
        (&pending.fingerprint, &ctx.security)
        && registry.lookup(print).as_ref()
            != Some(&match &pending.peer {
                Peer::Authenticated(id) => id.clone(),
                Peer::Unauthenticated => String::new(),
            })
    {
        tracing::warn!(remote = %pending.remote, "refused SETUP: the certificate was revoked after the handshake");
        let close = pending.bounds.close.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            close.close();
        });
        return Err(Refusal::new(
            "this car's certificate was revoked; a re-provisioned car connects with its new one",
        ));
    }
    let peer_label = match &pending.peer {
        Peer::Authenticated(id) => id.clone(),
        Peer::Unauthenticated => format!("{} (unauthenticated)", pending.remote),
    };
    let metadata_mime = setup
        .metadata_mime_type()
        .unwrap_or(crate::router::MIME_COMPOSITE)
        .to_owned();
    let session = Session {
        conn_id: token,
        peer: pending.peer,
        remote: pending.remote,
        setup_data: setup.data().cloned().unwrap_or_default(),
        requester: Requester {
            socket: Arc::from(requester),
            close: pending.bounds.close.clone(),
            deadline: ctx.options.request_deadline,
            max_payload: ctx.options.limits.max_payload,
        },
    };
    match acceptor.accept(session) {
        Ok(responder) => {
            ctx.stats.sessions_accepted.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(Router {
                responder,
                metadata_mime,
                max_payload: ctx.options.limits.max_payload,
                peer_label,
                bounds: pending.bounds,
            }))
        }
        Err(refusal) => {
            tracing::warn!(peer = %peer_label, "refused SETUP: {refusal}");
            // Give the REJECTED_SETUP error frame time to leave before the connection closes.
            let close = pending.bounds.close.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                close.close();
            });
            Err(refusal)
        }
    }
}

struct Listener {
    listener: Option<TcpListener>,
    ctx: Arc<Ctx>,
}

#[async_trait]
impl ServerTransport for Listener {
    type Item = Accepted;

    async fn start(&mut self) -> rsocket_rust::Result<()> {
        Ok(())
    }

    async fn next(&mut self) -> Option<rsocket_rust::Result<Accepted>> {
        let listener = self.listener.as_ref()?;
        loop {
            match listener.accept().await {
                Ok((stream, remote)) => {
                    return Some(Ok(Accepted {
                        stream,
                        remote,
                        ctx: self.ctx.clone(),
                    }));
                }
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning; the listener stays.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// One accepted TCP connection; the TLS handshake runs in `connect`, on the connection's own
/// task, so a slow handshake never delays the accept loop.
struct Accepted {
    stream: TcpStream,
    remote: SocketAddr,
    ctx: Arc<Ctx>,
}

#[async_trait]
impl Transport for Accepted {
    type Conn = LinkConnection;

    async fn connect(self) -> rsocket_rust::Result<LinkConnection> {
        let Accepted {
            stream,
            remote,
            ctx,
        } = self;
        let _ = stream.set_nodelay(true);
        let (io, peer, print): (Box<dyn Io>, Peer, Option<String>) = match (&ctx.tls, &ctx.security)
        {
            (Some(tls), ServerSecurity::MutualTls { registry, .. }) => {
                let handshake =
                    tokio::time::timeout(ctx.options.handshake_timeout, tls.accept(stream)).await;
                let tls_stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(source)) => {
                        ctx.stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%remote, error = %source, "TLS handshake refused");
                        return Err(Error::Handshake {
                            addr: remote.to_string(),
                            source,
                        }
                        .into());
                    }
                    Err(_) => {
                        ctx.stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                        return Err(Error::HandshakeTimeout {
                            addr: remote.to_string(),
                            timeout: ctx.options.handshake_timeout,
                        }
                        .into());
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
                    return Err(anyhow::anyhow!(
                        "{remote}: certificate no longer registered"
                    ));
                };
                (Box::new(tls_stream), Peer::Authenticated(car), print)
            }
            _ => (Box::new(stream), Peer::Unauthenticated, None),
        };
        let conn_id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
        let close = CloseSignal::new();
        let limits = ctx.options.limits;
        let bounds = Arc::new(Bounds::new(close.clone(), &limits, false, true));
        if let Ok(mut pending) = ctx.pending.lock() {
            pending.insert(
                conn_id,
                Pending {
                    peer: peer.clone(),
                    fingerprint: print,
                    remote,
                    bounds: bounds.clone(),
                },
            );
        }
        ctx.stats.open_connections.fetch_add(1, Ordering::Relaxed);
        {
            // Forget the connection when it ends, also if it never sent SETUP.
            let ctx = ctx.clone();
            let close = close.clone();
            tokio::spawn(async move {
                close.closed().await;
                if let Ok(mut pending) = ctx.pending.lock() {
                    pending.remove(&conn_id);
                }
                ctx.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
            });
        }
        let label = match &peer {
            Peer::Authenticated(id) => id.clone(),
            Peer::Unauthenticated => remote.to_string(),
        };
        Ok(LinkConnection::new(
            io,
            ConnOptions {
                idle_timeout: ctx.options.heartbeat * 3,
                max_frame: limits.max_frame,
                max_payload: limits.max_payload,
                we_open_odd_streams: false,
                setup_token: Some(conn_id),
            },
            bounds,
            ctx.shutdown.clone(),
            label,
        ))
    }
}

//! The car's side: one connection to the twin. Reconnecting is the caller's loop (with
//! [`crate::Backoff`]), because what to do between connections is the agent's decision.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rsocket_rust::prelude::{Payload, RSocket, RSocketFactory, Transport};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::bounds::Bounds;
use crate::conn::{CloseSignal, ConnOptions, Io, LinkConnection};
use crate::requester::Requester;
use crate::router::{MIME_COMPOSITE, Responder, Router};
use crate::{Error, Limits};

#[derive(Clone)]
pub enum ClientSecurity {
    MutualTls(Arc<rustls::ClientConfig>),
    /// Local development only (`--insecure-plaintext`).
    InsecurePlaintext,
}

#[derive(Clone)]
pub struct ClientOptions {
    /// `host:port` of the twin's car endpoint.
    pub addr: String,
    pub security: ClientSecurity,
    pub heartbeat: Duration,
    pub request_deadline: Duration,
    pub connect_timeout: Duration,
    pub limits: Limits,
    /// SETUP data (JSON).
    pub setup_data: Bytes,
    /// What this side serves to the peer (the twin may ask the car, too).
    pub responder: Option<Arc<dyn Responder>>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("addr", &self.addr)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

/// Split `host:port`, also `[v6]:port`.
fn host_of(addr: &str) -> Result<&str, Error> {
    let bad = |why: &str| Error::Address {
        addr: addr.to_owned(),
        why: why.to_owned(),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    port.parse::<u16>()
        .map_err(|_| bad("the port is not a number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    Ok(host)
}

struct Dial {
    options: ClientOptions,
    bounds: Arc<Bounds>,
    shutdown: watch::Receiver<bool>,
}

#[async_trait]
impl Transport for Dial {
    type Conn = LinkConnection;

    async fn connect(self) -> rsocket_rust::Result<LinkConnection> {
        let options = &self.options;
        let addr = options.addr.clone();
        let tcp = tokio::time::timeout(options.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| Error::Connect {
                addr: addr.clone(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| Error::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &options.security {
            ClientSecurity::MutualTls(config) => {
                let name = ServerName::try_from(host_of(&addr)?.to_owned()).map_err(|e| {
                    Error::Address {
                        addr: addr.clone(),
                        why: e.to_string(),
                    }
                })?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls =
                    tokio::time::timeout(options.connect_timeout, connector.connect(name, tcp))
                        .await
                        .map_err(|_| Error::HandshakeTimeout {
                            addr: addr.clone(),
                            timeout: options.connect_timeout,
                        })?
                        .map_err(|source| Error::Handshake {
                            addr: addr.clone(),
                            source,
                        })?;
                Box::new(tls)
            }
            ClientSecurity::InsecurePlaintext => Box::new(tcp),
        };
        Ok(LinkConnection::new(
            io,
            ConnOptions {
                idle_timeout: options.heartbeat * 3,
                max_frame: options.limits.max_frame,
                max_payload: options.limits.max_payload,
                we_open_odd_streams: true,
                setup_token: None,
            },
            self.bounds.clone(),
            self.shutdown.clone(),
            addr,
        ))
    }
}

/// Open one connection and send SETUP. The returned [`Requester`] says when the connection ends.
pub async fn connect(options: &ClientOptions) -> Result<Requester, Error> {
    host_of(&options.addr)?;
    let close = CloseSignal::new();
    let bounds = Arc::new(Bounds::new(close.clone(), &options.limits, true, false));
    // The client has no process-wide shutdown of its own: closing the requester ends it.
    let (_never, shutdown) = watch::channel(false);
    let dial = Dial {
        options: options.clone(),
        bounds: bounds.clone(),
        shutdown,
    };
    let on_close = {
        let close = close.clone();
        move || close.close()
    };
    let mut builder = RSocketFactory::connect()
        .transport(dial)
        .setup(
            Payload::builder()
                .set_data(options.setup_data.clone())
                .build(),
        )
        .mime_type(MIME_COMPOSITE, "application/json")
        // rsocket_rust sends KEEPALIVE when idle for this long; the twin answers, so both ends
        // see traffic at least once per interval and the 3-interval idle timeout is safe.
        .keepalive(options.heartbeat, options.heartbeat * 3, 3)
        .fragment(options.limits.mtu)
        .on_close(Box::new(on_close));
    if let Some(responder) = options.responder.clone() {
        let max_payload = options.limits.max_payload;
        let peer_label = options.addr.clone();
        let bounds = bounds.clone();
        builder = builder.acceptor(Box::new(move || {
            Box::new(Router {
                responder,
                metadata_mime: MIME_COMPOSITE.to_owned(),
                max_payload,
                peer_label,
                bounds,
            }) as Box<dyn RSocket>
        }));
    }
    let client = builder
        .start()
        .await
        .map_err(|e| match e.downcast::<Error>() {
            Ok(e) => e,
            Err(e) => Error::Setup(e.to_string()),
        })?;
    Ok(Requester {
        socket: Arc::new(client),
        close,
        deadline: options.request_deadline,
        max_payload: options.limits.max_payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_before_dialing() {
        assert_eq!(host_of("localhost:7443").unwrap(), "localhost");
        assert_eq!(host_of("[::1]:7443").unwrap(), "::1");
        assert!(host_of("localhost").is_err());
        assert!(host_of(":7443").is_err());
        assert!(host_of("twin:http").is_err());
    }
}

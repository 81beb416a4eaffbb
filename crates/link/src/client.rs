//! The car's side: one connection to the twin. Reconnecting is the caller's loop (with
//! [`crate::Backoff`]), because what to do between connections is the agent's decision.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rsocket_rust::frame;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::bounds::Bounds;
use crate::conn::{CloseOnDrop, CloseSignal, ConnOptions, Io, LinkConnection};
use crate::requester::Requester;
use crate::router::{MIME_COMPOSITE, Responder};
use crate::socket::{self, Role, Served, Socket};
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
    /// The local address to connect from; none: the system's choice. A simulated fleet spreads
    /// its connections over loopback addresses (127.0.0.0/8), because one (source, destination)
    /// pair of addresses has only as many connections as ephemeral ports.
    pub bind: Option<std::net::IpAddr>,
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

/// TCP, then TLS when configured, within the connect timeout.
async fn dial(options: &ClientOptions) -> Result<Box<dyn Io>, Error> {
    let addr = options.addr.clone();
    let tcp = tokio::time::timeout(options.connect_timeout, tcp_from(&addr, options.bind))
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
    Ok(match &options.security {
        ClientSecurity::MutualTls(config) => {
            let name =
                ServerName::try_from(host_of(&addr)?.to_owned()).map_err(|e| Error::Address {
                    addr: addr.clone(),
                    why: e.to_string(),
                })?;
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls = tokio::time::timeout(options.connect_timeout, connector.connect(name, tcp))
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
    })
}

/// TCP to `addr`, from `bind` when given.
async fn tcp_from(addr: &str, bind: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = bind else {
        return TcpStream::connect(addr).await;
    };
    let mut last = None;
    for remote in tokio::net::lookup_host(addr).await? {
        if remote.is_ipv4() != local.is_ipv4() {
            continue;
        }
        let socket = if local.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        match socket.connect(remote).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{addr} has no address of the family of {local}"),
        )
    }))
}

/// Open one connection and send SETUP. The returned [`Requester`] says when the connection ends.
pub async fn connect(options: &ClientOptions) -> Result<Requester, Error> {
    host_of(&options.addr)?;
    let io = dial(options).await?;
    let close = CloseSignal::new();
    let bounds = Arc::new(Bounds::new(close.clone(), &options.limits, true, false));
    // The client has no process-wide shutdown of its own: closing the requester ends it.
    let (_never, shutdown) = watch::channel(false);
    let conn = LinkConnection::new(
        io,
        ConnOptions {
            idle_timeout: options.heartbeat * 3,
            max_frame: options.limits.max_frame,
            max_payload: options.limits.max_payload,
            we_open_odd_streams: true,
        },
        bounds.clone(),
        shutdown,
        options.addr.clone(),
    );
    let (tx, incoming) = conn.split();
    let socket = Arc::new(Socket::new(tx, 1, options.limits.mtu, close.clone()));
    let setup = frame::Setup::builder(0, 0)
        .set_version(1, 0)
        // We send KEEPALIVE every interval and the twin answers, so both ends see traffic at
        // least once per interval and the 3-interval idle timeout is safe.
        .set_keepalive(options.heartbeat)
        .set_lifetime(options.heartbeat * 3)
        .set_mime_metadata(MIME_COMPOSITE)
        .set_mime_data("application/json")
        .set_data(options.setup_data.clone())
        .build();
    let served = options.responder.clone().map(|responder| Served {
        responder,
        metadata_mime: MIME_COMPOSITE.to_owned(),
        max_payload: options.limits.max_payload,
        peer_label: options.addr.clone(),
    });
    socket::start(&socket, Some(setup), bounds, incoming, Role::Client(served))
        .await
        .map_err(|_| {
            Error::Setup(format!(
                "{}: the connection closed during SETUP",
                options.addr
            ))
        })?;
    socket::keepalive(&socket, options.heartbeat);
    Ok(Requester {
        socket,
        _owner: Some(Arc::new(CloseOnDrop(close.clone()))),
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

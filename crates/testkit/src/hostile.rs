//! A hostile car: a raw RSocket client over mutual TLS with a real car certificate, as an
//! attacker who pulled a key out of an ECU would run it. It sends whatever frames it is told to
//! (well-formed or not, as many as it likes) and reads only when asked, so tests and the
//! `hostile` benchmark can hold the twin to its bounds: streams per connection, bytes queued for
//! a car that stops reading, what a car may read, frames that break the protocol.
//!
//! Frames are built with rsocket_rust's own builders and length-prefixed by hand, so nothing in
//! the product's link code (which would refuse to send most of them) is in the way.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rsocket_rust::frame::{self, Frame};
use rsocket_rust::utils::Writeable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::CarFiles;

/// The composite-metadata mime every cardeploy peer declares in SETUP.
const MIME_COMPOSITE: &str = "message/x.rsocket.composite-metadata.v0";

/// An RSocket error code the twin sends.
pub const REJECTED: u32 = 0x202;
pub const APPLICATION_ERROR: u32 = 0x201;

/// One raw connection to the twin, after the TLS handshake.
pub struct HostileCar {
    io: TlsStream<TcpStream>,
    next_stream: u32,
    buffer: BytesMut,
}

impl std::fmt::Debug for HostileCar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostileCar")
            .field("next_stream", &self.next_stream)
            .finish_non_exhaustive()
    }
}

fn tls_config(ca: &Path, car: &CarFiles) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let certs = CertificateDer::pem_file_iter(&car.cert)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_file(&car.key).map_err(|e| bad(&e))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| bad(&e))?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .map_err(|e| bad(&e))?;
    Ok(Arc::new(config))
}

/// Composite metadata with one routing tag, as the RSocket routing extension encodes it.
pub fn route_metadata(route: &str) -> Bytes {
    let mut tag = Vec::with_capacity(route.len() + 1);
    tag.push(u8::try_from(route.len()).unwrap_or(u8::MAX));
    tag.extend_from_slice(route.as_bytes());
    let mut out = vec![0xFE]; // well-known mime 0x7E (routing), high bit set
    let len = tag.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8]);
    out.extend_from_slice(&tag);
    Bytes::from(out)
}

impl HostileCar {
    /// Connect to the twin's car endpoint with `car`'s certificate and send a proper SETUP.
    pub async fn connect(
        addr: SocketAddr,
        ca: &Path,
        car: &CarFiles,
        car_id: &str,
    ) -> io::Result<Self> {
        let mut hostile = Self::handshake(addr, ca, car).await?;
        hostile.send(setup(car_id)).await?;
        Ok(hostile)
    }

    /// Connect and finish the TLS handshake, but send nothing yet.
    pub async fn handshake(addr: SocketAddr, ca: &Path, car: &CarFiles) -> io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let connector = tokio_rustls::TlsConnector::from(tls_config(ca, car)?);
        let name = rustls::pki_types::ServerName::try_from("localhost")
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let io = connector.connect(name, tcp).await?;
        Ok(Self {
            io,
            next_stream: 1,
            buffer: BytesMut::new(),
        })
    }

    /// The next stream id a client may open (odd, growing).
    pub fn next_id(&mut self) -> u32 {
        let id = self.next_stream;
        self.next_stream += 2;
        id
    }

    /// Write one frame, length-prefixed.
    pub async fn send(&mut self, frame: Frame) -> io::Result<()> {
        let len = frame.len();
        let mut bytes = BytesMut::with_capacity(len + 3);
        bytes.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8]);
        frame.write_to(&mut bytes);
        self.io.write_all(&bytes).await
    }

    /// Write bytes as they are (a frame nobody would build).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await
    }

    /// Open a request-stream on `route`; returns its stream id.
    pub async fn request_stream(&mut self, route: &str, data: &[u8]) -> io::Result<u32> {
        let id = self.next_id();
        let request = frame::RequestStream::builder(id, Frame::FLAG_METADATA)
            .set_metadata(route_metadata(route))
            .set_data(Bytes::copy_from_slice(data))
            .build();
        self.send(request).await?;
        Ok(id)
    }

    /// Send a request-response on `route`; returns its stream id.
    pub async fn request_response(&mut self, route: &str, data: &[u8]) -> io::Result<u32> {
        let id = self.next_id();
        let request = frame::RequestResponse::builder(id, Frame::FLAG_METADATA)
            .set_metadata(route_metadata(route))
            .set_data(Bytes::copy_from_slice(data))
            .build();
        self.send(request).await?;
        Ok(id)
    }

    /// Send a fire-and-forget request on `route`.
    pub async fn fire_and_forget(&mut self, route: &str, data: &[u8]) -> io::Result<u32> {
        let id = self.next_id();
        let request = frame::RequestFNF::builder(id, Frame::FLAG_METADATA)
            .set_metadata(route_metadata(route))
            .set_data(Bytes::copy_from_slice(data))
            .build();
        self.send(request).await?;
        Ok(id)
    }

    /// Read the next frame within `within`: `Ok(None)` when the twin closed the connection, an
    /// error of kind `TimedOut` when nothing came.
    pub async fn read_frame(&mut self, within: Duration) -> io::Result<Option<Frame>> {
        tokio::time::timeout(within, self.read_frame_now())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no frame from the twin"))?
    }

    async fn read_frame_now(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if self.buffer.len() >= 3 {
                let len = (usize::from(self.buffer[0]) << 16)
                    | (usize::from(self.buffer[1]) << 8)
                    | usize::from(self.buffer[2]);
                if self.buffer.len() >= 3 + len {
                    let _ = self.buffer.split_to(3);
                    let mut bytes = self.buffer.split_to(len);
                    return Frame::decode(&mut bytes)
                        .map(Some)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.io.read(&mut chunk).await {
                Ok(0) => return Ok(None),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                // A reset is how a dropped connection often looks from here.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Frames until one on stream `id` ends it (an ERROR, or a PAYLOAD flagged COMPLETE or the
    /// answer to a request-response); returns that frame. Frames of other streams are skipped.
    pub async fn answer(&mut self, id: u32, within: Duration) -> io::Result<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(frame) = self.read_frame(left).await? else {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the twin closed the connection",
                ));
            };
            if frame.get_stream_id() == id {
                return Ok(frame);
            }
        }
    }

    /// Whether the twin closes the connection within `within` (everything it still sends is
    /// read and dropped).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Ok(None) => return true,
                Ok(Some(_)) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return false,
                // Undecodable bytes or a broken connection: it is going away.
                Err(_) => return true,
            }
        }
    }
}

/// The SETUP a car sends: composite metadata, JSON data, `car_id` in the data.
pub fn setup(car_id: &str) -> Frame {
    frame::Setup::builder(0, 0)
        .set_keepalive(Duration::from_secs(10))
        .set_lifetime(Duration::from_secs(30))
        .set_mime_metadata(MIME_COMPOSITE)
        .set_mime_data("application/json")
        .set_data(Bytes::from(format!(
            "{{\"car_id\":\"{car_id}\",\"agent_version\":\"hostile\"}}"
        )))
        .build()
}

/// The code of an ERROR frame, if `frame` is one.
pub fn error_code(frame: &Frame) -> Option<u32> {
    match frame.get_body_ref() {
        frame::Body::Error(e) => Some(e.get_code()),
        _ => None,
    }
}

/// The text of an ERROR frame, if `frame` is one.
pub fn error_text(frame: &Frame) -> Option<String> {
    match frame.get_body_ref() {
        frame::Body::Error(e) => e.get_data_utf8().map(str::to_owned),
        _ => None,
    }
}

/// The data of a PAYLOAD frame, if `frame` is one.
pub fn payload_data(frame: &Frame) -> Option<Bytes> {
    match frame.get_body_ref() {
        frame::Body::Payload(p) => p.get_data().cloned(),
        _ => None,
    }
}

//! One RSocket connection over TCP or TLS, plugged into rsocket_rust through its public
//! `Connection` trait. This is where the crate's measured gaps are closed at the byte level:
//!
//! - **no keepalive timeout** → the read side ends the connection after `idle_timeout` without a
//!   single frame (3 heartbeat intervals), on both ends;
//! - **oversized payloads** → frames above the limit are skipped unbuffered ([`FrameCodec`]) and
//!   fragmented payloads are counted while they arrive; either way the stream gets an ERROR and the
//!   connection stays up;
//! - **who is the peer** → on the twin the SETUP frame's metadata is replaced by the connection's
//!   id, under which the TLS-authenticated identity waits (see `server.rs`), so a car can never
//!   claim another car's identity in SETUP;
//! - **writes after a close** → frames sent after the connection ended are discarded instead of
//!   failing, because rsocket_rust panics in spawned tasks when a send fails mid-stream.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rsocket_rust::error::{ERR_REJECTED, RSocketError};
use rsocket_rust::frame::{self, Body, Frame};
use rsocket_rust::transport::{Connection, FrameSink, FrameStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{Decoded, FrameCodec};

/// Anything we can run frames over: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Io for T {}

/// Close signals of one connection. `close` is `true` once the connection is over, whoever ended
/// it (the peer, the idle timeout, a failed heartbeat, shutdown).
#[derive(Clone, Debug)]
pub struct CloseSignal {
    tx: watch::Sender<bool>,
}

impl CloseSignal {
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(false),
        }
    }

    pub fn close(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_closed(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the connection is closed.
    pub async fn closed(&self) {
        let mut rx = self.tx.subscribe();
        // An error means every sender is gone, which also means closed.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

impl Default for CloseSignal {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Debug)]
pub struct ConnOptions {
    /// The read side gives up after this long without a frame.
    pub idle_timeout: Duration,
    /// Largest frame accepted on the wire.
    pub max_frame: usize,
    /// Largest payload (data + metadata) accepted, also when it arrives in fragments.
    pub max_payload: usize,
    /// `true` on the client: RSocket clients open odd stream ids, servers even ones.
    pub we_open_odd_streams: bool,
    /// On the twin: replace SETUP metadata with this connection id.
    pub setup_token: Option<u64>,
}

/// The receive buffer starts small: most frames on an idle car are heartbeats, and the twin holds
/// thousands of connections.
const READ_BUFFER: usize = 1024;
/// Frames queued to the writer; rsocket_rust's own queue in front of it is unbounded, this one
/// just decouples the TLS writes.
const WRITE_QUEUE: usize = 32;
/// Peers may interleave fragmented payloads on this many streams at once.
const MAX_FRAGMENTING_STREAMS: usize = 8;

pub struct LinkConnection {
    pub(crate) io: Box<dyn Io>,
    pub(crate) options: ConnOptions,
    pub(crate) close: CloseSignal,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) peer_label: String,
}

impl LinkConnection {
    pub fn new(
        io: Box<dyn Io>,
        options: ConnOptions,
        close: CloseSignal,
        shutdown: watch::Receiver<bool>,
        peer_label: String,
    ) -> Self {
        Self {
            io,
            options,
            close,
            shutdown,
            peer_label,
        }
    }
}

async fn closed_or_shutdown(
    close: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) {
    // A dropped shutdown sender means "no shutdown will ever come", not "shut down now".
    let shutdown = async {
        if shutdown.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = close.wait_for(|c| *c) => {}
        () = shutdown => {}
    }
}

fn error_frame(stream_id: u32, code: u32, message: String) -> Frame {
    frame::Error::builder(stream_id, 0)
        .set_code(code)
        .set_data(Bytes::from(message))
        .build()
}

fn is_fragmentable(body: &Body) -> bool {
    matches!(
        body,
        Body::RequestResponse(_)
            | Body::RequestFNF(_)
            | Body::RequestStream(_)
            | Body::RequestChannel(_)
            | Body::Payload(_)
    )
}

/// Rebuild a SETUP frame with our metadata in place of the peer's.
fn rewrite_setup(setup: frame::Setup, flag: u16, token: u64) -> Frame {
    let mut builder = frame::Setup::builder(0, flag & !Frame::FLAG_METADATA)
        .set_version(
            setup.get_version().get_major(),
            setup.get_version().get_minor(),
        )
        .set_keepalive(setup.get_keepalive())
        .set_lifetime(setup.get_lifetime())
        .set_mime_metadata(setup.get_mime_metadata().unwrap_or_default())
        .set_mime_data(setup.get_mime_data().unwrap_or_default())
        .set_metadata(Bytes::copy_from_slice(&token.to_be_bytes()));
    if let Some(token) = setup.get_token() {
        builder = builder.set_token(token.clone());
    }
    if let Some(data) = setup.get_data() {
        builder = builder.set_data(data.clone());
    }
    builder.build()
}

/// Marks the connection closed however the read side ends, also when rsocket_rust drops it.
struct CloseOnDrop(CloseSignal);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Connection for LinkConnection {
    fn split(self) -> (Box<FrameSink>, Box<FrameStream>) {
        let LinkConnection {
            io,
            options,
            close,
            shutdown,
            peer_label,
        } = self;
        let (read_half, write_half) = tokio::io::split(io);
        let (tx, mut rx) = mpsc::channel::<Frame>(WRITE_QUEUE);

        // Writer: owns the write half; after a close it drains and discards, see module docs.
        {
            let mut close_rx = close.subscribe();
            let mut shutdown = shutdown.clone();
            let close = close.clone();
            let max_frame = options.max_frame;
            tokio::spawn(async move {
                let mut writer = FramedWrite::new(write_half, FrameCodec::new(max_frame));
                let mut open = true;
                loop {
                    tokio::select! {
                        next = rx.next() => {
                            let Some(frame) = next else { break };
                            if !open {
                                continue;
                            }
                            let mut result = writer.feed(frame).await;
                            // Batch whatever else is queued into the same flush.
                            while result.is_ok() {
                                match rx.try_recv() {
                                    Ok(frame) => result = writer.feed(frame).await,
                                    _ => break,
                                }
                            }
                            if result.is_ok() {
                                result = writer.flush().await;
                            }
                            if let Err(e) = result {
                                tracing::debug!(error = %e, "write failed; closing the connection");
                                open = false;
                                close.close();
                            }
                        }
                        _ = closed_or_shutdown(&mut close_rx, &mut shutdown), if open => {
                            open = false;
                            close.close();
                            let _ = writer.close().await;
                        }
                    }
                }
                if open {
                    let _ = writer.close().await;
                }
            });
        }

        let inject = tx.clone();
        let frames = async_stream::stream! {
            let _guard = CloseOnDrop(close.clone());
            let mut reader = FramedRead::with_capacity(
                read_half,
                FrameCodec::new(options.max_frame),
                READ_BUFFER,
            );
            let mut close_rx = close.subscribe();
            let mut shutdown = shutdown;
            let mut inject = inject;
            let mut fragmenting: HashMap<u32, usize> = HashMap::new();
            let mut dropping: HashSet<u32> = HashSet::new();
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(options.idle_timeout, reader.next()) => next,
                    _ = closed_or_shutdown(&mut close_rx, &mut shutdown) => break,
                };
                let decoded = match next {
                    Err(_) => {
                        tracing::warn!(peer = %peer_label, idle = ?options.idle_timeout,
                            "peer silent for 3 heartbeat intervals; dropping the connection");
                        break;
                    }
                    Ok(None) => {
                        tracing::debug!(peer = %peer_label, "connection closed by the peer");
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        tracing::warn!(peer = %peer_label, error = %e, "connection failed");
                        break;
                    }
                    Ok(Some(Ok(decoded))) => decoded,
                };
                let frame = match decoded {
                    Decoded::Oversized { stream_id, len } => {
                        let message = format!(
                            "frame of {len} bytes exceeds the {}-byte limit; payloads are limited to {} bytes",
                            options.max_frame, options.max_payload
                        );
                        tracing::warn!(peer = %peer_label, stream_id, len, "refused an oversized frame");
                        refuse(&mut inject, stream_id, &options, message.clone());
                        yield Ok(error_frame(stream_id, ERR_REJECTED, message));
                        continue;
                    }
                    Decoded::Frame(frame) => frame,
                };
                let sid = frame.get_stream_id();
                let follows = frame.get_flag() & Frame::FLAG_FOLLOW != 0;
                if is_fragmentable(frame.get_body_ref()) {
                    if dropping.contains(&sid) {
                        if !follows {
                            dropping.remove(&sid);
                        }
                        continue;
                    }
                    let so_far = fragmenting.get(&sid).copied().unwrap_or(0);
                    let total = so_far + rsocket_rust::utils::Writeable::len(&frame);
                    let too_many = so_far == 0 && follows && fragmenting.len() >= MAX_FRAGMENTING_STREAMS;
                    if total > options.max_frame.max(options.max_payload) + 1024 || too_many {
                        fragmenting.remove(&sid);
                        if follows {
                            dropping.insert(sid);
                        }
                        let message = if too_many {
                            format!("more than {MAX_FRAGMENTING_STREAMS} fragmented payloads at once")
                        } else {
                            format!("fragmented payload exceeds the {}-byte limit", options.max_payload)
                        };
                        tracing::warn!(peer = %peer_label, stream_id = sid, "{message}");
                        refuse(&mut inject, sid, &options, message.clone());
                        // Locally, an ERROR both fails our own request on that stream and drops
                        // the fragments rsocket_rust's joiner already holds.
                        yield Ok(error_frame(sid, ERR_REJECTED, message));
                        continue;
                    }
                    if follows {
                        fragmenting.insert(sid, total);
                    } else {
                        fragmenting.remove(&sid);
                    }
                }
                let frame = match (options.setup_token, frame.get_body_ref()) {
                    (Some(token), Body::Setup(_)) => {
                        let flag = frame.get_flag();
                        match frame.get_body() {
                            Body::Setup(setup) => rewrite_setup(setup, flag, token),
                            _ => continue,
                        }
                    }
                    _ => frame,
                };
                yield Ok(frame);
            }
        };
        let sink = tx.sink_map_err(|e| RSocketError::Other(e.into()));
        (Box::new(sink), Box::new(Box::pin(frames)))
    }
}

/// Tell the peer we refused its stream: an ERROR for a stream it opened, a CANCEL for one we
/// opened (a peer may not be sent an ERROR for its answer to our request).
fn refuse(
    inject: &mut mpsc::Sender<Frame>,
    stream_id: u32,
    options: &ConnOptions,
    message: String,
) {
    let ours = (stream_id % 2 == 1) == options.we_open_odd_streams;
    let frame = if ours {
        frame::Cancel::builder(stream_id, 0).build()
    } else {
        error_frame(stream_id, ERR_REJECTED, message)
    };
    // Best effort: if the write queue is full the peer learns from the closed stream instead.
    let _ = inject.try_send(frame);
}

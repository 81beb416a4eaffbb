//! One RSocket connection over TCP or TLS: the reader and the writer of its frames, below the
//! engine in `socket.rs`. Closed here, at the byte level:
//!
//! - **no keepalive timeout** → the read side ends the connection after `idle_timeout` without a
//!   single frame (3 heartbeat intervals), on both ends;
//! - **oversized payloads** → frames above the limit are skipped unbuffered ([`FrameCodec`]) and
//!   fragmented payloads are counted while they arrive; either way the stream gets an ERROR and the
//!   connection stays up;
//! - **writes after a close** → frames sent after the connection ended are discarded, so a task
//!   still answering never fails on a dead socket;
//! - **a peer that breaks the protocol or asks for too much** → every frame read is judged by
//!   `guard.rs` before the engine sees it, every frame written too; answers count against the
//!   outbound budget of `bounds.rs` until written, and a peer that takes no bytes for
//!   [`Limits::send_stall`](crate::Limits::send_stall) is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, Stream, StreamExt};
use rsocket_rust::error::ERR_REJECTED;
use rsocket_rust::frame::{self, Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::bounds::{Bounds, LogLimiter};
use crate::codec::{Decoded, FrameCodec};
use crate::guard::{Inbound, answer_bytes};
use crate::socket::error_frame;

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
}

/// The receive buffer starts small: most frames on an idle car are heartbeats, and the twin holds
/// thousands of connections.
const READ_BUFFER: usize = 1024;
/// Frames queued to the writer: senders wait for room, so a slow peer slows its answers down
/// (their bytes are bounded by `bounds.rs` before they queue here).
const WRITE_QUEUE: usize = 32;

/// Peers whose frames broke the protocol, logged at a limited rate.
static MISBEHAVING: LogLimiter = LogLimiter::new();

pub struct LinkConnection {
    pub(crate) io: Box<dyn Io>,
    pub(crate) options: ConnOptions,
    pub(crate) bounds: Arc<Bounds>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) peer_label: String,
}

impl LinkConnection {
    pub(crate) fn new(
        io: Box<dyn Io>,
        options: ConnOptions,
        bounds: Arc<Bounds>,
        shutdown: watch::Receiver<bool>,
        peer_label: String,
    ) -> Self {
        Self {
            io,
            options,
            bounds,
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

/// A KEEPALIVE without its data: the spec has a responder echo the data of a KEEPALIVE that
/// asks for an answer, nothing in our protocol needs it, and a peer must not make us send its
/// bytes back.
fn without_data(frame: Frame) -> Frame {
    let flag = frame.get_flag();
    match frame.get_body() {
        Body::Keepalive(k) => frame::Keepalive::builder(0, flag)
            .set_last_received_position(k.get_last_received_position())
            .build(),
        other => Frame::new(0, other, flag),
    }
}

/// Marks the connection closed when dropped: however the read side ends, and on the car when the
/// last [`crate::Requester`] of a connection goes.
pub(crate) struct CloseOnDrop(pub(crate) CloseSignal);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Write one frame and whatever else is queued behind it, then flush; all of it within the stall
/// deadline. Frames without a stream to go to are dropped here (see `guard.rs`), and the answer
/// bytes of every frame leave the outbound budget once written or dropped.
async fn write_batch<W>(
    writer: &mut FramedWrite<W, FrameCodec>,
    first: Frame,
    rx: &mut mpsc::Receiver<Frame>,
    bounds: &Bounds,
    we_open_odd: bool,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut next = Some(first);
    while let Some(frame) = next.take() {
        let bytes = answer_bytes(&frame, we_open_odd);
        let send = bounds.streams().outbound(&frame);
        let fed = if send {
            tokio::time::timeout(bounds.send_stall, writer.feed(frame)).await
        } else {
            Ok(Ok(()))
        };
        bounds.outbound.release(bytes);
        match fed {
            Ok(result) => result?,
            Err(_) => return Err(stalled(bounds.send_stall)),
        }
        next = rx.try_recv().ok();
    }
    match tokio::time::timeout(bounds.send_stall, writer.flush()).await {
        Ok(result) => result,
        Err(_) => Err(stalled(bounds.send_stall)),
    }
}

fn stalled(after: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the peer took no bytes for {after:?}"),
    )
}

fn warn_misbehaving(peer: &str, why: &str) {
    if let Some(suppressed) = MISBEHAVING.allow(Instant::now()) {
        if suppressed > 0 {
            tracing::warn!(%peer, suppressed, "dropping a peer that broke the protocol: {why}");
        } else {
            tracing::warn!(%peer, "dropping a peer that broke the protocol: {why}");
        }
    }
}

impl LinkConnection {
    /// Start the writer; return its queue and the frames read from the peer, judged by the guard.
    pub(crate) fn split(
        self,
    ) -> (
        mpsc::Sender<Frame>,
        impl Stream<Item = Frame> + Send + Unpin,
    ) {
        let LinkConnection {
            io,
            options,
            bounds,
            shutdown,
            peer_label,
        } = self;
        let close = bounds.close.clone();
        let (read_half, write_half) = tokio::io::split(io);
        let (tx, mut rx) = mpsc::channel::<Frame>(WRITE_QUEUE);
        let we_open_odd = options.we_open_odd_streams;

        // Writer: owns the write half; after a close it drains and discards, see module docs.
        {
            let mut close_rx = close.subscribe();
            let mut shutdown = shutdown.clone();
            let close = close.clone();
            let max_frame = options.max_frame;
            let bounds = bounds.clone();
            let peer_label = peer_label.clone();
            tokio::spawn(async move {
                // The write half goes as soon as the connection is over: requesters may outlive
                // the connection (and so this task, which drains their frames), and the socket
                // must not stay open with them.
                let mut writer = Some(FramedWrite::new(write_half, FrameCodec::new(max_frame)));
                loop {
                    tokio::select! {
                        next = rx.recv() => {
                            let Some(frame) = next else { break };
                            let Some(open) = writer.as_mut() else {
                                bounds.outbound.release(answer_bytes(&frame, we_open_odd));
                                continue;
                            };
                            let written =
                                write_batch(open, frame, &mut rx, &bounds, we_open_odd).await;
                            if let Err(e) = written {
                                if e.kind() == std::io::ErrorKind::TimedOut {
                                    tracing::warn!(peer = %peer_label, "{e}; dropping the connection");
                                } else {
                                    tracing::debug!(error = %e, "write failed; closing the connection");
                                }
                                writer = None;
                                close.close();
                            }
                        }
                        _ = closed_or_shutdown(&mut close_rx, &mut shutdown), if writer.is_some() => {
                            close.close();
                            // A clean end where the peer still reads; never longer than a stall.
                            if let Some(mut open) = writer.take() {
                                let _ = tokio::time::timeout(bounds.send_stall, open.close()).await;
                            }
                        }
                    }
                }
                if let Some(mut open) = writer.take() {
                    let _ = tokio::time::timeout(bounds.send_stall, open.close()).await;
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
            let inject = inject;
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
                        warn_misbehaving(&peer_label, &e.to_string());
                        break;
                    }
                    Ok(Some(Ok(decoded))) => decoded,
                };
                let (stream_id, verdict, frame) = match decoded {
                    Decoded::Oversized { stream_id, len } => {
                        tracing::warn!(peer = %peer_label, stream_id, len, "refused an oversized frame");
                        let verdict = bounds
                            .streams()
                            .oversized(stream_id, (options.max_frame, options.max_payload));
                        (stream_id, verdict, None)
                    }
                    Decoded::Frame(frame) => {
                        let verdict = bounds.streams().inbound(&frame, Instant::now());
                        (frame.get_stream_id(), verdict, Some(frame))
                    }
                };
                match verdict {
                    Inbound::Malformed(why) => {
                        warn_misbehaving(&peer_label, &why);
                        break;
                    }
                    Inbound::Drop => continue,
                    Inbound::Reject { message, local } => {
                        tracing::debug!(peer = %peer_label, stream_id, "refused a stream: {message}");
                        let refusal = error_frame(stream_id, ERR_REJECTED, message.clone());
                        if inject.try_send(refusal).is_err() {
                            // The peer learns from the closed stream instead.
                            bounds.streams().refusal_dropped(stream_id);
                        }
                        if local {
                            // The engine already holds fragments of it: an ERROR drops them.
                            yield error_frame(stream_id, ERR_REJECTED, message);
                        }
                        continue;
                    }
                    Inbound::Cancel { message } => {
                        tracing::warn!(peer = %peer_label, stream_id, "cancelled our request: {message}");
                        let _ = inject.try_send(frame::Cancel::builder(stream_id, 0).build());
                        // Fails our request and drops the fragments the engine holds.
                        yield error_frame(stream_id, ERR_REJECTED, message);
                        continue;
                    }
                    Inbound::Pass { completes_fnf } => {
                        let Some(frame) = frame else { continue };
                        if completes_fnf {
                            // Read no further until the responder has room for one more.
                            let permit = tokio::select! {
                                permit = bounds.fire_and_forget.clone().acquire_owned() => permit,
                                _ = closed_or_shutdown(&mut close_rx, &mut shutdown) => break,
                            };
                            match permit {
                                Ok(permit) => permit.forget(),
                                Err(_) => break,
                            }
                        }
                                let frame = match frame.get_body_ref() {
                            Body::Keepalive(k) if k.get_data().is_some_and(|d| !d.is_empty()) => {
                                without_data(frame)
                            }
                            _ => frame,
                        };
                        yield frame;
                    }
                }
            }
        };
        (tx, Box::pin(frames))
    }
}

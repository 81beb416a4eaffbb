//! The RSocket engine of one connection: the requests we make and their answers, the requests the
//! peer makes and our answers, fragments both ways, keepalives and the end of the connection.
//!
//! It replaces rsocket_rust's `DuplexSocket`, whose tasks hold each other (a task spawned with a
//! clone of the socket waits on a channel the socket itself feeds): no connection's state was ever
//! freed, so every reconnect cost the twin ~12 KiB for good. Here ownership is one way only:
//!
//! - the [`Socket`] (held by [`crate::Requester`]s) owns the sender to the writer and the table of
//!   our requests waiting for answers — nothing in it points back at a task;
//! - the dispatcher ([`run`]) owns the frames read from the peer, the fragments being joined, the
//!   responder and the cancel handles of the streams it serves; it ends when the connection does
//!   and drops all of it, failing every request still waiting;
//! - tasks serving one request own what they need and end with their answer, or at the close.
//!
//! Frames reach the dispatcher only after `guard.rs` judged them against the open streams, so it
//! can trust stream ids and the order of fragments; it still never panics on a frame it does not
//! expect (it drops it). Frame types and their encoding stay rsocket_rust's (`rsocket_rust::frame`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use rsocket_rust::error::{
    ERR_APPLICATION, ERR_CANCELED, ERR_CONN_CLOSED, ERR_CONN_FAILED, ERR_INVALID,
    ERR_INVALID_SETUP, ERR_REJECT_SETUP, ERR_REJECTED, ERR_UNSUPPORTED_SETUP,
};
use rsocket_rust::frame::{self, Body, Frame};
use tokio::sync::{mpsc, oneshot};

use crate::Refusal;
use crate::bounds::Bounds;
use crate::conn::CloseSignal;
use crate::fragments::{Join, Opening, frames};
use crate::router::{Responder, route_of};

/// One item of an answer to our request.
#[derive(Debug)]
enum Answer {
    Next(Bytes),
    Complete,
    Failed(String),
}

enum Waiter {
    Response(oneshot::Sender<Answer>),
    /// Unbounded: we only request streams whose size the request itself names (windows) or
    /// small control streams, and the dispatcher must never wait on a slow reader — the answers
    /// to the reader's own next requests come through the same dispatcher.
    Stream(mpsc::UnboundedSender<Answer>),
}

/// Why one of our requests got no answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The peer answered with an ERROR frame (`CODE: message`).
    Remote(String),
    /// The connection ended first.
    Closed,
}

/// Our side of one connection, shared by every [`crate::Requester`] of it.
pub(crate) struct Socket {
    tx: mpsc::Sender<Frame>,
    waiting: Mutex<HashMap<u32, Waiter>>,
    next_id: AtomicU32,
    mtu: usize,
    pub(crate) close: CloseSignal,
    /// Why the peer ended the connection (an ERROR on stream 0, e.g. REJECTED_SETUP).
    ended: Mutex<Option<String>>,
}

/// The peer's requests go to this responder.
pub(crate) struct Served {
    pub responder: Arc<dyn Responder>,
    /// The metadata MIME type the peer declared in SETUP.
    pub metadata_mime: String,
    pub max_payload: usize,
    pub peer_label: String,
}

/// What SETUP means to this side.
pub(crate) enum Role {
    /// We sent SETUP; the peer's requests (if any) go to this responder.
    Client(Option<Served>),
    /// The peer's first frame is SETUP; this decides what serves the connection, or refuses it
    /// (the message reaches the peer in a REJECTED_SETUP error).
    Server(Box<dyn FnOnce(frame::Setup) -> Result<Served, Refusal> + Send>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn error_frame(stream_id: u32, code: u32, message: impl Into<String>) -> Frame {
    frame::Error::builder(stream_id, 0)
        .set_code(code)
        .set_data(Bytes::from(message.into()))
        .build()
}

fn code_name(code: u32) -> String {
    match code {
        ERR_INVALID_SETUP => "INVALID_SETUP".into(),
        ERR_UNSUPPORTED_SETUP => "UNSUPPORTED_SETUP".into(),
        ERR_REJECT_SETUP => "REJECTED_SETUP".into(),
        ERR_CONN_FAILED => "CONNECTION_ERROR".into(),
        ERR_CONN_CLOSED => "CONNECTION_CLOSE".into(),
        ERR_APPLICATION => "APPLICATION_ERROR".into(),
        ERR_REJECTED => "REJECTED".into(),
        ERR_CANCELED => "CANCELED".into(),
        ERR_INVALID => "INVALID".into(),
        other => format!("ERROR {other:#x}"),
    }
}

fn described(error: &frame::Error) -> String {
    let text = error
        .get_data()
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .unwrap_or_default();
    format!("{}: {text}", code_name(error.get_code()))
}

/// A request of ours still waiting: dropping it (a deadline, a reader that stopped) forgets the
/// request and tells the peer with CANCEL.
struct Outstanding {
    socket: Arc<Socket>,
    id: u32,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        let was_waiting = lock(&self.socket.waiting).remove(&self.id).is_some();
        if was_waiting && !self.socket.close.is_closed() {
            let _ = self
                .socket
                .tx
                .try_send(frame::Cancel::builder(self.id, 0).build());
        }
    }
}

impl Socket {
    /// `first_id`: 1 on the client, 2 on the server (RSocket: clients open odd streams, servers
    /// even ones, and stream 0 is the connection's).
    pub fn new(tx: mpsc::Sender<Frame>, first_id: u32, mtu: usize, close: CloseSignal) -> Self {
        Self {
            tx,
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(first_id),
            mtu,
            close,
            ended: Mutex::new(None),
        }
    }

    /// Why the peer ended the connection, when it said so.
    pub fn ended(&self) -> Option<String> {
        lock(&self.ended).clone()
    }

    fn next_id(&self) -> u32 {
        // Ids are never reused while the connection lasts: 2^30 requests of one parity is
        // decades of a car's requests; past that the connection is ended and made anew.
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        if id > frame::REQUEST_MAX {
            self.close.close();
        }
        id
    }

    async fn send_all(&self, frames: Vec<Frame>) -> Result<(), Failure> {
        for frame in frames {
            self.tx.send(frame).await.map_err(|_| Failure::Closed)?;
        }
        Ok(())
    }

    fn closed_failure(&self) -> Failure {
        match self.ended() {
            Some(why) => Failure::Remote(why),
            None => Failure::Closed,
        }
    }

    fn register(self: &Arc<Self>, waiter: Waiter) -> Result<Outstanding, Failure> {
        if self.close.is_closed() {
            return Err(self.closed_failure());
        }
        let id = self.next_id();
        lock(&self.waiting).insert(id, waiter);
        Ok(Outstanding {
            socket: self.clone(),
            id,
        })
    }

    /// `Ok(None)`: the peer completed without data.
    pub async fn request_response(
        self: &Arc<Self>,
        metadata: Bytes,
        data: Bytes,
    ) -> Result<Option<Bytes>, Failure> {
        let (tx, rx) = oneshot::channel();
        let outstanding = self.register(Waiter::Response(tx))?;
        self.send_all(frames(
            outstanding.id,
            Opening::Response,
            Some(metadata),
            data,
            self.mtu,
        ))
        .await?;
        let answer = rx.await;
        drop(outstanding);
        match answer {
            Ok(Answer::Next(data)) => Ok(Some(data)),
            Ok(Answer::Complete) => Ok(None),
            Ok(Answer::Failed(why)) => Err(Failure::Remote(why)),
            Err(_) => Err(self.closed_failure()),
        }
    }

    pub async fn fire_and_forget(&self, metadata: Bytes, data: Bytes) -> Result<(), Failure> {
        if self.close.is_closed() {
            return Err(self.closed_failure());
        }
        let id = self.next_id();
        self.send_all(frames(
            id,
            Opening::FireAndForget,
            Some(metadata),
            data,
            self.mtu,
        ))
        .await
    }

    /// The items of a request-stream until the peer completes it; it ends after its first
    /// error. Dropping it cancels the request.
    pub fn request_stream(
        self: &Arc<Self>,
        metadata: Bytes,
        data: Bytes,
    ) -> impl Stream<Item = Result<Bytes, Failure>> + Send + 'static {
        let socket = self.clone();
        async_stream::stream! {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let outstanding = match socket.register(Waiter::Stream(tx)) {
                Ok(outstanding) => outstanding,
                Err(failure) => {
                    yield Err(failure);
                    return;
                }
            };
            let request = frames(outstanding.id, Opening::Stream, Some(metadata), data, socket.mtu);
            if let Err(failure) = socket.send_all(request).await {
                yield Err(failure);
                return;
            }
            loop {
                match rx.recv().await {
                    Some(Answer::Next(data)) => yield Ok(data),
                    Some(Answer::Complete) => break,
                    Some(Answer::Failed(why)) => {
                        yield Err(Failure::Remote(why));
                        break;
                    }
                    None => {
                        yield Err(socket.closed_failure());
                        break;
                    }
                }
            }
            drop(outstanding);
        }
    }

    /// Deliver an answer frame (all fragments joined) to the request waiting for it.
    fn answer(&self, id: u32, flags: u16, data: Bytes) {
        let mut waiting = lock(&self.waiting);
        let next = flags & Frame::FLAG_NEXT != 0;
        let complete = flags & Frame::FLAG_COMPLETE != 0;
        match waiting.get(&id) {
            Some(Waiter::Response(_)) => {
                if let Some(Waiter::Response(tx)) = waiting.remove(&id) {
                    let _ = tx.send(if next {
                        Answer::Next(data)
                    } else {
                        Answer::Complete
                    });
                }
            }
            Some(Waiter::Stream(tx)) => {
                if next {
                    let _ = tx.send(Answer::Next(data));
                }
                if complete && let Some(Waiter::Stream(tx)) = waiting.remove(&id) {
                    let _ = tx.send(Answer::Complete);
                }
            }
            // Cancelled by us; the guard lets late frames through only while it knows the stream.
            None => {}
        }
    }

    fn fail(&self, id: u32, why: String) {
        match lock(&self.waiting).remove(&id) {
            Some(Waiter::Response(tx)) => {
                let _ = tx.send(Answer::Failed(why));
            }
            Some(Waiter::Stream(tx)) => {
                let _ = tx.send(Answer::Failed(why));
            }
            None => {}
        }
    }

    /// Send now or not at all: for frames the dispatcher makes (keepalive answers, refusals),
    /// which must never make it wait for the writer.
    fn send_now(&self, frame: Frame) {
        let _ = self.tx.try_send(frame);
    }
}

/// Send our keepalive every `interval` until the connection ends; the peer answers each, so both
/// ends see a frame at least once per interval (their idle timeout is 3 intervals).
pub(crate) fn keepalive(socket: &Arc<Socket>, interval: Duration) {
    let tx = socket.tx.clone();
    let close = socket.close.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = close.closed() => return,
            }
            let ping = frame::Keepalive::builder(0, Frame::FLAG_RESPOND).build();
            if tx.send(ping).await.is_err() {
                return;
            }
        }
    });
}

/// Send `first` (the client's SETUP) ahead of anything else, then serve the connection on a task
/// of its own.
pub(crate) async fn start(
    socket: &Arc<Socket>,
    first: Option<Frame>,
    bounds: Arc<Bounds>,
    incoming: impl Stream<Item = Frame> + Send + Unpin + 'static,
    role: Role,
) -> Result<(), Failure> {
    if let Some(frame) = first {
        socket.tx.send(frame).await.map_err(|_| Failure::Closed)?;
    }
    tokio::spawn(run(socket.clone(), bounds, incoming, role));
    Ok(())
}

/// Serve one connection until it ends: read the peer's frames (already judged by the guard),
/// join fragments, answer its requests, deliver answers to ours. At the end every request still
/// waiting fails and the responder is dropped.
async fn run(
    socket: Arc<Socket>,
    bounds: Arc<Bounds>,
    mut incoming: impl Stream<Item = Frame> + Unpin,
    role: Role,
) {
    let (serving, mut on_setup) = match role {
        Role::Client(served) => (served.map(Arc::new), None),
        Role::Server(decide) => (None, Some(decide)),
    };
    let mut joins: HashMap<u32, Join> = HashMap::new();
    let mut serve = Serve {
        in_order: serving
            .as_ref()
            .map(|served| fire_and_forget_in_order(served, &bounds)),
        serving,
        socket: socket.clone(),
        bounds,
        streams: Arc::default(),
    };

    while let Some(frame) = incoming.next().await {
        let id = frame.get_stream_id();
        let flags = frame.get_flag();
        let follows = flags & Frame::FLAG_FOLLOW != 0;
        let (opening, parts) = match frame.get_body() {
            Body::Setup(setup) => {
                if let Some(decide) = on_setup.take() {
                    match decide(setup) {
                        Ok(served) => {
                            let served = Arc::new(served);
                            serve.in_order = Some(fire_and_forget_in_order(&served, &serve.bounds));
                            serve.serving = Some(served);
                        }
                        Err(refusal) => {
                            socket.send_now(error_frame(0, ERR_REJECT_SETUP, refusal.0))
                        }
                    }
                }
                continue;
            }
            Body::Keepalive(_) => {
                if flags & Frame::FLAG_RESPOND != 0 {
                    socket.send_now(frame::Keepalive::builder(0, 0).build());
                }
                continue;
            }
            Body::Error(error) => {
                joins.remove(&id);
                let why = described(&error);
                if id == 0 {
                    tracing::debug!("the peer ended the connection: {why}");
                    *lock(&socket.ended) = Some(why);
                    socket.close.close();
                    break;
                }
                socket.fail(id, why);
                continue;
            }
            Body::Cancel() => {
                joins.remove(&id);
                lock(&serve.streams).remove(&id);
                continue;
            }
            Body::RequestResponse(r) => (Opening::Response, r.split()),
            Body::RequestStream(r) => (Opening::Stream, r.split()),
            Body::RequestFNF(r) => (Opening::FireAndForget, r.split()),
            Body::Payload(p) => {
                let parts = p.split();
                if let Some(join) = joins.get_mut(&id) {
                    join.push(parts, flags);
                    if follows {
                        continue;
                    }
                    let Some(join) = joins.remove(&id) else {
                        continue;
                    };
                    let metadata = join.metadata.map(BytesMut::freeze);
                    let data = join.data.freeze();
                    match join.opening {
                        Opening::Answer { .. } => socket.answer(id, join.flags, data),
                        opening => serve.request(id, opening, metadata, data),
                    }
                    continue;
                }
                if follows {
                    joins.insert(
                        id,
                        Join::start(Opening::Answer { complete: false }, parts, flags),
                    );
                } else {
                    socket.answer(id, flags, parts.0.unwrap_or_default());
                }
                continue;
            }
            // Not part of the protocol: the guard drops them before they get here.
            _ => continue,
        };
        if follows {
            joins.insert(id, Join::start(opening, parts, flags));
            continue;
        }
        let (data, metadata) = parts;
        serve.request(id, opening, metadata, data.unwrap_or_default());
    }
    socket.close.close();
    // Everything waiting learns the connection is gone: dropping the senders ends each wait.
    lock(&socket.waiting).clear();
    lock(&serve.streams).clear();
}

/// A peer's fire-and-forget request, for the task that hands them to the responder in order.
type Forgotten = (Result<String, Refusal>, Bytes);

/// Fire-and-forget requests are handled one after the other, in the order they arrived: a car's
/// reports are numbered and the twin drops one older than the last it stored, so handling them
/// side by side would lose the one that lost the race. (The reader's permits bound the queue.)
fn fire_and_forget_in_order(
    served: &Arc<Served>,
    bounds: &Arc<Bounds>,
) -> mpsc::UnboundedSender<Forgotten> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Forgotten>();
    let (served, bounds) = (served.clone(), bounds.clone());
    tokio::spawn(async move {
        while let Some((request, data)) = rx.recv().await {
            match request {
                Ok(route) => served.responder.fire_and_forget(&route, data).await,
                Err(refusal) => tracing::warn!(peer = %served.peer_label,
                    "dropped a fire-and-forget request: {refusal}"),
            }
            // The reader took a permit before it passed this request on.
            bounds.fire_and_forget_done();
        }
    });
    tx
}

/// What serves the peer's requests on one connection.
struct Serve {
    socket: Arc<Socket>,
    bounds: Arc<Bounds>,
    /// None until SETUP was accepted (on the twin), or on a car that serves nothing.
    serving: Option<Arc<Served>>,
    in_order: Option<mpsc::UnboundedSender<Forgotten>>,
    /// Cancel handles of the streams we serve; dropping one ends its stream.
    streams: Arc<Mutex<HashMap<u32, oneshot::Sender<()>>>>,
}

impl Serve {
    /// Hand one complete request of the peer to the responder: fire-and-forget requests to the
    /// queue that keeps their order, the others on a task of their own.
    fn request(&self, id: u32, opening: Opening, metadata: Option<Bytes>, data: Bytes) {
        let (socket, bounds, in_order, streams) = (
            &self.socket,
            &self.bounds,
            self.in_order.as_ref(),
            &self.streams,
        );
        let fnf = opening == Opening::FireAndForget;
        let Some(served) = self.serving.clone() else {
            if fnf {
                bounds.fire_and_forget_done();
            } else {
                socket.send_now(error_frame(
                    id,
                    ERR_APPLICATION,
                    "this side serves no requests",
                ));
            }
            return;
        };
        let request = route_of(&served.metadata_mime, metadata.as_ref()).and_then(|route| {
            // The guard already refuses oversized frames; this also covers joined fragments.
            if data.len() > served.max_payload {
                Err(Refusal::new(format!(
                    "{route}: payload of {} bytes exceeds the {}-byte limit",
                    data.len(),
                    served.max_payload
                )))
            } else {
                Ok(route)
            }
        });
        let (socket, bounds) = (socket.clone(), bounds.clone());
        match opening {
            Opening::FireAndForget => {
                if in_order.is_none_or(|queue| queue.send((request, data)).is_err()) {
                    bounds.fire_and_forget_done();
                }
            }
            Opening::Response => {
                tokio::spawn(async move {
                    let answer = match request {
                        Ok(route) => served.responder.request_response(&route, data).await,
                        Err(refusal) => Err(refusal),
                    };
                    match answer {
                        Ok(answer) => {
                            // The answer waits for room in the connection's outbound budget; the
                            // writer gives the bytes back as it writes them.
                            if bounds.outbound.reserve(answer.len(), &bounds.close).await {
                                let answer = frames(
                                    id,
                                    Opening::Answer { complete: true },
                                    None,
                                    answer,
                                    socket.mtu,
                                );
                                let _ = socket.send_all(answer).await;
                            }
                        }
                        Err(refusal) => {
                            let _ = socket
                                .tx
                                .send(error_frame(id, ERR_APPLICATION, refusal.0))
                                .await;
                        }
                    }
                });
            }
            Opening::Stream => {
                let (cancel_tx, mut cancelled) = oneshot::channel::<()>();
                lock(streams).insert(id, cancel_tx);
                let streams = streams.clone();
                tokio::spawn(async move {
                    let mut items = match request {
                        Ok(route) => served.responder.request_stream(&route, data),
                        Err(refusal) => futures::stream::once(async move { Err(refusal) }).boxed(),
                    };
                    loop {
                        // Only the wait for the next item is cut short: bytes reserved in the budget
                        // are always handed to the writer, which gives them back.
                        let item = tokio::select! {
                            item = items.next() => item,
                            _ = &mut cancelled => break,
                            () = bounds.close.closed() => break,
                        };
                        match item {
                            Some(Ok(bytes)) => {
                                if !bounds.outbound.reserve(bytes.len(), &bounds.close).await {
                                    break;
                                }
                                let item = frames(
                                    id,
                                    Opening::Answer { complete: false },
                                    None,
                                    bytes,
                                    socket.mtu,
                                );
                                if socket.send_all(item).await.is_err() {
                                    break;
                                }
                            }
                            Some(Err(refusal)) => {
                                let _ = socket
                                    .tx
                                    .send(error_frame(id, ERR_APPLICATION, refusal.0))
                                    .await;
                                break;
                            }
                            None => {
                                let end = frame::Payload::builder(id, Frame::FLAG_COMPLETE).build();
                                let _ = socket.tx.send(end).await;
                                break;
                            }
                        }
                    }
                    lock(&streams).remove(&id);
                });
            }
            Opening::Answer { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_like_the_spec_names_them() {
        let Body::Error(e) = error_frame(0, ERR_REJECT_SETUP, "revoked").get_body() else {
            unreachable!()
        };
        assert_eq!(described(&e), "REJECTED_SETUP: revoked");
    }
}

//! The stream discipline of one connection, enforced below the engine: which frames a peer may
//! send given the streams that are open, how many streams it may hold, and which of our own
//! frames still have a stream to go to.
//!
//! An RSocket engine trusts its peer (rsocket_rust's reached an `unreachable!()` on a PAYLOAD or
//! ERROR for a request the peer itself opened, served however many requests arrived and kept
//! answering a stream the peer abandoned). A car is a potential attacker (a key can be pulled out
//! of an ECU), so every frame passes [`Streams::inbound`] before the engine (`socket.rs`) sees
//! it and every frame we send passes [`Streams::outbound`] before it is written. The decisions
//! are pure (no I/O, no clock but the one passed in) and unit-tested here; `conn.rs` acts on them.
//!
//! The rules, from the RSocket spec's stream lifecycle:
//! - the peer opens streams with ids of its parity (clients odd, servers even), never one
//!   still open (requests are numbered when made and queued for the writer as there is room, so
//!   they may arrive out of order); at most `max_streams` of its request-response and request-stream
//!   streams may be open at once — more are refused with ERROR `REJECTED`;
//! - a peer stream is open from its request frame until we send its terminal frame or the peer
//!   cancels it; while it is open the peer may send only CANCEL (and the fragments of the request
//!   itself) on it;
//! - on streams we opened the peer sends PAYLOAD and ERROR; frames on one of those we already
//!   ended (we cancelled it) are late, not wrong, and are dropped;
//! - request-channel, LEASE, RESUME, REQUEST_N and METADATA_PUSH are not part of the protocol.
//!
//! A frame that breaks a rule which no honest implementation breaks is [`Inbound::Malformed`]:
//! the connection is dropped.
//!
//! One quirk is accepted: twins built on rsocket_rust 0.7.5 numbered their own requests from 0, the
//! connection's stream, so such a twin's first request to a car (e.g. `twin.inspect`) travels on
//! stream 0. Stream 0 is therefore an ordinary even (server) stream for requests and their
//! answers, and the connection's stream for everything else.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rsocket_rust::frame::{Body, Frame};
use rsocket_rust::utils::Writeable;

/// Peers may interleave fragmented payloads on this many streams at once.
pub(crate) const MAX_FRAGMENTING_STREAMS: usize = 8;
/// Refused requests whose remaining fragments are still being skipped; a peer that piles up
/// more than this is not an honest one.
const MAX_DROPPING: usize = 64;
/// A peer's KEEPALIVE asking for an answer is answered at most this often; the rest are dropped
/// (an honest peer sends one per heartbeat interval, which is never below 100 ms).
const KEEPALIVE_EVERY: Duration = Duration::from_millis(100);

/// What kind of request opened a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Response,
    Stream,
    FireAndForget,
}

/// A stream the peer opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Theirs {
    /// The request is still arriving in fragments; `bytes` so far.
    Arriving { kind: Kind, bytes: usize },
    /// The request was handed on; we owe it an answer.
    Open(Kind),
}

/// What to do with one frame from the peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// Hand it to the engine. `completes_fnf`: it completes a fire-and-forget request, which the
    /// engine will hand to the responder (the reader takes a permit for it first).
    Pass { completes_fnf: bool },
    /// Ignore it: a late frame for a stream that already ended, or a frame type we do not use.
    Drop,
    /// Refuse the peer's stream with ERROR `REJECTED` and this message; when `local` is set,
    /// the engine already holds fragments of it and must be told to drop them.
    Reject { message: String, local: bool },
    /// A response to our request broke a limit: cancel our request and fail it locally.
    Cancel { message: String },
    /// The peer broke the protocol: drop the connection.
    Malformed(String),
}

impl Inbound {
    const PASS: Self = Self::Pass {
        completes_fnf: false,
    };

    fn reject(message: impl Into<String>) -> Self {
        Self::Reject {
            message: message.into(),
            local: false,
        }
    }
}

/// The open streams of one connection, both directions.
#[derive(Debug)]
pub(crate) struct Streams {
    we_open_odd: bool,
    /// On the twin: the first frame must be SETUP, and only one may come.
    expect_setup: bool,
    setup_seen: bool,
    max_streams: usize,
    /// Largest request or response a peer may send in fragments.
    max_fragmented: usize,
    theirs: HashMap<u32, Theirs>,
    highest_theirs: Option<u32>,
    /// Streams we opened that still expect frames, and the bytes of a fragmented answer so far.
    ours: HashMap<u32, (Kind, usize)>,
    highest_ours: Option<u32>,
    /// Refused peer streams whose further fragments are skipped.
    dropping: HashSet<u32>,
    /// Refusals queued for the writer: the only frames sent on streams that are not open.
    refusing: HashSet<u32>,
    last_keepalive: Option<Instant>,
}

fn is_odd(id: u32) -> bool {
    id % 2 == 1
}

fn follows(frame: &Frame) -> bool {
    frame.get_flag() & Frame::FLAG_FOLLOW != 0
}

impl Streams {
    pub fn new(
        we_open_odd: bool,
        expect_setup: bool,
        max_streams: usize,
        max_fragmented: usize,
    ) -> Self {
        Self {
            we_open_odd,
            expect_setup,
            setup_seen: false,
            max_streams,
            max_fragmented,
            theirs: HashMap::new(),
            highest_theirs: None,
            ours: HashMap::new(),
            highest_ours: None,
            dropping: HashSet::new(),
            refusing: HashSet::new(),
            last_keepalive: None,
        }
    }

    fn is_ours(&self, id: u32) -> bool {
        is_odd(id) == self.we_open_odd
    }

    /// Whether stream `id` of the peer's parity was ever opened.
    fn theirs_seen(&self, id: u32) -> bool {
        self.highest_theirs.is_some_and(|h| id <= h)
    }

    /// Whether stream `id` of our parity was ever opened by us.
    fn ours_seen(&self, id: u32) -> bool {
        self.highest_ours.is_some_and(|h| id <= h)
    }

    /// Whether frames on `id` belong to a stream rather than to the connection: every id but 0,
    /// and 0 once a server request used it.
    fn on_stream(&self, id: u32) -> bool {
        let server_used_0 = if self.we_open_odd {
            self.theirs_seen(0)
        } else {
            self.ours_seen(0)
        };
        id != 0 || server_used_0
    }

    /// Streams the peer holds open with us (its requests we still answer).
    pub fn open_theirs(&self) -> usize {
        self.theirs
            .values()
            .filter(|t| {
                !matches!(
                    t,
                    Theirs::Arriving {
                        kind: Kind::FireAndForget,
                        ..
                    }
                )
            })
            .count()
    }

    fn fragmenting(&self) -> usize {
        self.theirs
            .values()
            .filter(|t| matches!(t, Theirs::Arriving { .. }))
            .count()
            + self.ours.values().filter(|(_, bytes)| *bytes > 0).count()
    }

    /// Remember that the writer will send a refusal on `id` (see [`Streams::outbound`]).
    fn refuse(&mut self, id: u32, follows: bool) -> Result<(), Inbound> {
        if follows {
            if self.dropping.len() >= MAX_DROPPING {
                return Err(Inbound::Malformed(format!(
                    "more than {MAX_DROPPING} refused requests still sending fragments"
                )));
            }
            self.dropping.insert(id);
        }
        self.refusing.insert(id);
        Ok(())
    }

    /// The refusal on `id` could not be queued: forget it.
    pub fn refusal_dropped(&mut self, id: u32) {
        self.refusing.remove(&id);
    }

    /// Judge one frame from the peer.
    pub fn inbound(&mut self, frame: &Frame, now: Instant) -> Inbound {
        let id = frame.get_stream_id();
        let body = frame.get_body_ref();
        if let Body::Setup(_) = body {
            if !self.expect_setup {
                return Inbound::Malformed("SETUP sent to the client side".into());
            }
            if self.setup_seen {
                return Inbound::Malformed("a second SETUP on one connection".into());
            }
            self.setup_seen = true;
            return Inbound::PASS;
        }
        if self.expect_setup && !self.setup_seen {
            return Inbound::Malformed("the first frame of a connection must be SETUP".into());
        }
        match body {
            Body::Setup(_) => Inbound::PASS,
            Body::Keepalive(_) => {
                if id != 0 {
                    return Inbound::Malformed(format!("KEEPALIVE on stream {id}"));
                }
                if frame.get_flag() & Frame::FLAG_RESPOND == 0 {
                    return Inbound::PASS;
                }
                let due = self
                    .last_keepalive
                    .is_none_or(|last| now.duration_since(last) >= KEEPALIVE_EVERY);
                if due {
                    self.last_keepalive = Some(now);
                    Inbound::PASS
                } else {
                    Inbound::Drop
                }
            }
            Body::Lease(_)
            | Body::Resume(_)
            | Body::ResumeOK(_)
            | Body::MetadataPush(_)
            | Body::RequestN(_) => Inbound::Drop,
            Body::RequestResponse(_)
            | Body::RequestStream(_)
            | Body::RequestFNF(_)
            | Body::RequestChannel(_) => self.request(frame),
            Body::Payload(_) => self.payload(frame),
            Body::Error(_) if !self.on_stream(id) => Inbound::PASS,
            Body::Error(_) => {
                if !self.is_ours(id) {
                    return if self.theirs.contains_key(&id) {
                        Inbound::Malformed(format!(
                            "ERROR on stream {id}, a request the peer opened (a requester cancels with CANCEL)"
                        ))
                    } else {
                        Inbound::Drop
                    };
                }
                if !self.ours_seen(id) {
                    return Inbound::Malformed(format!(
                        "ERROR on stream {id}, which was never opened"
                    ));
                }
                if self.ours.remove(&id).is_some() {
                    Inbound::PASS
                } else {
                    Inbound::Drop
                }
            }
            Body::Cancel() => {
                if !self.on_stream(id) {
                    return Inbound::Malformed("CANCEL on the connection's stream 0".into());
                }
                if self.is_ours(id) {
                    // Only the requester cancels; a responder's CANCEL means nothing.
                    return Inbound::Drop;
                }
                match self.theirs.get(&id) {
                    // The CANCEL is not passed on: the engine finishes the answer and sends it
                    // (the peer ignores it), so every reserved byte of the outbound budget is
                    // released by the writer and the stream's slot stays taken while the work it
                    // asked for goes on.
                    Some(Theirs::Open(Kind::Response)) => Inbound::Drop,
                    Some(_) => {
                        self.theirs.remove(&id);
                        self.dropping.remove(&id);
                        Inbound::PASS
                    }
                    None => Inbound::Drop,
                }
            }
        }
    }

    fn request(&mut self, frame: &Frame) -> Inbound {
        let id = frame.get_stream_id();
        if self.is_ours(id) {
            return Inbound::Malformed(format!(
                "a request on stream {id}, which is not one the peer may open"
            ));
        }
        // A request is numbered when it is made but queued for the writer when there is room, so
        // ids may arrive out of order: only an id still in use is refused.
        if self.theirs.contains_key(&id) || self.dropping.contains(&id) {
            return Inbound::Malformed(format!(
                "a request reuses stream {id}, which is still open"
            ));
        }
        self.highest_theirs = Some(self.highest_theirs.map_or(id, |h| h.max(id)));
        let follows = follows(frame);
        let kind = match frame.get_body_ref() {
            Body::RequestResponse(_) => Kind::Response,
            Body::RequestStream(_) => Kind::Stream,
            Body::RequestFNF(_) => Kind::FireAndForget,
            _ => {
                return match self.refuse(id, follows) {
                    Ok(()) => {
                        Inbound::reject("request-channel is not part of the cardeploy protocol")
                    }
                    Err(malformed) => malformed,
                };
            }
        };
        let refusal = if kind != Kind::FireAndForget && self.open_theirs() >= self.max_streams {
            Some(format!(
                "more than {} concurrent streams on one connection; wait for one to end",
                self.max_streams
            ))
        } else if follows && self.fragmenting() >= MAX_FRAGMENTING_STREAMS {
            Some(format!(
                "more than {MAX_FRAGMENTING_STREAMS} fragmented payloads at once"
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            return match self.refuse(id, follows) {
                Ok(()) => Inbound::reject(message),
                Err(malformed) => malformed,
            };
        }
        if follows {
            self.theirs.insert(
                id,
                Theirs::Arriving {
                    kind,
                    bytes: frame.len(),
                },
            );
            Inbound::PASS
        } else if kind == Kind::FireAndForget {
            Inbound::Pass {
                completes_fnf: true,
            }
        } else {
            self.theirs.insert(id, Theirs::Open(kind));
            Inbound::PASS
        }
    }

    fn payload(&mut self, frame: &Frame) -> Inbound {
        let id = frame.get_stream_id();
        let follows = follows(frame);
        if !self.on_stream(id) {
            return Inbound::Malformed("PAYLOAD on the connection's stream 0".into());
        }
        if !self.is_ours(id) {
            if self.dropping.contains(&id) {
                if !follows {
                    self.dropping.remove(&id);
                }
                return Inbound::Drop;
            }
            return match self.theirs.get(&id).copied() {
                Some(Theirs::Arriving { kind, bytes }) => {
                    let bytes = bytes + frame.len();
                    if bytes > self.max_fragmented {
                        self.theirs.remove(&id);
                        return match self.refuse(id, follows) {
                            Ok(()) => Inbound::Reject {
                                message: format!(
                                    "fragmented payload exceeds the {}-byte limit",
                                    self.max_fragmented
                                ),
                                local: true,
                            },
                            Err(malformed) => malformed,
                        };
                    }
                    if follows {
                        self.theirs.insert(id, Theirs::Arriving { kind, bytes });
                        Inbound::PASS
                    } else if kind == Kind::FireAndForget {
                        self.theirs.remove(&id);
                        Inbound::Pass {
                            completes_fnf: true,
                        }
                    } else {
                        self.theirs.insert(id, Theirs::Open(kind));
                        Inbound::PASS
                    }
                }
                Some(Theirs::Open(_)) => Inbound::Malformed(format!(
                    "PAYLOAD on stream {id}, a request the peer opened and already sent"
                )),
                None if !self.theirs_seen(id) => {
                    Inbound::Malformed(format!("PAYLOAD on stream {id}, which was never opened"))
                }
                None => Inbound::Drop,
            };
        }
        if !self.ours_seen(id) {
            return Inbound::Malformed(format!("PAYLOAD on stream {id}, a request we never made"));
        }
        let Some((kind, so_far)) = self.ours.get(&id).copied() else {
            // We cancelled it; frames already on their way still arrive.
            return Inbound::Drop;
        };
        if follows {
            let bytes = so_far + frame.len();
            if (so_far == 0 && self.fragmenting() >= MAX_FRAGMENTING_STREAMS)
                || bytes > self.max_fragmented
            {
                self.ours.remove(&id);
                return Inbound::Cancel {
                    message: if bytes > self.max_fragmented {
                        format!(
                            "fragmented payload exceeds the {}-byte limit",
                            self.max_fragmented
                        )
                    } else {
                        format!("more than {MAX_FRAGMENTING_STREAMS} fragmented payloads at once")
                    },
                };
            }
            self.ours.insert(id, (kind, bytes));
            return Inbound::PASS;
        }
        let complete = frame.get_flag() & Frame::FLAG_COMPLETE != 0;
        if kind == Kind::Response || complete {
            self.ours.remove(&id);
        } else {
            self.ours.insert(id, (kind, 0));
        }
        Inbound::PASS
    }

    /// The codec skipped a frame on `id` that was larger than the frame limit.
    pub fn oversized(&mut self, id: u32, limits: (usize, usize)) -> Inbound {
        let (max_frame, max_payload) = limits;
        let message = format!(
            "frame exceeds the {max_frame}-byte limit; payloads are limited to {max_payload} bytes"
        );
        if !self.on_stream(id) {
            return Inbound::Malformed("an oversized frame on the connection's stream 0".into());
        }
        if self.is_ours(id) {
            return if self.ours.remove(&id).is_some() {
                Inbound::Cancel { message }
            } else {
                Inbound::Drop
            };
        }
        match self.theirs.get(&id).copied() {
            Some(Theirs::Open(_)) => Inbound::Malformed(format!(
                "an oversized frame on stream {id}, a request the peer already sent"
            )),
            Some(Theirs::Arriving { .. }) => {
                self.theirs.remove(&id);
                match self.refuse(id, true) {
                    Ok(()) => Inbound::Reject {
                        message,
                        local: true,
                    },
                    Err(malformed) => malformed,
                }
            }
            // A new request that is too large: whether more fragments follow is in the flags
            // we skipped, so assume they do.
            None if !self.theirs_seen(id) => {
                self.highest_theirs = Some(id);
                match self.refuse(id, true) {
                    Ok(()) => Inbound::reject(message),
                    Err(malformed) => malformed,
                }
            }
            None => Inbound::Drop,
        }
    }

    /// Whether a frame we are about to write still has a stream to go to. Requests we make are
    /// recorded here; answers on a peer stream that ended (cancelled, refused, or already
    /// completed) are not sent.
    pub fn outbound(&mut self, frame: &Frame) -> bool {
        let id = frame.get_stream_id();
        let body = frame.get_body_ref();
        let request = matches!(
            body,
            Body::RequestResponse(_)
                | Body::RequestStream(_)
                | Body::RequestFNF(_)
                | Body::RequestChannel(_)
        );
        if !request && !self.on_stream(id) {
            return true;
        }
        if self.is_ours(id) {
            match body {
                Body::RequestResponse(_) | Body::RequestStream(_) => {
                    let kind = if matches!(body, Body::RequestStream(_)) {
                        Kind::Stream
                    } else {
                        Kind::Response
                    };
                    self.ours.insert(id, (kind, 0));
                    self.highest_ours = Some(self.highest_ours.map_or(id, |h| h.max(id)));
                }
                Body::RequestFNF(_) | Body::RequestChannel(_) => {
                    self.highest_ours = Some(self.highest_ours.map_or(id, |h| h.max(id)));
                }
                Body::Cancel() => {
                    self.ours.remove(&id);
                }
                _ => {}
            }
            return true;
        }
        if let Body::Error(_) = body
            && self.refusing.remove(&id)
        {
            return true;
        }
        match (body, self.theirs.get(&id).copied()) {
            (Body::Payload(_), Some(Theirs::Open(kind))) => {
                let last = !follows(frame)
                    && (kind == Kind::Response || frame.get_flag() & Frame::FLAG_COMPLETE != 0);
                if last {
                    self.theirs.remove(&id);
                }
                true
            }
            (Body::Error(_), Some(_)) => {
                self.theirs.remove(&id);
                true
            }
            _ => false,
        }
    }
}

/// Bytes of payload (data and metadata) a frame carries toward a peer stream's answer: what the
/// outbound budget counts.
pub(crate) fn answer_bytes(frame: &Frame, we_open_odd: bool) -> usize {
    if is_odd(frame.get_stream_id()) == we_open_odd {
        return 0;
    }
    match frame.get_body_ref() {
        Body::Payload(p) => {
            p.get_data().map_or(0, bytes::Bytes::len)
                + p.get_metadata().map_or(0, bytes::Bytes::len)
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests;

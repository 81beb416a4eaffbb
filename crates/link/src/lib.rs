//! The RSocket link shared by the car agent and the twin — the only crate that names
//! `rsocket_rust` types, and of those only its frames and metadata extensions.
//!
//! The connection runtime is our own (`socket.rs`): rsocket_rust 0.7.5, the last release, keeps
//! every connection's state after it ended (its tasks hold each other), and has further measured
//! gaps (docs/protocol.md, "The link's RSocket engine"). Each is closed here:
//!
//! | gap | closed by |
//! |---|---|
//! | TLS only through OpenSSL | [`tls`]: rustls (ring), mutual TLS 1.3 |
//! | no keepalive timeout | `conn`: the read side drops a peer silent for 3 heartbeat intervals, on both ends |
//! | pending requests hang after a connection loss | [`Requester`]: every request has a deadline and fails as soon as the connection closes, with the peer's reason when it gave one |
//! | no REQUEST_N, unbounded queues | [`Requester::request_window`]: data streams are read in windows the request names; overflow is an error |
//! | frames over 16 MiB panic the writer | fragmentation on ([`Limits::mtu`]), payloads ≤ [`Limits::max_payload`], checked before sending and while receiving |
//! | no resumption | not needed: data transfer resumes by content (chunks already stored are not fetched again) |
//! | METADATA_PUSH on a non-zero stream id | never sent; received ones are ignored |
//! | fire-and-forget handled inline, blocking every other frame while the responder works | `socket`: handled by a task of their own per connection, one after the other in the order sent |
//! | panics when sending on a closed connection | the writer discards frames after a close instead of failing |
//! | trusts its peer: `unreachable!()` on a PAYLOAD or ERROR for a request the peer opened, any number of open streams | `guard`: every frame checked against the open streams before the engine sees it; a peer that breaks the protocol is dropped, one that opens more than [`Limits::max_streams`] is refused with `REJECTED` |
//! | unbounded queues toward a slow reader and from a fire-and-forget flood | `bounds`: answers wait for room in [`Limits::max_queued`], a peer that reads nothing for [`Limits::send_stall`] is dropped, at most [`Limits::max_pending_fnf`] fire-and-forget requests are read ahead |
//! | keeps every connection's state (and socket) after it ended: its tasks hold each other | `socket`: ownership is one way (requesters → writer queue; the dispatcher owns the responder and drops it at the end); `conn`: the writer drops its half of the socket when the connection ends; the car's connection ends with its last [`Requester`] |
//!
//! Tests: `cargo test -p cardeploy-link` runs unit tests and `tests/link.rs`, which runs real
//! TLS connections on loopback, through a fault-injecting proxy for the dead-peer cases.

pub mod backoff;
mod bounds;
mod client;
mod codec;
mod conn;
mod error;
mod fragments;
mod guard;
mod requester;
mod router;
mod server;
mod socket;
pub mod tls;

pub use backoff::Backoff;
pub use bytes::Bytes;
pub use client::{ClientOptions, ClientSecurity, connect};
pub use conn::CloseSignal;
pub use error::{Error, Refusal};
pub use requester::{Requester, Window};
pub use router::{MIME_COMPOSITE, MIME_ROUTING, Responder, route_metadata, route_of};
pub use server::{Acceptor, LinkServer, Peer, ServerOptions, ServerSecurity, ServerStats, Session};

/// What one connection may cost: sizes, streams, queued bytes, and how long a peer may stop
/// reading. The same on both ends; the twin's come from its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload (data) of one request or answer.
    pub max_payload: usize,
    /// Largest frame accepted on the wire: one unfragmented payload plus headers and metadata,
    /// for peers that do not fragment.
    pub max_frame: usize,
    /// Fragment size we send.
    pub mtu: usize,
    /// Request-response and request-stream requests the peer may have open with us at once;
    /// more are refused with ERROR `REJECTED`.
    pub max_streams: usize,
    /// Answer bytes queued for the peer and not yet written to its socket; answers wait for
    /// room, so a peer that stops reading costs at most this (plus one answer per stream).
    pub max_queued: usize,
    /// Fire-and-forget requests read but not yet handled; the reader waits beyond this, so a
    /// flood slows the sender down instead of filling memory.
    pub max_pending_fnf: usize,
    /// A peer that takes no bytes for this long while we have some to send is dropped.
    pub send_stall: std::time::Duration,
}

pub const MAX_PAYLOAD: usize = 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: MAX_PAYLOAD,
            max_frame: MAX_PAYLOAD + 4096,
            mtu: 64 * 1024,
            max_streams: 8,
            max_queued: 2 * MAX_PAYLOAD,
            max_pending_fnf: 16,
            send_stall: std::time::Duration::from_secs(60),
        }
    }
}

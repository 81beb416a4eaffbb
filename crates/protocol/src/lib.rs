//! The words the car agent and the twin say to each other: route names and the JSON messages that
//! travel on them. No I/O and no RSocket types live here (those are `cardeploy-link`'s), so the
//! twin, the agent, the CLI and tests in other languages can all agree on one definition.
//!
//! docs/protocol.md describes every route; this crate is its executable form. Every message
//! rejects unknown fields, so a typo on one side is an error instead of a silently ignored value.

pub mod api;
mod car_id;
mod error;
mod messages;

pub use car_id::CarId;
pub use error::Error;
pub use messages::*;

/// Route names (RSocket routing extension tags), see docs/protocol.md.
pub mod route {
    /// request-response, car → twin: identity, agent version, reported state; answer: desired state.
    pub const CAR_HELLO: &str = "car.hello";
    /// request-stream, car → twin: long-lived; the twin pushes each new desired state.
    pub const CAR_DESIRED: &str = "car.desired";
    /// request-response, car → twin: one page of a desired state too large for one payload.
    pub const CAR_DESIRED_PAGE: &str = "car.desired.page";
    /// fire-and-forget, car → twin: progress, health, events, sequence-numbered.
    pub const CAR_REPORT: &str = "car.report";
    /// request-response, car → twin: liveness both ways.
    pub const CAR_HEARTBEAT: &str = "car.heartbeat";
    /// request-response, car → twin: the chunk index of one artifact (binary answer).
    pub const ARTIFACT_INDEX: &str = "artifact.index";
    /// request-stream, car → twin: a bounded window of chunks, one transit frame each.
    pub const ARTIFACT_CHUNKS: &str = "artifact.chunks";
    /// request-response, twin → car: live state on demand.
    pub const TWIN_INSPECT: &str = "twin.inspect";
}

/// Mime type of control payloads.
pub const MIME_JSON: &str = "application/json";
/// Mime type of composite metadata, which carries the routing tag.
pub const MIME_COMPOSITE: &str = "message/x.rsocket.composite-metadata.v0";
/// Mime type of the routing extension inside composite metadata.
pub const MIME_ROUTING: &str = "message/x.rsocket.routing.v0";

/// A byte count as people read it in events and errors: `812 B`, `40.2 KiB`, `3.91 MiB`,
/// `1.2 GiB`, `64 KiB` (no trailing zeros).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, f64, usize); 3] = [
        ("GiB", 1073741824.0, 2),
        ("MiB", 1048576.0, 2),
        ("KiB", 1024.0, 1),
    ];
    for (unit, size, digits) in UNITS {
        let b = bytes as f64;
        if b >= size {
            let number = format!("{:.*}", digits, b / size);
            let number = number.trim_end_matches('0').trim_end_matches('.');
            return format!("{number} {unit}");
        }
    }
    format!("{bytes} B")
}

/// Decode a JSON message with a typed error naming what was expected.
pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Malformed { what, source })
}

/// Encode a message as JSON. Serialising these plain structs cannot fail.
pub fn encode<T: serde::Serialize>(message: &T) -> Vec<u8> {
    // Every message type here is a plain struct of strings, numbers, maps with string keys and
    // options: serde_json only fails on non-string map keys or failing Serialize impls.
    serde_json::to_vec(message).unwrap_or_else(|_| b"null".to_vec())
}

#[cfg(test)]
mod tests;

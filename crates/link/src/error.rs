use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong on the link. Messages say what happened and what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in this PEM file")]
    PemMissing { path: PathBuf, what: &'static str },
    #[error("{path}: not a valid PEM {what}: {detail}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("not a car certificate of this fleet: {why}")]
    ClientCertificate { why: String },
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("invalid twin address {addr:?}: {why}")]
    Address { addr: String, why: String },
    #[error("could not connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "TLS handshake with {addr} failed: {source} (check that both sides use certificates from the same fleet CA and that the car is registered)"
    )]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} did not finish within {timeout:?}")]
    HandshakeTimeout { addr: String, timeout: Duration },
    #[error("RSocket setup failed: {0}")]
    Setup(String),
    #[error("{route}: no answer within {deadline:?}")]
    Deadline { route: String, deadline: Duration },
    #[error("{route}: the connection closed before the answer arrived")]
    Closed { route: String },
    #[error("{route}: the peer answered with an error: {message}")]
    Remote { route: String, message: String },
    #[error("{route}: payload of {size} bytes exceeds the {limit}-byte limit")]
    PayloadTooLarge {
        route: String,
        size: usize,
        limit: usize,
    },
    #[error("{route}: the stream sent more than {limit} {what} in one window")]
    WindowOverflow {
        route: String,
        limit: usize,
        what: &'static str,
    },
    #[error("{route}: the answer was empty")]
    EmptyAnswer { route: String },
}

/// How a responder refuses a request. The message travels to the peer in an RSocket ERROR frame
/// (APPLICATION_ERROR), so it must be useful to the person reading the other side's log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Refusal {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    pub fn unknown_route(route: &str, known: &[&str]) -> Self {
        Self(format!(
            "unknown route {route:?}; this endpoint serves: {}",
            known.join(", ")
        ))
    }
}

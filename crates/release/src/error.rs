/// Why signed metadata was refused. Each variant is one threat with the facts a person needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("signed document is malformed: {0}")]
    Malformed(String),
    #[error("signed document is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("payload type is {found:?}, expected {expected:?}")]
    PayloadType { expected: String, found: String },
    #[error(
        "only {valid} valid signature(s) from distinct trusted keys, {threshold} required (signatures seen: {seen})"
    )]
    BelowThreshold {
        valid: usize,
        threshold: usize,
        seen: usize,
    },
    #[error("a threshold of {threshold} cannot be met by {keys} key(s)")]
    ImpossibleThreshold { threshold: usize, keys: usize },
    #[error("{what} expired at {expires} (now {now}); a newer one must be fetched")]
    Expired {
        what: String,
        expires: u64,
        now: u64,
    },
    #[error("root version {got} cannot follow version {have}: roots rotate one version at a time")]
    RootVersion { have: u64, got: u64 },
    #[error("public key is malformed: {0}")]
    Key(String),
}

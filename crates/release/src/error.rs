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
    #[error("public key is malformed: {0}")]
    Key(String),
}

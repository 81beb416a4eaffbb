/// What can be wrong with a message on the wire.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid car id {id:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . or -)"
    )]
    InvalidCarId { id: String },
    #[error("malformed {what}: {source}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid attribute {key:?}: {why}")]
    InvalidAttribute { key: String, why: &'static str },
}

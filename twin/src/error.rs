use std::path::PathBuf;

/// What can stop the twin. Every variant names the file, car or operation involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration {path}: {why}")]
    Config { path: PathBuf, why: String },
    #[error("database ({what}): {source}")]
    Db {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// The object storage in `[object_store]` cannot be used as it is.
    #[error("object storage {location}: {why}")]
    ObjectStore { location: String, why: String },
    /// The database named by `database_url` cannot be used as it is.
    #[error("database {url}: {why}")]
    Database { url: String, why: String },
    #[error("stored data for car {car} is corrupt ({what}): {source}")]
    Corrupt {
        car: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Serialising one of the twin's own documents failed: a bug, never the input's fault.
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "car {car} is at desired-state counter {counter}, the highest there may be: rotate the director key in a new root (`cardeploy root rotate --director-key`), which starts its counters afresh"
    )]
    CounterExhausted { car: String, counter: u64 },
    #[error(transparent)]
    Chunks(#[from] cardeploy_chunks::Error),
    #[error(transparent)]
    Link(#[from] cardeploy_link::Error),
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Db { what, source }
}

pub(crate) fn encode(what: &'static str) -> impl FnOnce(serde_json::Error) -> Error {
    move |source| Error::Encode { what, source }
}

use std::path::PathBuf;

use crate::Digest;

/// Everything that can go wrong with chunks, indexes, stores and seeds. Each variant names the
/// file, digest or offset a person needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "chunk {expected}: its bytes hash to {actual}; the data is corrupt or was tampered with"
    )]
    ChunkDigest { expected: Digest, actual: Digest },
    #[error(
        "chunk {id} in the store at {path} is unreadable ({why}); it was moved aside and will be fetched again"
    )]
    StoreCorrupt {
        id: Digest,
        path: PathBuf,
        why: String,
    },
    #[error("chunk {0} is not in the store")]
    ChunkMissing(Digest),
    #[error("chunk index is malformed: {0}")]
    IndexMalformed(String),
    #[error("chunk index hashes to {actual}, but {expected} was asked for")]
    IndexDigest { expected: Digest, actual: Digest },
    #[error("chunk index describes {size} bytes, more than the limit of {limit} bytes")]
    IndexTooLarge { size: u64, limit: u64 },
    #[error(
        "seed {path} changed while being read: at offset {offset} the chunk {id} is no longer there"
    )]
    SeedChanged {
        path: PathBuf,
        offset: u64,
        id: Digest,
    },
    #[error(
        "assembled artifact hashes to {actual}, the index says {expected}; nothing was installed"
    )]
    ArtifactDigest { expected: Digest, actual: Digest },
    #[error("no source for chunk {0}: not in the store, not in any seed")]
    Unplanned(Digest),
    #[error("transit frame is malformed: {0}")]
    TransitMalformed(String),
    #[error(
        "delta for chunk {id} refers to base chunks {start}..{end}, but the base has {len} chunks"
    )]
    DeltaReference {
        id: Digest,
        start: u64,
        end: u64,
        len: usize,
    },
    #[error(
        "chunk {id} came as a delta against more than {limit} bytes of the base; refused before reading any of them"
    )]
    DeltaReferenceTooLarge { id: Digest, limit: u64 },
    #[error(
        "chunk {id} arrived claiming {sent} bytes, its index declares {declared}; refused before decompressing"
    )]
    ChunkLength {
        id: Digest,
        declared: u32,
        sent: u32,
    },
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
    #[error("chunker: {0}")]
    Chunker(String),
}

impl Error {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { what, path, source }
    }
}

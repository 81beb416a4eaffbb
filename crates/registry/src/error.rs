use std::path::PathBuf;

use cardeploy_chunks::Digest;

/// Why a catalog could not be built: what the agent (or a test's image layout) handed over does
/// not make a servable image. Serving errors are answers to clients, not this type
/// (the HTTP side writes the distribution spec's error bodies).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "`{name}` is not a repository name the OCI distribution spec allows (lowercase \
         alphanumeric path components separated by `/`, joined within by `.`, `_`, `__` or `-`)"
    )]
    RepositoryName { name: String },

    #[error(
        "`{tag}` is not a tag the OCI distribution spec allows ([a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}})"
    )]
    TagName { tag: String },

    #[error("{repository}: {role} sha256:{digest} is not among the blobs given to the registry")]
    MissingBlob {
        repository: String,
        role: &'static str,
        digest: Digest,
    },

    #[error("{repository}: blob sha256:{digest} at {} is {actual} bytes, its descriptor says {declared}", path.display())]
    BlobSize {
        repository: String,
        digest: Digest,
        path: PathBuf,
        declared: u64,
        actual: u64,
    },

    #[error("{repository}: manifest sha256:{digest} at {} does not hash to its digest: the file is damaged", path.display())]
    ManifestDigest {
        repository: String,
        digest: Digest,
        path: PathBuf,
    },

    #[error("{repository}: manifest sha256:{digest} is {size} bytes; a manifest is at most {max}")]
    ManifestTooLarge {
        repository: String,
        digest: Digest,
        size: u64,
        max: u64,
    },

    #[error("{repository}: manifest sha256:{digest} is not a manifest this registry serves: {why}")]
    Manifest {
        repository: String,
        digest: Digest,
        why: String,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

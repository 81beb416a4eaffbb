use std::path::{Path, PathBuf};

/// What can stop the agent or one of its steps.
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
    #[error(
        "state file {path} is corrupt ({source}); it was moved to {moved_to} and the agent starts from an empty state"
    )]
    CorruptState {
        path: PathBuf,
        moved_to: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "state file {path} has schema {found}; this agent understands up to {supported}: upgrade the agent or restore a matching state"
    )]
    StateSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(transparent)]
    Chunks(#[from] cardeploy_chunks::Error),
    /// A file on the car is not what the release declares (damaged on disk after its fetch).
    #[error(
        "{} has {size} bytes with sha256 {digest}; the release declares {declared_size} bytes with sha256 {declared_digest}",
        path.display()
    )]
    NotAsDeclared {
        path: PathBuf,
        size: u64,
        digest: String,
        declared_size: u64,
        declared_digest: String,
    },
    #[error("refused: {0}")]
    Refused(#[from] cardeploy_release::Error),
    /// The twin's answer does not fit what was asked (a missing chunk, a page that does not
    /// fit, a delta without a base): the fetch fails and a newer desired state tries again.
    #[error("the twin's answer does not fit the request: {0}")]
    TwinAnswer(String),
    /// A task of the agent's own stopped (it panicked or was cancelled): a bug, reported as
    /// the reason the step failed rather than taking the agent down.
    #[error("an agent task stopped: {0}")]
    Task(String),
    #[error(
        "the disk holding {} is full: this update needs {} more there and {} are free; it goes on by itself once there is room",
        path.display(), cardeploy_protocol::human_bytes(*needed), cardeploy_protocol::human_bytes(*free)
    )]
    DiskFull {
        path: PathBuf,
        needed: u64,
        free: u64,
    },
    #[error(
        "compatible = {configured:?} in the agent's configuration, but RAUC says {rauc:?}: remove it from agent.toml (RAUC's system.conf is the authority) or fix one of them"
    )]
    Compatible { configured: String, rauc: String },
    #[error(
        "cannot listen on {addr} for the car's registry ({source}): another process holds the port; free it or set [containers] registry in agent.toml (and the image's registries.yaml) to another address"
    )]
    RegistryListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "kubeconfig {}: {why}; [containers] kubeconfig in agent.toml names the file k3s writes (/etc/rancher/k3s/k3s.yaml)",
        path.display()
    )]
    Kubeconfig { path: PathBuf, why: String },
    /// The release's OCI artifacts on disk do not make the images it names.
    #[error("the release's images cannot be served: {0}")]
    Images(#[from] cardeploy_registry::Error),
    #[error("RAUC: {0}")]
    Rauc(#[from] cardeploy_rauc::Error),
    #[error(transparent)]
    Link(#[from] cardeploy_link::Error),
    #[error("twin answered {what} with something unreadable: {source}")]
    Protocol {
        what: &'static str,
        #[source]
        source: cardeploy_protocol::Error,
    },
}

/// The error for an I/O failure on `path`: `.map_err(io(&path))`.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

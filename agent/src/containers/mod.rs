//! The containers part: the car's registry and the release's workloads.
//!
//! - Once every artifact of a release is on the car, its images are served read-only from those
//!   files at the address k3s's mirror names (`/etc/rancher/k3s/registries.yaml`:
//!   `registry.cardeploy.local` → `127.0.0.1:5000`), each blob verified before it is first
//!   served (crates/registry). The images of the release whose workloads run stay served
//!   beside them until a newer release's workloads are promoted: a rollback needs no network.
//! - With a kubeconfig, the release's workloads are applied to the car's k3s and rolled out
//!   (`driver`: side by side, canary, promote or roll back), beside the OS part, without
//!   touching the session or the reporter.

pub mod cluster;
pub(crate) mod driver;
pub mod manifests;
pub mod rollout;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cardeploy_chunks::Digest;
use cardeploy_registry::{BlobFile, Catalog, Platform, Registry};
use cardeploy_release::ArtifactKind;
use serde::Deserialize;

use crate::Error;
use crate::cell::Cell;
use crate::fetch::Fetcher;
use crate::release::Release;
use crate::reporter::Reporter;

/// `[containers]` in agent.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainersConfig {
    /// Where the car's registry listens: loopback, at the address the image's
    /// `registries.yaml` mirrors `registry.cardeploy.local` to.
    #[serde(default = "default_registry")]
    pub registry: SocketAddr,
    /// The car's k3s: the kubeconfig the agent applies workloads with (k3s writes
    /// `/etc/rancher/k3s/k3s.yaml`). Without it, releases with workloads are refused.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// How long a new release's Deployments have to become ready.
    #[serde(default = "default_ready_secs")]
    pub ready_secs: u64,
    /// How long a new version runs beside the previous one, healthy, before it is promoted.
    #[serde(default = "default_canary_secs")]
    pub canary_secs: u64,
    /// Restarts of one container that count as a crash loop.
    #[serde(default = "default_crash_restarts")]
    pub crash_restarts: u32,
}

fn default_registry() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}

fn default_ready_secs() -> u64 {
    300
}

fn default_canary_secs() -> u64 {
    60
}

fn default_crash_restarts() -> u32 {
    3
}

/// Why a step of the workloads' rollout did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Manifest(#[from] manifests::ManifestError),
    #[error("workload manifest {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not persist {what}: {source}")]
    Persist {
        what: &'static str,
        #[source]
        source: Box<Error>,
    },
    #[error("the rollout of {0} has no objects recorded (a damaged state file?)")]
    NotRecorded(String),
}

/// The workloads' handle: what the workloads driver may use of the agent.
pub(crate) struct Workloads {
    pub config: ContainersConfig,
    /// The agent manages the OS: a release with a bundle reaches the workloads once committed.
    pub managed_os: bool,
    /// Rung on a new desired state, a finished fetch, a move of the OS update.
    pub wake: Arc<tokio::sync::Notify>,
    /// The OS driver's wake: rung when the rollout moves (a slot on trial commits once its
    /// release's workloads are promoted).
    pub os_wake: Arc<tokio::sync::Notify>,
    cell: Arc<Cell>,
    reporter: Arc<Reporter>,
    fetcher: Arc<Fetcher>,
    registry: Arc<Containers>,
}

impl Workloads {
    pub fn new(
        config: ContainersConfig,
        managed_os: bool,
        cell: Arc<Cell>,
        reporter: Arc<Reporter>,
        registry: Arc<Containers>,
        (wake, os_wake): (Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>),
    ) -> Self {
        Self {
            config,
            managed_os,
            wake,
            os_wake,
            cell,
            reporter,
            fetcher: registry.fetcher.clone(),
            registry,
        }
    }

    /// `old` is done with: the release that ran before a newer one was promoted, or one that
    /// was rolled back. Its artifact files the car does not keep (`State::keeps_file`) go, and
    /// the registry serves what is left.
    pub fn retired(&self, old: Option<&rollout::Applied>) {
        let (current, running) = self
            .cell
            .read(|s| (s.release.clone(), s.workloads.running_release().cloned()));
        // The registry stops serving the retired release's images before their files go.
        if let Some(current) = &current
            && let Err(e) = self.registry.serve(current, running.as_ref())
        {
            tracing::error!("{e}");
        }
        let Some(old) = old else { return };
        for a in &old.release.artifacts {
            if self.cell.read(|s| s.keeps_file(a.name(), &a.index)) {
                continue;
            }
            let path = self.fetcher.artifact_path(a.name(), &a.index);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "retired release's artifact removed")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("could not remove {}: {e}", path.display()),
            }
        }
    }
}

/// The containers part's handle: the registry it serves and where the artifacts are.
pub(crate) struct Containers {
    registry: Arc<Registry>,
    fetcher: Arc<Fetcher>,
}

impl Containers {
    /// Binds the registry (a taken port is an error at start, not a silent car without
    /// containers) and serves it until the returned task is aborted.
    pub async fn start(
        config: &ContainersConfig,
        fetcher: Arc<Fetcher>,
        cell: Arc<Cell>,
        reporter: Arc<Reporter>,
    ) -> Result<(Arc<Self>, tokio::task::JoinHandle<()>), Error> {
        let listener = tokio::net::TcpListener::bind(config.registry)
            .await
            .map_err(|source| Error::RegistryListen {
                addr: config.registry,
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(config.registry);
        let registry = Registry::new(Catalog::default(), Platform::host());
        let serving = registry.clone();
        let watching = registry.clone();
        let paths = fetcher.clone();
        let task = tokio::spawn(async move {
            let damaged = forget_damaged(watching, paths, cell, reporter);
            tokio::select! {
                served = cardeploy_registry::serve(listener, serving, std::future::pending()) => {
                    if let Err(e) = served {
                        tracing::error!("the car's registry stopped: {e}");
                    }
                }
                () = damaged => {}
            }
        });
        tracing::info!(%addr, "the car's registry listens");
        Ok((Arc::new(Self { registry, fetcher }), task))
    }

    /// Serves the images of `release` from its artifacts on disk (all of them must be there),
    /// and those of `running`, the release whose workloads run until `release`'s are promoted
    /// (its files are kept on the car for that).
    pub fn serve(&self, release: &Release, running: Option<&Release>) -> Result<(), Error> {
        let mut files = BTreeMap::new();
        for a in running
            .filter(|r| r.id != release.id)
            .into_iter()
            .flat_map(|r| &r.artifacts)
            .chain(&release.artifacts)
        {
            if !matches!(
                a.declared.kind,
                ArtifactKind::OciManifest | ArtifactKind::OciConfig | ArtifactKind::OciLayer
            ) {
                continue;
            }
            let digest: Digest = a.declared.digest.parse()?;
            files.insert(
                digest,
                BlobFile {
                    path: self.fetcher.artifact_path(a.name(), &a.index),
                    size: a.declared.size,
                },
            );
        }
        let mut catalog = Catalog::new(files);
        // The running release's images by digest only: the tags are the new release's.
        if let Some(running) = running.filter(|r| r.id != release.id) {
            for image in &running.images {
                catalog.image(&image.name, &[], image.manifest.parse()?)?;
            }
        }
        for image in &release.images {
            let manifest: Digest = image.manifest.parse()?;
            let tags: Vec<&str> = image.tag.iter().map(String::as_str).collect();
            catalog.image(&image.name, &tags, manifest)?;
        }
        self.registry.replace(catalog);
        if !release.images.is_empty() {
            tracing::info!(release = %release.id, images = release.images.len(), "the car's registry serves the release's images");
        }
        Ok(())
    }
}

/// A blob the registry found damaged on disk is forgotten and its file removed, as the OS part
/// does with a damaged bundle: the next desired state for the release fetches it again, and the
/// twin hears which artifact it was.
async fn forget_damaged(
    registry: Arc<Registry>,
    fetcher: Arc<Fetcher>,
    cell: Arc<Cell>,
    reporter: Arc<Reporter>,
) {
    loop {
        let damaged = registry.next_damaged().await;
        let Some(release) = cell.read(|s| s.release.clone()) else {
            continue;
        };
        for a in release.artifacts.iter().filter(|a| {
            a.declared
                .digest
                .parse::<Digest>()
                .is_ok_and(|d| damaged.contains(&d))
        }) {
            let path = fetcher.artifact_path(a.name(), &a.index);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("could not remove {}: {e}", path.display());
            }
            if let Err(why) = cell
                .update(|s| {
                    s.artifacts.remove(a.name());
                })
                .await
            {
                tracing::error!("could not persist forgetting {}: {why}", a.name());
            }
            reporter
                .event(
                    "images",
                    format!(
                        "{} of {} was damaged on disk: not served, removed; the next desired state for the release fetches it again",
                        a.name(),
                        release.id
                    ),
                )
                .await;
        }
    }
}

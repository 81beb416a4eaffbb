//! The containers part: today, the car's registry. Once every artifact of a release is on the
//! car, its images are served read-only from those files at the address k3s's mirror names
//! (`/etc/rancher/k3s/registries.yaml`: `registry.cardeploy.local` → `127.0.0.1:5000`), each
//! blob verified before it is first served (crates/registry). Applying the release's workloads
//! to k3s joins here, beside the OS part, without touching the session or the reporter.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
}

fn default_registry() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
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

    /// Serves the images of `release` from its artifacts on disk (all of them must be there).
    pub fn serve(&self, release: &Release) -> Result<(), Error> {
        let mut files = BTreeMap::new();
        for a in &release.artifacts {
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

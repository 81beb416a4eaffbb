//! What the registry serves: repositories, each with its tags, manifests and the blobs those
//! manifests name. Built from files the caller already holds (the agent's fetched artifacts, or
//! an OCI image layout); manifests are read, verified and parsed here, once, and kept in memory
//! (each is at most 4 MiB); configs and layers stay on disk and are verified when first served.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cardeploy_chunks::Digest;

use crate::error::{Error, io};
use crate::manifest::{self, MAX_MANIFEST_BYTES, Parsed};

/// A blob on disk: a config or a layer (or a manifest, before it is read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobFile {
    pub path: PathBuf,
    pub size: u64,
}

/// A manifest the registry serves, verified and parsed.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub bytes: Arc<[u8]>,
    pub parsed: Parsed,
}

/// One repository: its tags, its manifests and every blob they name.
#[derive(Clone, Debug, Default)]
pub struct Repository {
    pub tags: BTreeMap<String, Digest>,
    pub manifests: BTreeMap<Digest, Manifest>,
    /// Configs and layers of this repository's images.
    pub blobs: BTreeSet<Digest>,
}

/// Everything the registry serves. Cheap to share: the registry holds one behind an `Arc` and
/// swaps it whole when the releases on the car change.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub(crate) repositories: BTreeMap<String, Repository>,
    pub(crate) files: BTreeMap<Digest, BlobFile>,
}

impl Catalog {
    /// A catalog over `files` (every blob by digest, where it lives and how big it is), with no
    /// image yet: add them with [`Catalog::image`].
    pub fn new(files: BTreeMap<Digest, BlobFile>) -> Self {
        Self {
            repositories: BTreeMap::new(),
            files,
        }
    }

    /// Serves the image whose manifest (or index) is `manifest` as `repository`, also under
    /// `tags`. Every blob it names, through an index too, must be among the files.
    pub fn image(
        &mut self,
        repository: &str,
        tags: &[&str],
        manifest: Digest,
    ) -> Result<(), Error> {
        if !manifest::valid_repository(repository) {
            return Err(Error::RepositoryName {
                name: repository.to_owned(),
            });
        }
        if let Some(tag) = tags.iter().find(|t| !manifest::valid_tag(t)) {
            return Err(Error::TagName {
                tag: (*tag).to_owned(),
            });
        }
        let mut repo = self
            .repositories
            .get(repository)
            .cloned()
            .unwrap_or_default();
        // An index names manifests, which name blobs: walk breadth first. Nesting is bounded by
        // the manifests themselves being distinct blobs.
        let mut pending = vec![manifest];
        while let Some(digest) = pending.pop() {
            if repo.manifests.contains_key(&digest) {
                continue;
            }
            let read = self.read_manifest(repository, digest)?;
            match &read.parsed {
                Parsed::Index { manifests, .. } => {
                    pending.extend(manifests.iter().map(|d| d.digest));
                }
                Parsed::Image { config, layers, .. } => {
                    for (role, d) in std::iter::once(("config", config))
                        .chain(layers.iter().map(|l| ("layer", l)))
                    {
                        self.check_blob(repository, role, d.digest, d.size)?;
                        repo.blobs.insert(d.digest);
                    }
                }
            }
            repo.manifests.insert(digest, read);
        }
        for tag in tags {
            repo.tags.insert((*tag).to_owned(), manifest);
        }
        self.repositories.insert(repository.to_owned(), repo);
        Ok(())
    }

    fn check_blob(
        &self,
        repository: &str,
        role: &'static str,
        digest: Digest,
        declared: u64,
    ) -> Result<(), Error> {
        let Some(file) = self.files.get(&digest) else {
            return Err(Error::MissingBlob {
                repository: repository.to_owned(),
                role,
                digest,
            });
        };
        let actual = std::fs::metadata(&file.path)
            .map_err(io(format!("cannot read {}", file.path.display())))?
            .len();
        if actual != declared || file.size != declared {
            return Err(Error::BlobSize {
                repository: repository.to_owned(),
                digest,
                path: file.path.clone(),
                declared,
                actual,
            });
        }
        Ok(())
    }

    fn read_manifest(&self, repository: &str, digest: Digest) -> Result<Manifest, Error> {
        let Some(file) = self.files.get(&digest) else {
            return Err(Error::MissingBlob {
                repository: repository.to_owned(),
                role: "manifest",
                digest,
            });
        };
        let size = std::fs::metadata(&file.path)
            .map_err(io(format!("cannot read {}", file.path.display())))?
            .len();
        if size > MAX_MANIFEST_BYTES {
            return Err(Error::ManifestTooLarge {
                repository: repository.to_owned(),
                digest,
                size,
                max: MAX_MANIFEST_BYTES,
            });
        }
        let bytes = std::fs::read(&file.path)
            .map_err(io(format!("cannot read {}", file.path.display())))?;
        if Digest::of(&bytes) != digest {
            return Err(Error::ManifestDigest {
                repository: repository.to_owned(),
                digest,
                path: file.path.clone(),
            });
        }
        let parsed = manifest::parse(&bytes).map_err(|why| Error::Manifest {
            repository: repository.to_owned(),
            digest,
            why,
        })?;
        Ok(Manifest {
            bytes: bytes.into(),
            parsed,
        })
    }

    /// The repositories served, by name.
    pub fn repositories(&self) -> impl Iterator<Item = (&str, &Repository)> {
        self.repositories.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub(crate) fn repository(&self, name: &str) -> Option<&Repository> {
        self.repositories.get(name)
    }

    pub(crate) fn file(&self, digest: &Digest) -> Option<&BlobFile> {
        self.files.get(digest)
    }

    /// Every blob file any repository names (what the registry may verify).
    pub(crate) fn served_files(&self) -> BTreeSet<Digest> {
        self.repositories
            .values()
            .flat_map(|r| r.blobs.iter().copied())
            .collect()
    }

    /// A catalog of the images of an OCI image layout directory (`oci-layout`, `index.json`,
    /// `blobs/sha256/…`, as `skopeo copy … oci:DIR` writes it), served as `repository`; each
    /// image is tagged with its `org.opencontainers.image.ref.name` annotation when it has one.
    pub fn from_layout(dir: &Path, repository: &str) -> Result<Self, Error> {
        let mut catalog = Self::default();
        catalog.add_layout(dir, repository)?;
        Ok(catalog)
    }

    /// Adds the images of another layout, as [`Catalog::from_layout`] reads them.
    pub fn add_layout(&mut self, dir: &Path, repository: &str) -> Result<(), Error> {
        let index_path = dir.join("index.json");
        let index = std::fs::read(&index_path)
            .map_err(io(format!("cannot read {}", index_path.display())))?;
        let parsed = manifest::parse(&index).map_err(|why| Error::Manifest {
            repository: repository.to_owned(),
            digest: Digest::of(&index),
            why: format!("{}: {why}", index_path.display()),
        })?;
        let Parsed::Index { manifests, .. } = parsed else {
            return Err(Error::Manifest {
                repository: repository.to_owned(),
                digest: Digest::of(&index),
                why: format!("{} is not an index", index_path.display()),
            });
        };
        let blobs = dir.join("blobs/sha256");
        for entry in
            std::fs::read_dir(&blobs).map_err(io(format!("cannot read {}", blobs.display())))?
        {
            let entry = entry.map_err(io(format!("cannot read {}", blobs.display())))?;
            let Ok(digest) =
                manifest::parse_digest(&format!("sha256:{}", entry.file_name().to_string_lossy()))
            else {
                continue;
            };
            let size = entry
                .metadata()
                .map_err(io(format!("cannot read {}", entry.path().display())))?
                .len();
            self.files.insert(
                digest,
                BlobFile {
                    path: entry.path(),
                    size,
                },
            );
        }
        let refs = layout_ref_names(&index);
        for desc in manifests {
            let tags: Vec<&str> = refs
                .get(&desc.digest)
                .map(|t| t.iter().map(String::as_str).collect())
                .unwrap_or_default();
            self.image(repository, &tags, desc.digest)?;
        }
        Ok(())
    }
}

/// The `org.opencontainers.image.ref.name` annotations of a layout's index, by manifest digest.
fn layout_ref_names(index: &[u8]) -> BTreeMap<Digest, Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        manifests: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        digest: String,
        #[serde(default)]
        annotations: BTreeMap<String, String>,
    }
    let mut out: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    if let Ok(index) = serde_json::from_slice::<Index>(index) {
        for e in index.manifests {
            if let (Ok(d), Some(name)) = (
                manifest::parse_digest(&e.digest),
                e.annotations.get("org.opencontainers.image.ref.name"),
            ) {
                out.entry(d).or_default().push(name.clone());
            }
        }
    }
    out
}

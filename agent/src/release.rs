//! The release the car works towards, as typed values: parsed once, when a desired state is
//! accepted, and never re-parsed from strings afterwards.

use cardeploy_chunks::Digest;
use cardeploy_release::{Artifact, ArtifactKind, Image};
use serde::{Deserialize, Serialize};

/// Names one release: the sha256 of its signed manifest, and the line and version people know it
/// by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RefFields")]
pub struct ReleaseRef {
    pub digest: Digest,
    pub line: String,
    pub version: semver::Version,
}

/// What a state file holds for a [`ReleaseRef`]: today's fields, or the `label`
/// (`line@version`) that state files of schema 4 and earlier held instead of line and version.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefFields {
    digest: Digest,
    #[serde(default)]
    line: Option<String>,
    #[serde(default)]
    version: Option<semver::Version>,
    #[serde(default)]
    label: Option<String>,
}

/// Why a release in a state file cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    #[error("release label {0:?} is not line@version")]
    Label(String),
    #[error("release label {label:?}: {source}")]
    Version {
        label: String,
        #[source]
        source: semver::Error,
    },
    #[error("a release names its line and version")]
    Incomplete,
    #[error(transparent)]
    Index(#[from] cardeploy_chunks::Error),
}

impl TryFrom<RefFields> for ReleaseRef {
    type Error = Unreadable;

    fn try_from(f: RefFields) -> Result<Self, Unreadable> {
        let (line, version) = match (f.line, f.version, f.label) {
            (Some(line), Some(version), _) => (line, version),
            (_, _, Some(label)) => {
                let Some((line, version)) = label.split_once('@') else {
                    return Err(Unreadable::Label(label));
                };
                let version = version.parse().map_err(|source| Unreadable::Version {
                    label: label.clone(),
                    source,
                })?;
                (line.to_owned(), version)
            }
            _ => return Err(Unreadable::Incomplete),
        };
        Ok(Self {
            digest: f.digest,
            line,
            version,
        })
    }
}

impl ReleaseRef {
    /// `line@version`, how people name a release.
    pub fn label(&self) -> String {
        format!("{}@{}", self.line, self.version)
    }
}

impl std::fmt::Display for ReleaseRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.line, self.version)
    }
}

/// A verified release, as much of it as the agent needs after verification: what the accepted
/// desired state asks this car to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ReleaseFields")]
pub struct Release {
    #[serde(flatten)]
    pub id: ReleaseRef,
    pub artifacts: Vec<HeldArtifact>,
    /// The container images it carries, as the car's registry serves them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
}

/// An artifact of a release, its chunk index id parsed. Stored as the release declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Artifact", into = "Artifact")]
pub struct HeldArtifact {
    pub declared: Artifact,
    /// The id of its chunk index (the declaration's `index`, parsed).
    pub index: Digest,
}

impl TryFrom<Artifact> for HeldArtifact {
    type Error = cardeploy_chunks::Error;

    fn try_from(declared: Artifact) -> Result<Self, Self::Error> {
        let index = declared.index.parse()?;
        Ok(Self { declared, index })
    }
}

impl From<HeldArtifact> for Artifact {
    fn from(held: HeldArtifact) -> Self {
        held.declared
    }
}

/// The release as state files of schema 4 wrote it (`release` was the manifest digest), or as
/// this schema writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseFields {
    #[serde(alias = "release")]
    digest: Digest,
    line: String,
    version: semver::Version,
    artifacts: Vec<Artifact>,
    #[serde(default)]
    images: Vec<Image>,
}

impl TryFrom<ReleaseFields> for Release {
    type Error = Unreadable;

    fn try_from(f: ReleaseFields) -> Result<Self, Unreadable> {
        Release::new(
            ReleaseRef {
                digest: f.digest,
                line: f.line,
                version: f.version,
            },
            f.artifacts,
            f.images,
        )
        .map_err(Unreadable::from)
    }
}

impl Release {
    /// A release from its verified manifest; every artifact's index id must parse (the
    /// release checks made sure of that already, so a failure here is a damaged state file).
    pub fn new(
        id: ReleaseRef,
        artifacts: Vec<Artifact>,
        images: Vec<Image>,
    ) -> Result<Self, cardeploy_chunks::Error> {
        let artifacts = artifacts
            .into_iter()
            .map(HeldArtifact::try_from)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            id,
            artifacts,
            images,
        })
    }

    /// Whether the release carries an OS bundle (a part for the OS driver).
    pub fn has_os(&self) -> bool {
        self.os_bundle().is_some()
    }

    /// Whether the release carries Kubernetes manifests (a part for the workloads driver).
    pub fn has_workloads(&self) -> bool {
        self.artifacts
            .iter()
            .any(|a| a.declared.kind == ArtifactKind::KubeManifest)
    }

    /// The release's OS bundle, if it carries one.
    pub fn os_bundle(&self) -> Option<&HeldArtifact> {
        self.artifacts
            .iter()
            .find(|a| a.declared.kind == ArtifactKind::RaucBundle)
    }
}

impl HeldArtifact {
    pub fn name(&self) -> &str {
        &self.declared.name
    }
}

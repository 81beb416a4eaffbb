//! What the registry needs to know of a manifest: its media type (for `Content-Type` and content
//! negotiation) and the blobs it names (so a repository serves only its own). Parsed once, when
//! the catalog is built; unknown fields are ignored, as the image spec asks.

use cardeploy_chunks::Digest;
use serde::Deserialize;

/// Media types the registry serves manifests as.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A manifest is a small JSON document; the distribution spec lets registries refuse larger
/// than 4 MiB, and the registry keeps every manifest it serves in memory.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// An image manifest or an index of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Image {
        media_type: &'static str,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    Index {
        media_type: &'static str,
        manifests: Vec<Descriptor>,
    },
}

impl Parsed {
    pub fn media_type(&self) -> &'static str {
        match self {
            Self::Image { media_type, .. } | Self::Index { media_type, .. } => media_type,
        }
    }
}

/// A content descriptor: what a manifest says about a blob it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub platform: Option<Platform>,
}

/// The platform an image runs on, as an index's entries name it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the machine this runs on, in OCI's words (Go's GOOS/GOARCH).
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "aarch64" => "arm64",
            "x86_64" => "amd64",
            "arm" => "arm",
            "riscv64" => "riscv64",
            other => other,
        };
        Self {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: None,
        }
    }

    /// Whether an index entry for `other` runs here (a variant is compared only when both name one).
    pub fn runs(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

#[derive(Deserialize)]
struct Doc {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

/// Parses a manifest. `Err` says, for a person, why it is not one this registry serves.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let doc: Doc =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON of a manifest: {e}"))?;
    if doc.schema_version != Some(2) {
        return Err(format!(
            "schemaVersion is {:?}; only 2 (OCI, Docker schema 2) is served",
            doc.schema_version
        ));
    }
    let descriptors = |raw: Vec<RawDescriptor>| -> Result<Vec<Descriptor>, String> {
        raw.into_iter()
            .map(|d| {
                Ok(Descriptor {
                    digest: parse_digest(&d.digest)?,
                    media_type: d.media_type,
                    size: d.size,
                    platform: d.platform,
                })
            })
            .collect()
    };
    // The media type field is optional in OCI (then the shape says which) and required in Docker.
    let kind = match (doc.media_type.as_deref(), &doc.manifests, &doc.config) {
        (Some(OCI_MANIFEST), None, Some(_)) => OCI_MANIFEST,
        (Some(DOCKER_MANIFEST), None, Some(_)) => DOCKER_MANIFEST,
        (Some(OCI_INDEX), Some(_), None) => OCI_INDEX,
        (Some(DOCKER_LIST), Some(_), None) => DOCKER_LIST,
        (None, None, Some(_)) => OCI_MANIFEST,
        (None, Some(_), None) => OCI_INDEX,
        (Some(other), _, _) => {
            return Err(format!(
                "media type `{other}` with this shape is not served"
            ));
        }
        (None, _, _) => {
            return Err(
                "neither an image manifest (config, layers) nor an index (manifests)".into(),
            );
        }
    };
    if kind == OCI_INDEX || kind == DOCKER_LIST {
        return Ok(Parsed::Index {
            media_type: kind,
            manifests: descriptors(doc.manifests.unwrap_or_default())?,
        });
    }
    let Some(config) = doc.config else {
        return Err("an image manifest without a config".into());
    };
    Ok(Parsed::Image {
        media_type: kind,
        config: descriptors(vec![config])?.remove(0),
        layers: descriptors(doc.layers.unwrap_or_default())?,
    })
}

/// A digest as the distribution spec writes it: `sha256:` and 64 lowercase hex digits (the only
/// algorithm a car's blobs are named by).
pub fn parse_digest(s: &str) -> Result<Digest, String> {
    let Some(hex) = s.strip_prefix("sha256:") else {
        return Err(format!(
            "`{s}` is not a sha256 digest (sha256:<64 hex digits>)"
        ));
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "`{s}` is not a sha256 digest (sha256:<64 lowercase hex digits>)"
        ));
    }
    hex.parse()
        .map_err(|e: cardeploy_chunks::Error| e.to_string())
}

/// The spec's repository name grammar (one implementation, with the release checks: an image
/// a release names is one this registry can serve).
pub fn valid_repository(name: &str) -> bool {
    cardeploy_release::check_repository(name).is_ok()
}

/// The spec's tag grammar: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn an_oci_manifest_without_a_media_type_is_recognised_by_its_shape() {
        let doc = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":10}}]}}"#,
            hex(1),
            hex(2)
        );
        let Parsed::Image {
            media_type,
            config,
            layers,
        } = parse(doc.as_bytes()).unwrap()
        else {
            panic!("not an image")
        };
        assert_eq!(media_type, OCI_MANIFEST);
        assert_eq!(config.size, 2);
        assert_eq!(layers.len(), 1);
    }

    #[test]
    fn a_docker_list_is_an_index_with_platforms() {
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":5,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            hex(3)
        );
        let Parsed::Index {
            media_type,
            manifests,
        } = parse(doc.as_bytes()).unwrap()
        else {
            panic!("not an index")
        };
        assert_eq!(media_type, DOCKER_LIST);
        let platform = manifests[0].platform.clone().unwrap();
        assert!(
            Platform {
                os: "linux".into(),
                architecture: "arm64".into(),
                variant: None
            }
            .runs(&platform)
        );
        assert!(
            !Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None
            }
            .runs(&platform)
        );
    }

    #[test]
    fn schema_1_and_shapeless_documents_are_refused_with_the_reason() {
        assert!(
            parse(br#"{"schemaVersion":1,"fsLayers":[]}"#)
                .unwrap_err()
                .contains("schemaVersion")
        );
        assert!(
            parse(br#"{"schemaVersion":2}"#)
                .unwrap_err()
                .contains("neither")
        );
        let bad = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"sha512:{}","size":1}}}}"#,
            "a".repeat(128)
        );
        assert!(
            parse(bad.as_bytes())
                .unwrap_err()
                .contains("not a sha256 digest")
        );
    }

    #[test]
    fn repository_names_follow_the_spec_grammar() {
        for ok in [
            "infotainment",
            "cardeploy/infotainment",
            "a.b_c__d---e/f0",
            "x",
        ] {
            assert!(valid_repository(ok), "{ok}");
        }
        for bad in [
            "",
            "Upper",
            "a//b",
            "-a",
            "a-",
            "a___b",
            "a._b",
            "../etc",
            "a/",
            &"a".repeat(256),
        ] {
            assert!(!valid_repository(bad), "{bad}");
        }
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        assert!(valid_tag("1.2.0-rc.1"));
        assert!(valid_tag("_x"));
        assert!(!valid_tag(".x"));
        assert!(!valid_tag("a:b"));
        assert!(!valid_tag(&"a".repeat(129)));
    }

    #[test]
    fn digests_are_sha256_and_lowercase() {
        assert!(parse_digest(&hex(0xab)).is_ok());
        assert!(parse_digest(&hex(0xab).to_uppercase().replace("SHA256", "sha256")).is_err());
        assert!(parse_digest(&"ab".repeat(32)).is_err());
    }
}

//! OCI images made on the spot: tar layers and image layouts as `skopeo copy … oci:DIR` writes
//! them, so registry and release tests need no image from the network.

use std::path::{Path, PathBuf};
use std::process::Command;

use cardeploy_chunks::Digest;
use serde_json::json;

pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A ustar archive of regular files (mode 0644, time 0): enough for a layer.
pub fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let files: Vec<(&str, &[u8], u32)> = files.iter().map(|(n, d)| (*n, *d, 0o644)).collect();
    tar_with_modes(&files)
}

/// The same with each file's mode (`0o755` for a program a container runs).
pub fn tar_with_modes(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data, mode) in files {
        assert!(name.len() < 100, "tar(): name {name} too long for ustar");
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = width - 1);
            h[at..at + width].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, u64::from(*mode));
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, 0);
        h[148..156].copy_from_slice(b"        ");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A blob as a descriptor names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

impl Blob {
    /// `sha256:<hex>`, as manifests and registries write it.
    pub fn digest_string(&self) -> String {
        format!("sha256:{}", self.digest)
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({ "mediaType": self.media_type, "digest": self.digest_string(), "size": self.size })
    }
}

/// One image of a layout: its manifest, config and layers.
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

/// An OCI image layout directory being written.
#[derive(Debug)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    /// An empty layout in `dir` (created).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Writes `bytes` as a blob of `media_type`.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> Blob {
        let digest = Digest::of(bytes);
        std::fs::write(self.path(&digest), bytes).unwrap();
        Blob {
            media_type: media_type.to_owned(),
            digest,
            size: bytes.len() as u64,
        }
    }

    /// Where a blob lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.to_string())
    }

    /// An image of uncompressed `layers` for linux/`arch` (its config's diff ids are the layer
    /// digests, as for any uncompressed layer), not yet listed in `index.json`.
    pub fn image(&self, arch: &str, layers: &[Vec<u8>]) -> Image {
        let layers: Vec<(Blob, Digest)> = layers
            .iter()
            .map(|l| {
                let blob = self.blob(LAYER_TAR, l);
                let diff_id = blob.digest;
                (blob, diff_id)
            })
            .collect();
        self.image_of(arch, &layers)
    }

    /// An image of layer blobs already written (compressed or not), each with its diff id (the
    /// digest of the uncompressed tar), for linux/`arch`, not yet listed in `index.json`.
    pub fn image_of(&self, arch: &str, layers: &[(Blob, Digest)]) -> Image {
        let diff_ids: Vec<String> = layers.iter().map(|(_, d)| format!("sha256:{d}")).collect();
        let layers: Vec<Blob> = layers.iter().map(|(b, _)| b.clone()).collect();
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": { "Cmd": ["/bin/true"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = self.blob(OCI_CONFIG, config.to_string().as_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = self.blob(OCI_MANIFEST, manifest.to_string().as_bytes());
        Image {
            manifest,
            config,
            layers,
        }
    }

    /// An index of `images`, each entry with its platform (linux/arch), not yet listed.
    pub fn index(&self, images: &[(&str, &Image)]) -> Blob {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": images.iter().map(|(arch, i)| {
                let mut d = i.manifest.descriptor();
                d["platform"] = json!({ "os": "linux", "architecture": arch });
                d
            }).collect::<Vec<_>>(),
        });
        self.blob(OCI_INDEX, index.to_string().as_bytes())
    }

    /// Writes `index.json` listing `entries` (a manifest or index, and its tag).
    pub fn list(&self, entries: &[(&Blob, &str)]) {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries.iter().map(|(b, tag)| {
                let mut d = b.descriptor();
                d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
                d
            }).collect::<Vec<_>>(),
        });
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }
}

/// skopeo for an arm64 car, with a trust policy of its own written into `dir` (a test must not
/// depend on the host's /etc/containers/policy.json).
pub fn skopeo(dir: &Path) -> Command {
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let mut c = Command::new("skopeo");
    c.arg("--policy")
        .arg(policy)
        .args(["--override-arch", "arm64", "--override-os", "linux"]);
    c
}

/// `skopeo copy` of `source` (`docker://HOST/NAME:TAG` or `@DIGEST`, plain HTTP) into the OCI
/// layout `dest` under tag `tag`, every digest kept: skopeo compresses uncompressed layers for an
/// `oci:` destination unless told not to, and `--preserve-digests` makes it fail rather than
/// change any digest.
pub fn skopeo_copy(dir: &Path, source: &str, dest: &Path, tag: &str) -> Command {
    let mut c = skopeo(dir);
    c.args([
        "copy",
        "--src-tls-verify=false",
        "--dest-oci-accept-uncompressed-layers",
        "--preserve-digests",
        source,
    ])
    .arg(format!("oci:{}:{tag}", dest.display()));
    c
}

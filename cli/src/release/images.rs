//! `release create --image [NAME=]DIR`: an OCI image layout made ready for the car. Layers travel
//! uncompressed (`application/vnd.oci.image.layer.v1.tar`, digest = the diff id its config
//! already names), so a new version of a layer shares most chunks with the old one and the rest
//! goes as deltas — as OS bundles do. A manifest whose layers were compressed, or that was in
//! Docker's schema 2, is rewritten as an OCI manifest over the uncompressed layers; one that
//! already was keeps its bytes and its digest. Artifacts are named after the image and the layer's
//! position (`nav.layer-2`), so the next release's layer at that position has the previous
//! version as its delta base on the car.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, anyhow, bail};
use cardeploy_chunks::Sha256;
use cardeploy_release::{ArtifactKind, check_repository, sha256_hex};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{MAX_ARTIFACT_BYTES, MAX_OCI_JSON_BYTES, Source, absolute};
use crate::files::read;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// How a layer arrives in the layout.
enum Packing {
    Tar,
    Gzip,
    Zstd,
}

fn packing(media_type: &str) -> Option<Packing> {
    match media_type {
        OCI_LAYER | "application/vnd.docker.image.rootfs.diff.tar" => Some(Packing::Tar),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Packing::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Some(Packing::Zstd),
        _ => None,
    }
}

/// One `--image` argument: the repository the car's registry serves it as, and the layout.
#[derive(Clone, Debug)]
pub struct ImageArg {
    pub name: String,
    pub dir: PathBuf,
}

impl FromStr for ImageArg {
    type Err = String;

    /// `NAME=DIR`, or `DIR` named after its last component.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, dir) = match s.split_once('=') {
            Some((name, dir)) => (name.to_owned(), PathBuf::from(dir)),
            None => {
                let dir = PathBuf::from(s);
                let name = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| format!("`{s}` names no directory"))?
                    .to_owned();
                (name, dir)
            }
        };
        check_repository(&name)
            .map_err(|e| format!("{e}; name it explicitly: --image NAME=DIR"))?;
        Ok(Self { name, dir })
    }
}

/// An image as the release carries it.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub name: String,
    pub tag: Option<String>,
    /// sha256 hex of the manifest as the layout had it (what a workload may already pin).
    pub original: String,
    /// sha256 hex of the manifest the release carries.
    pub manifest: String,
}

/// Makes the image of `arg` ready for the car: its blobs become `sources` (each digest once,
/// across images: `seen`), rewritten ones written under `out/blobs/sha256/`.
pub fn prepare(
    arg: &ImageArg,
    out: &Path,
    seen: &mut BTreeSet<String>,
    sources: &mut Vec<Source>,
) -> anyhow::Result<Prepared> {
    let layout = arg.dir.as_path();
    let top = top_descriptor(layout)?;
    let tag = top
        .annotations
        .get("org.opencontainers.image.ref.name")
        .filter(|t| !t.contains(['/', ':']))
        .cloned();
    let desc = single_platform(layout, &top)?;
    let (mut manifest, original) = read_json_blob::<Value>(layout, &desc)?;
    let media_type = manifest["mediaType"]
        .as_str()
        .unwrap_or(&desc.media_type)
        .to_owned();
    if !media_type.is_empty() && media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        bail!(
            "{}: {} is a `{media_type}`, not an image manifest",
            layout.display(),
            desc.digest
        );
    }
    let config: Descriptor =
        serde_json::from_value(manifest["config"].clone()).with_context(|| {
            format!(
                "{}: manifest {} has no config",
                layout.display(),
                desc.digest
            )
        })?;
    let layers: Vec<Descriptor> =
        serde_json::from_value(manifest["layers"].clone()).with_context(|| {
            format!(
                "{}: manifest {} has no layer list",
                layout.display(),
                desc.digest
            )
        })?;
    if config.media_type != OCI_CONFIG && config.media_type != DOCKER_CONFIG {
        bail!(
            "{}: the config of {} is a `{}`, not a container image config: a release carries container images",
            layout.display(),
            desc.digest,
            config.media_type
        );
    }
    let (config_doc, config_hex) = read_json_blob::<Value>(layout, &config)?;
    let diff_ids: Vec<String> = config_doc["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != layers.len() {
        bail!(
            "{}: the config names {} layer diff ids, the manifest {} layers: the image is inconsistent; build it again",
            layout.display(),
            diff_ids.len(),
            layers.len()
        );
    }
    let base = arg.name.replace('/', ".");
    let blobs_dir = out.join("blobs/sha256");
    let mut changed = media_type != OCI_MANIFEST || config.media_type != OCI_CONFIG;
    let mut new_layers = Vec::new();
    let mut add =
        |sources: &mut Vec<Source>, kind, name: String, path: PathBuf, hex: &str, size| {
            if seen.insert(hex.to_owned()) {
                sources.push(Source {
                    kind,
                    name,
                    path,
                    expect: Some((hex.to_owned(), size)),
                });
            }
        };
    add(
        sources,
        ArtifactKind::OciConfig,
        format!("{base}.config"),
        absolute(&blob_path(layout, &config_hex))?,
        &config_hex,
        config.size,
    );
    for (i, (layer, diff_id)) in layers.iter().zip(&diff_ids).enumerate() {
        let Some(packing) = packing(&layer.media_type) else {
            bail!(
                "{}: layer {} is `{}`; a release carries distributable tar layers (plain, gzip or zstd)",
                layout.display(),
                layer.digest,
                layer.media_type
            );
        };
        let diff_hex = blob_hex(layout, diff_id)?;
        let (path, size) = match packing {
            Packing::Tar => {
                let hex = blob_hex(layout, &layer.digest)?;
                if hex != diff_hex {
                    bail!(
                        "{}: uncompressed layer {} is not the diff id {diff_id} its config names: the image is inconsistent",
                        layout.display(),
                        layer.digest
                    );
                }
                (absolute(&blob_path(layout, &hex))?, layer.size)
            }
            Packing::Gzip | Packing::Zstd => {
                changed = true;
                uncompress(layout, layer, &packing, &diff_hex, &blobs_dir)?
            }
        };
        add(
            sources,
            ArtifactKind::OciLayer,
            format!("{base}.layer-{}", i + 1),
            path,
            &diff_hex,
            size,
        );
        let mut d =
            json!({ "mediaType": OCI_LAYER, "digest": format!("sha256:{diff_hex}"), "size": size });
        if !layer.annotations.is_empty() {
            d["annotations"] = json!(layer.annotations);
        }
        new_layers.push(d);
    }
    let (manifest_path, manifest_hex, manifest_size) = if changed {
        manifest["schemaVersion"] = json!(2);
        manifest["mediaType"] = json!(OCI_MANIFEST);
        manifest["config"]["mediaType"] = json!(OCI_CONFIG);
        manifest["layers"] = Value::Array(new_layers);
        // A subject names an artifact the release does not carry.
        if let Some(m) = manifest.as_object_mut() {
            m.remove("subject");
        }
        let bytes = serde_json::to_vec(&manifest)?;
        let hex = sha256_hex(&bytes);
        std::fs::create_dir_all(&blobs_dir)
            .with_context(|| format!("creating {}", blobs_dir.display()))?;
        let path = blobs_dir.join(&hex);
        crate::files::write(&path, &bytes)?;
        (absolute(&path)?, hex, bytes.len() as u64)
    } else {
        (
            absolute(&blob_path(layout, &original))?,
            original.clone(),
            desc.size,
        )
    };
    add(
        sources,
        ArtifactKind::OciManifest,
        format!("{base}.manifest"),
        manifest_path,
        &manifest_hex,
        manifest_size,
    );
    Ok(Prepared {
        name: arg.name.clone(),
        tag,
        original,
        manifest: manifest_hex,
    })
}

/// The one image (or index) the layout lists.
fn top_descriptor(layout: &Path) -> anyhow::Result<Descriptor> {
    let marker = layout.join("oci-layout");
    let text = std::fs::read(&marker).map_err(|_| {
        anyhow!(
            "{} is not an OCI image layout (no oci-layout file): export one with `skopeo copy docker://IMAGE oci:DIR` or `docker buildx build --output type=oci,tar=false,dest=DIR`",
            layout.display()
        )
    })?;
    let marker: OciLayout = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not an oci-layout file", layout.display()))?;
    if !marker.version.starts_with("1.") {
        bail!(
            "{}: image layout version {} is not supported (1.x is)",
            layout.display(),
            marker.version
        );
    }
    let index_path = layout.join("index.json");
    let index: OciIndex = serde_json::from_slice(&read(&index_path)?)
        .with_context(|| format!("{} is not an OCI index", index_path.display()))?;
    let [top] = <[Descriptor; 1]>::try_from(index.manifests).map_err(|all| {
        anyhow!(
            "{} lists {} images; give each its own layout and --image (`skopeo copy ... oci:DIR:TAG` into separate directories)",
            index_path.display(),
            all.len()
        )
    })?;
    Ok(top)
}

/// Uncompresses a layer into `dir`, checking the compressed bytes against the layer's digest
/// and the result against its diff id, and bounding the result (a decompression bomb stops at
/// what a car accepts). Returns the file and its size.
fn uncompress(
    layout: &Path,
    layer: &Descriptor,
    packing: &Packing,
    diff_hex: &str,
    dir: &Path,
) -> anyhow::Result<(PathBuf, u64)> {
    let packed_hex = blob_hex(layout, &layer.digest)?;
    let packed_path = blob_path(layout, &packed_hex);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join(diff_hex);
    if let Ok(meta) = std::fs::metadata(&target)
        && hash_file(&target)? == diff_hex
    {
        return Ok((absolute(&target)?, meta.len()));
    }
    if hash_file(&packed_path)? != packed_hex {
        bail!(
            "{} does not hash to its name: the OCI layout is damaged; export the image again",
            packed_path.display()
        );
    }
    let file = std::fs::File::open(&packed_path)
        .with_context(|| format!("{}: layer {} is missing", layout.display(), layer.digest))?;
    let mut reader: Box<dyn Read> = match packing {
        Packing::Gzip => Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        ))),
        Packing::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
        Packing::Tar => bail!("internal: a plain tar layer needs no uncompressing"),
    };
    let partial = dir.join(format!("{diff_hex}.partial"));
    let mut out = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).with_context(|| {
            format!(
                "{}: layer {} does not uncompress",
                layout.display(),
                layer.digest
            )
        })?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > MAX_ARTIFACT_BYTES {
            bail!(
                "{}: layer {} uncompresses to more than cars accept",
                layout.display(),
                layer.digest
            );
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", partial.display()))?;
    }
    out.sync_all()?;
    drop(reader);
    let got = hasher.finish().hex();
    if got != diff_hex {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "{}: layer {} uncompresses to sha256:{got}, not the diff id sha256:{diff_hex} its config names: the image is inconsistent; build it again",
            layout.display(),
            layer.digest
        );
    }
    std::fs::rename(&partial, &target)
        .with_context(|| format!("renaming to {}", target.display()))?;
    Ok((absolute(&target)?, size))
}

fn hash_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hasher.finish().hex());
        }
        hasher.update(&buf[..n]);
    }
}

// OCI image layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md): only
// the fields needed to find the blobs; unknown fields are ignored, as the spec asks.

#[derive(Deserialize)]
struct OciLayout {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<Descriptor>,
}

#[derive(Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The sha256 hex of a descriptor's digest; refuses anything that could leave `blobs/sha256`.
fn blob_hex(layout: &Path, digest: &str) -> anyhow::Result<String> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        bail!(
            "{}: blob {digest} is not sha256: only sha256 layouts are supported",
            layout.display()
        );
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bail!("{}: `{digest}` is not a sha256 digest", layout.display());
    }
    Ok(hex.to_owned())
}

fn blob_path(layout: &Path, hex: &str) -> PathBuf {
    layout.join("blobs").join("sha256").join(hex)
}

/// A small JSON blob (manifest, index), verified against its digest before it is parsed.
fn read_json_blob<T: serde::de::DeserializeOwned>(
    layout: &Path,
    desc: &Descriptor,
) -> anyhow::Result<(T, String)> {
    let hex = blob_hex(layout, &desc.digest)?;
    let path = blob_path(layout, &hex);
    let size = std::fs::metadata(&path)
        .with_context(|| format!("{}: blob {} is missing", layout.display(), desc.digest))?
        .len();
    if size > MAX_OCI_JSON_BYTES {
        bail!(
            "{} is {size} bytes: too large for an OCI manifest",
            path.display()
        );
    }
    let bytes = read(&path)?;
    if sha256_hex(&bytes) != hex {
        bail!(
            "{} does not hash to its name: the OCI layout is damaged; export the image again",
            path.display()
        );
    }
    let value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an OCI manifest", path.display()))?;
    Ok((value, hex))
}

/// An image manifest's descriptor. An image index (what `docker buildx` writes even for one
/// platform, to carry its attestations) is followed to its one image manifest; a car runs one
/// platform, so an index of several is refused rather than shipping them all.
fn single_platform(layout: &Path, desc: &Descriptor) -> anyhow::Result<Descriptor> {
    let mut desc = Descriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.clone(),
        size: desc.size,
        annotations: BTreeMap::new(),
    };
    // Indexes may nest; a few levels are plenty for anything a build tool writes.
    for _ in 0..4 {
        if !INDEX_TYPES.contains(&desc.media_type.as_str()) {
            return Ok(desc);
        }
        let (index, _) = read_json_blob::<OciIndex>(layout, &desc)?;
        let images: Vec<Descriptor> = index
            .manifests
            .into_iter()
            .filter(|d| {
                d.annotations
                    .get("vnd.docker.reference.type")
                    .is_none_or(|t| t != "attestation-manifest")
            })
            .collect();
        let [image] = <[Descriptor; 1]>::try_from(images).map_err(|images| {
            anyhow!(
                "{}: {} is an image index of {} platforms; a release carries one: export the car's platform only (`skopeo copy --override-arch arm64 ...` or `docker buildx build --platform linux/arm64 ...`)",
                layout.display(),
                desc.digest,
                images.len()
            )
        })?;
        desc = image;
    }
    bail!(
        "{}: image indexes nested too deep under {}",
        layout.display(),
        desc.digest
    )
}

//! `cardeploy release`: make a release manifest from what a car installs (a RAUC bundle, OCI
//! images, Kubernetes manifests), sign it offline with the release role's key(s), verify it the
//! way the twin and the cars do, and push it with its artifacts to the twin.
//!
//! A release directory (`release create --out DIR`) holds:
//! - `release.json`: the manifest payload, unsigned. `release sign` signs exactly these bytes;
//!   nothing re-serialises it, so its sha256 is the release digest desired states name.
//! - `release.signed.json`: the DSSE envelope (docs/release-format.md), one signature per key.
//! - `sources.json`: artifact name → the file it was made from, for `release push`.
//! - `indexes/<id>`: each artifact's chunk index (docs/delta.md).
//!
//! Tests: `cargo test -p cardeploy --test release` (runs the binary, reads back with the library).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use cardeploy_chunks::ChunkIndex;
use cardeploy_protocol::api::ReleaseSummary;
use cardeploy_release::{
    Artifact, ArtifactKind, Envelope, Image, MAX_ENVELOPE_BYTES, RELEASE_TYPE, Release, RoleName,
    SigningKey, TrustedRoot, Workload, check_artifact, key_file, now_secs, sha256_hex,
    verify_release,
};
use clap::Subcommand;
use indicatif::HumanBytes;
use serde_json::Value;

mod images;
mod workloads;

use crate::api::{Api, ApiArgs, with_hint};
use crate::artifact;
use crate::files::{self, read};

const RELEASE_FILE: &str = "release.json";
const SIGNED_FILE: &str = "release.signed.json";
const SOURCES_FILE: &str = "sources.json";
const INDEXES_DIR: &str = "indexes";
/// Largest artifact `release verify` accepts: what the twin and the cars are expected to allow.
const MAX_ARTIFACT_BYTES: u64 = 16 << 30;
/// OCI manifests and indexes are small JSON documents; registries refuse them above 4 MiB.
const MAX_OCI_JSON_BYTES: u64 = 4 << 20;
/// Room left in an envelope for signatures (32 × ~150 bytes of JSON) and the base64 growth.
const SIGNATURE_ROOM: usize = 16 << 10;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Make an unsigned release in DIR from a RAUC bundle, OCI images and Kubernetes manifests
    ///
    /// Every artifact is chunked the way cars fetch it. DIR gets release.json (the manifest to
    /// sign), sources.json (which file each artifact came from, for `release push`) and
    /// indexes/ (the chunk indexes). Nothing is uploaded and nothing is signed yet.
    ///
    /// Example:
    ///   cardeploy release create --line ecu-main --version 1.5.0 \
    ///     --os build/rootfs.raucb --image build/oci/infotainment --manifests k8s/ \
    ///     --out releases/1.5.0
    ///   cardeploy release sign releases/1.5.0 --key keys/release.key
    #[command(verbatim_doc_comment)]
    Create(CreateArgs),
    /// Sign a release with the release role's key(s)
    ///
    /// Given DIR (or its release.json), writes DIR/release.signed.json signed by every --key.
    /// Given a signed envelope (or DIR that already has one), adds the signatures to it: when
    /// the root asks for several release signatures, each key holder runs this in turn.
    /// The bytes of release.json are signed exactly as they are.
    ///
    /// Example (two holders):
    ///   cardeploy release sign releases/1.5.0 --key keys/release-a.key
    ///   cardeploy release sign releases/1.5.0/release.signed.json --key keys/release-b.key
    #[command(verbatim_doc_comment)]
    Sign {
        /// A release directory, its release.json, or a release.signed.json to add to.
        #[arg(value_name = "DIR_OR_FILE")]
        input: PathBuf,
        /// A private key written by `cardeploy keys gen` (repeat for several).
        #[arg(long = "key", value_name = "KEY", required = true)]
        keys: Vec<PathBuf>,
        /// Where to write the envelope [default: release.signed.json next to the input, or the
        /// input envelope itself].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify a signed release the way the twin does when it is pushed
    ///
    /// Checks that it is signed by the release role of the root and that its names, digests
    /// and sizes are well formed (steps M1-M3 and M6 of docs/release-format.md).
    ///
    /// --root takes the chain cars follow: the root they pin first, then each rotation in
    /// order; the last one is the root the release is checked against.
    ///
    /// Example:
    ///   cardeploy release verify releases/1.5.0 --root root-v1.json --root root-v2.json
    #[command(verbatim_doc_comment)]
    Verify {
        /// A release.signed.json, or the directory holding it.
        #[arg(value_name = "ENVELOPE")]
        envelope: PathBuf,
        /// A root envelope (repeat: the pinned root first, then each rotation in order).
        #[arg(long = "root", value_name = "ROOT.json", required = true)]
        roots: Vec<PathBuf>,
    },
    /// Show what a release contains and who signed it, without verifying anything.
    Inspect {
        /// A release.signed.json, an unsigned release.json, or the directory holding them.
        #[arg(value_name = "ENVELOPE")]
        envelope: PathBuf,
        /// Print the manifest payload (the signed bytes) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Push a signed release to the twin: its artifacts' missing chunks, then the release
    ///
    /// Each artifact is chunked again first and must still be exactly what was signed; nothing
    /// is sent otherwise. Then each artifact's missing chunks (zstd) and chunk index go up, and
    /// last the signed envelope, which the twin verifies against its root.
    ///
    /// Prints the release digest: name it in a car's desired state with
    ///   cardeploy car set-desired CAR --release DIGEST
    #[command(verbatim_doc_comment)]
    Push {
        /// A release.signed.json (with the sources.json `release create` wrote next to it), or
        /// the directory holding both.
        #[arg(value_name = "ENVELOPE_OR_DIR")]
        input: PathBuf,
        /// zstd level of uploaded chunks (what cars receive when no delta is smaller).
        #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
        /// The twin's operator API, e.g. http://twin.example.com:7080 (same as --api).
        #[arg(long, value_name = "URL")]
        twin: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Semantic version of the release, e.g. 1.5.0. Cars never go back to a lower version of
    /// the same line unless the root allows it.
    #[arg(long, value_name = "SEMVER", value_parser = parse_version)]
    version: semver::Version,
    /// The release line, e.g. ecu-main: versions are ordered within it
    /// (1-64 of A-Z a-z 0-9 - _ ., starting alphanumeric).
    #[arg(long, value_name = "NAME", value_parser = parse_line)]
    line: String,
    /// The RAUC `compatible` of the hardware this release is for (`compatible=` in the car's
    /// /etc/rauc/system.conf). Read from the bundle's manifest.raucm when --os is given.
    #[arg(long, value_name = "COMPATIBLE")]
    compatible: Option<String>,
    /// A RAUC bundle: the OS update, shipped as artifact `rootfs`.
    #[arg(long, value_name = "BUNDLE.raucb")]
    os: Option<PathBuf>,
    /// A container image: an OCI image layout directory (oci-layout, index.json,
    /// blobs/sha256/...) holding one image, e.g. from `skopeo copy docker://IMAGE oci:DIR` or
    /// `docker buildx build --platform linux/arm64 --output type=oci,tar=false,dest=DIR`,
    /// served on the car as NAME (default: the directory's name). Layers are stored
    /// uncompressed, so the next version travels as deltas; the manifest is rewritten to match
    /// and signed with the release. Repeat for several images.
    #[arg(long = "image", value_name = "[NAME=]OCI_LAYOUT_DIR")]
    images: Vec<images::ImageArg>,
    /// A directory of Kubernetes manifests: each *.yaml, *.yml and *.json file becomes a
    /// workload named after the file (k8s/infotainment.yaml → infotainment), stored as JSON
    /// with every container image rewritten to `registry.cardeploy.local/NAME@sha256:…`, the
    /// car's registry by digest. A container image no --image carries is refused.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// The release directory to write.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create(args) => create(&args),
        Command::Sign { input, keys, out } => sign(&input, &keys, out),
        Command::Verify { envelope, roots } => verify(&envelope, &roots),
        Command::Inspect { envelope, json } => inspect(&envelope, json),
        Command::Push {
            input,
            level,
            twin,
            mut api,
        } => {
            if let Some(url) = twin {
                api.api = url;
            }
            push(&input, level, &api)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Names and small helpers

fn parse_version(s: &str) -> Result<semver::Version, String> {
    semver::Version::parse(s).map_err(|e| format!("not a semantic version (e.g. 1.5.0): {e}"))
}

/// The rule of docs/release-format.md M2 for lines (one canonical form), checked here so
/// `create` refuses what the twin and the cars would.
fn parse_line(s: &str) -> Result<String, String> {
    cardeploy_release::check_line(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// The rule of docs/release-format.md M3 (names become file names on the car), checked here so
/// `create` refuses what the twin and the cars would.
fn check_name(name: &str) -> Result<(), String> {
    cardeploy_release::safe_name("name", name).map_err(|e| e.to_string())
}

fn kind_name(kind: ArtifactKind) -> &'static str {
    match kind {
        ArtifactKind::RaucBundle => "rauc-bundle",
        ArtifactKind::OciManifest => "oci-manifest",
        ArtifactKind::OciConfig => "oci-config",
        ArtifactKind::OciLayer => "oci-layer",
        ArtifactKind::KubeManifest => "kube-manifest",
    }
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
}

fn parse_release(payload: &[u8], origin: &Path) -> anyhow::Result<Release> {
    serde_json::from_slice(payload).with_context(|| {
        format!(
            "{} does not hold a release manifest (`cardeploy release create` writes them)",
            origin.display()
        )
    })
}

fn read_envelope(path: &Path) -> anyhow::Result<(Vec<u8>, Envelope)> {
    files::read_envelope(
        path,
        RELEASE_TYPE,
        "release",
        &format!("`cardeploy release sign` writes {SIGNED_FILE}"),
    )
}

/// A directory means its release.signed.json.
fn envelope_path(input: &Path) -> anyhow::Result<PathBuf> {
    if !input.is_dir() {
        return Ok(input.to_owned());
    }
    let path = input.join(SIGNED_FILE);
    if !path.exists() {
        bail!(
            "{} has no {SIGNED_FILE}: sign it first with `cardeploy release sign {} --key KEY`",
            input.display(),
            input.display()
        );
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// create

/// An artifact found on disk, before it is chunked.
struct Source {
    kind: ArtifactKind,
    name: String,
    path: PathBuf,
    /// What the file must hash to and weigh (OCI blobs are named by their digest).
    expect: Option<(String, u64)>,
}

fn create(args: &CreateArgs) -> anyhow::Result<()> {
    if args.os.is_none() && args.images.is_empty() && args.manifests.is_none() {
        bail!("nothing to release: give --os BUNDLE, --image OCI_LAYOUT_DIR or --manifests DIR");
    }
    let compatible = compatible(args)?;

    let mut sources = Vec::new();
    if let Some(bundle) = &args.os {
        sources.push(Source {
            kind: ArtifactKind::RaucBundle,
            name: "rootfs".to_owned(),
            path: absolute(bundle)?,
            expect: None,
        });
    }
    let out = &args.out;
    if out.join(SIGNED_FILE).exists() {
        bail!(
            "{} already holds a signed release: choose a new --out directory (or remove {} if you mean to replace it)",
            out.display(),
            out.join(SIGNED_FILE).display()
        );
    }
    let mut seen_blobs = BTreeSet::new();
    let mut prepared = Vec::new();
    for image in &args.images {
        if prepared
            .iter()
            .any(|p: &images::Prepared| p.name == image.name)
        {
            bail!(
                "two --image arguments are both named `{}`: name one NAME=DIR",
                image.name
            );
        }
        prepared.push(images::prepare(image, out, &mut seen_blobs, &mut sources)?);
    }
    let mut workload_names = Vec::new();
    if let Some(dir) = &args.manifests {
        for (name, path) in workloads::kube_manifests(dir)? {
            let path = workloads::prepare(&name, &path, &prepared, out)?;
            workload_names.push(name.clone());
            sources.push(Source {
                kind: ArtifactKind::KubeManifest,
                name,
                path,
                expect: None,
            });
        }
    }
    let mut names = BTreeSet::new();
    for s in &sources {
        if !names.insert(s.name.as_str()) {
            bail!(
                "two artifacts are named `{}` ({}): rename one",
                s.name,
                s.path.display()
            );
        }
    }

    std::fs::create_dir_all(out.join(INDEXES_DIR))
        .with_context(|| format!("creating {}", out.join(INDEXES_DIR).display()))?;

    let mut artifacts = Vec::new();
    let mut source_paths = BTreeMap::new();
    for s in &sources {
        let index = artifact::chunk(&s.path, &s.name)?;
        let digest = index.artifact.hex();
        if let Some((expected, size)) = &s.expect {
            if &digest != expected {
                bail!(
                    "{} has sha256 {digest}, but its name says {expected}: the OCI layout is damaged; export the image again",
                    s.path.display()
                );
            }
            if index.size != *size {
                bail!(
                    "{} is {} bytes, its descriptor says {size}: the OCI layout is damaged; export the image again",
                    s.path.display(),
                    index.size
                );
            }
        }
        if index.size > MAX_ARTIFACT_BYTES {
            bail!(
                "{} is {}, more than cars accept ({})",
                s.path.display(),
                HumanBytes(index.size),
                HumanBytes(MAX_ARTIFACT_BYTES)
            );
        }
        let id = index.id().hex();
        files::write(&out.join(INDEXES_DIR).join(&id), index.encode())
            .with_context(|| format!("writing the chunk index of {}", s.path.display()))?;
        artifacts.push(Artifact {
            kind: s.kind,
            name: s.name.clone(),
            digest,
            size: index.size,
            index: id,
        });
        source_paths.insert(s.name.clone(), s.path.clone());
    }
    let workloads = workload_names
        .iter()
        .filter_map(|name| artifacts.iter().find(|a| &a.name == name))
        .map(|a| Workload {
            name: a.name.clone(),
            digest: a.digest.clone(),
        })
        .collect();

    let release = Release {
        line: args.line.clone(),
        version: args.version.to_string(),
        compatible,
        created: now_secs(),
        artifacts,
        workloads,
        images: prepared
            .into_iter()
            .map(|p| Image {
                name: p.name,
                manifest: p.manifest,
                tag: p.tag,
            })
            .collect(),
    };
    let mut payload = serde_json::to_vec_pretty(&release)?;
    payload.push(b'\n');
    // base64 grows the payload by a third inside the envelope.
    if payload.len() / 3 * 4 + SIGNATURE_ROOM > MAX_ENVELOPE_BYTES {
        bail!(
            "the manifest lists {} artifacts ({} bytes): too many for one signed envelope ({MAX_ENVELOPE_BYTES} bytes); split the release",
            release.artifacts.len(),
            payload.len()
        );
    }
    let sources_json = serde_json::to_vec_pretty(&source_paths)
        .context("a source path is not UTF-8: move the file to a path that is")?;
    files::write(&out.join(SOURCES_FILE), sources_json)?;
    files::write(&out.join(RELEASE_FILE), &payload)?;

    print_release(&release);
    println!("digest     {} (once signed)", sha256_hex(&payload));
    eprintln!(
        "wrote {} (unsigned). Next: cardeploy release sign {} --key keys/release.key",
        out.join(RELEASE_FILE).display(),
        out.display()
    );
    Ok(())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("cannot find {}", path.display()))
}

/// `compatible` from --compatible or the bundle, and never two different answers.
fn compatible(args: &CreateArgs) -> anyhow::Result<String> {
    let given = args.compatible.as_deref().map(str::trim);
    if given == Some("") {
        bail!("--compatible is empty");
    }
    match (given, &args.os) {
        (Some(given), Some(bundle)) => {
            if let Ok(found) = bundle_compatible(bundle)
                && found != given
            {
                bail!(
                    "{} is for compatible `{found}`, but --compatible says `{given}`: RAUC on the car would refuse the bundle",
                    bundle.display()
                );
            }
            Ok(given.to_owned())
        }
        (Some(given), None) => Ok(given.to_owned()),
        (None, Some(bundle)) => bundle_compatible(bundle).map_err(|e| {
            anyhow!(
                "cannot read `compatible` from {}: {e:#}; pass --compatible",
                bundle.display()
            )
        }),
        (None, None) => bail!(
            "--compatible is required without --os: the RAUC `compatible` of the hardware (compatible= in /etc/rauc/system.conf on a car)"
        ),
    }
}

/// Read `compatible=` under `[update]` from the bundle's manifest.raucm. A plain or verity
/// bundle is a squashfs with its signature appended, which unsquashfs reads past.
fn bundle_compatible(bundle: &Path) -> anyhow::Result<String> {
    let output = std::process::Command::new("unsquashfs")
        .arg("-cat")
        .arg(bundle)
        .arg("manifest.raucm")
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("unsquashfs is not installed (package squashfs-tools)")
        }
        Err(e) => bail!("running unsquashfs: {e}"),
    };
    if !output.status.success() {
        bail!(
            "unsquashfs cannot read manifest.raucm from it: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    raucm_compatible(&String::from_utf8_lossy(&output.stdout))
        .ok_or_else(|| anyhow!("its manifest.raucm has no compatible= under [update]"))
}

fn raucm_compatible(manifest: &str) -> Option<String> {
    let mut in_update = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_update = line == "[update]";
        } else if in_update
            && let Some((key, value)) = line.split_once('=')
            && key.trim() == "compatible"
            && !value.trim().is_empty()
        {
            return Some(value.trim().to_owned());
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// sign

fn sign(input: &Path, key_paths: &[PathBuf], out: Option<PathBuf>) -> anyhow::Result<()> {
    // Keys first: a wrong path fails before any file is touched.
    let keys: Vec<SigningKey> = key_paths
        .iter()
        .map(|p| key_file::read_private(p))
        .collect::<Result<_, _>>()?;

    // Where the unsigned payload is (if any) and which envelope is written or added to.
    let (payload_file, signed_file) = if input.is_dir() {
        (Some(input.join(RELEASE_FILE)), input.join(SIGNED_FILE))
    } else if Envelope::from_json(&read(input)?).is_ok() {
        (None, input.to_owned())
    } else {
        (Some(input.to_owned()), input.with_file_name(SIGNED_FILE))
    };
    let (mut envelope, origin) = if signed_file.exists() {
        let (_, envelope) = read_envelope(&signed_file)?;
        if let Some(payload_file) = &payload_file
            && payload_file.exists()
            && read(payload_file)? != envelope.payload
        {
            bail!(
                "{} signs another release than {}: remove it (and with it its signatures) to sign this one",
                signed_file.display(),
                payload_file.display()
            );
        }
        (envelope, signed_file.clone())
    } else {
        let payload_file = payload_file.unwrap_or_else(|| input.join(RELEASE_FILE));
        let payload = read(&payload_file)
            .context("no release to sign: make one with `cardeploy release create --out DIR`")?;
        (
            cardeploy_release::sign(RELEASE_TYPE, &payload, &[]),
            payload_file,
        )
    };
    // Never sign what is not a release manifest: look at it the way a signer should.
    let release = parse_release(&envelope.payload, &origin)?;
    parse_line(&release.line).map_err(|e| anyhow!("{e}"))?;
    parse_version(&release.version).map_err(|e| anyhow!("release version: {e}"))?;

    let out = out.unwrap_or(signed_file);
    let mut added = 0;
    for key in &keys {
        let id = key.public().id();
        if envelope.signatures.iter().any(|s| s.keyid == id.as_str()) {
            eprintln!("key {id} had already signed");
        } else {
            envelope.add_signature(key);
            added += 1;
        }
    }
    let bytes = envelope.to_json();
    if bytes.len() > MAX_ENVELOPE_BYTES {
        bail!(
            "the envelope would be {} bytes, more than the limit of {MAX_ENVELOPE_BYTES}",
            bytes.len()
        );
    }
    files::write(&out, &bytes)?;
    println!(
        "signed {}@{} for {} ({} artifacts): {added} signature(s) added, {} in all",
        release.line,
        release.version,
        release.compatible,
        release.artifacts.len(),
        envelope.signatures.len()
    );
    println!("digest     {}", sha256_hex(&envelope.payload));
    eprintln!(
        "wrote {}. Next: cardeploy release verify {} --root ROOT.json",
        out.display(),
        out.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// verify and inspect

/// The pinned root, then each rotation in order.
fn root_chain(roots: &[PathBuf]) -> anyhow::Result<TrustedRoot> {
    let Some((first, rest)) = roots.split_first() else {
        bail!("give the root with --root ROOT.json");
    };
    let mut trusted = TrustedRoot::pinned(&read(first)?)
        .with_context(|| format!("{} is not a valid root", first.display()))?;
    for next in rest {
        trusted = trusted.rotate(&read(next)?).with_context(|| {
            format!(
                "{} does not rotate from root version {}: give the roots oldest first",
                next.display(),
                trusted.root().version
            )
        })?;
    }
    Ok(trusted)
}

/// What to do about a release that does not verify.
fn hint(e: &cardeploy_release::Error) -> &'static str {
    use cardeploy_release::Error as E;
    match e {
        E::BelowThreshold { .. } => {
            "it must be signed by the release key(s) this root names and not changed since: `cardeploy release inspect` shows who signed; sign with `cardeploy release sign DIR --key release.key`"
        }
        E::Expired { .. } => {
            "the newest root given has expired: rotate it (`cardeploy root rotate`) and give the whole chain, oldest first, with --root"
        }
        E::ImpossibleThreshold { .. } => {
            "the root's release role cannot be satisfied: fix the root with `cardeploy root rotate`"
        }
        E::PayloadType { .. } => "this is not a release (`cardeploy release sign` writes those)",
        E::ArtifactTooLarge { .. } => {
            "cars refuse artifacts this large: make the OS or image smaller"
        }
        _ => {
            "make the release again with `cardeploy release create` (it checks names, digests and sizes) and sign it"
        }
    }
}

fn verify(input: &Path, roots: &[PathBuf]) -> anyhow::Result<()> {
    let path = envelope_path(input)?;
    let (_, envelope) = read_envelope(&path)?;
    let trusted = root_chain(roots)?;
    let checked = verify_release(&trusted, &envelope, now_secs(), MAX_ARTIFACT_BYTES)
        .map_err(|e| anyhow!("{} does not verify: {e}\n  {}", path.display(), hint(&e)))?;
    let signers = trusted
        .verify(RoleName::Release, RELEASE_TYPE, &envelope)
        .map(|v| v.signers)?;
    println!(
        "release verified under root version {}",
        trusted.root().version
    );
    println!("digest     {}", checked.digest);
    print_release(&checked.release);
    for id in &signers {
        println!("signed by  {id}");
    }
    Ok(())
}

fn print_release(release: &Release) {
    println!("line       {}", release.line);
    println!("version    {}", release.version);
    println!("compatible {}", release.compatible);
    println!("created    {} (unix seconds)", release.created);
    let total: u64 = release.artifacts.iter().map(|a| a.size).sum();
    println!(
        "artifacts  {} ({} in all)",
        release.artifacts.len(),
        HumanBytes(total)
    );
    let width = release
        .artifacts
        .iter()
        .map(|a| a.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "  {:<13}  {:<width$}  {:>10}  {:<12}  INDEX",
        "KIND", "NAME", "SIZE", "DIGEST"
    );
    for a in &release.artifacts {
        println!(
            "  {:<13}  {:<width$}  {:>10}  {:<12}  {}",
            kind_name(a.kind),
            a.name,
            HumanBytes(a.size).to_string(),
            short(&a.digest),
            short(&a.index)
        );
    }
    if release.workloads.is_empty() {
        println!("workloads  none");
    } else {
        println!("workloads  {}", release.workloads.len());
        for w in &release.workloads {
            println!("  {:<width$}  {}", w.name, short(&w.digest));
        }
    }
}

fn inspect(input: &Path, json: bool) -> anyhow::Result<()> {
    // A directory: its envelope if signed, else its release.json.
    let path = match input.is_dir() {
        true if input.join(SIGNED_FILE).exists() => input.join(SIGNED_FILE),
        true => input.join(RELEASE_FILE),
        false => input.to_owned(),
    };
    let bytes = read(&path)?;
    let envelope = Envelope::from_json(&bytes).ok();
    if let Some(e) = &envelope
        && e.payload_type != RELEASE_TYPE
    {
        bail!("{} is a {}, not a release", path.display(), e.payload_type);
    }
    let payload = envelope.as_ref().map_or(&bytes[..], |e| &e.payload[..]);
    let release = parse_release(payload, &path)?;
    let warning = format!(
        "NOT verified: this is what {} claims; check it with `cardeploy release verify {} --root ROOT.json`",
        path.display(),
        path.display()
    );
    if json {
        eprintln!("{warning}");
        let text = std::str::from_utf8(payload)
            .with_context(|| format!("{} holds a payload that is not text", path.display()))?;
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
        return Ok(());
    }
    println!("{warning}");
    println!("digest     {}", sha256_hex(payload));
    print_release(&release);
    match &envelope {
        None => println!("signatures none (unsigned: `cardeploy release sign`)"),
        Some(e) => {
            println!("signatures {} (not checked)", e.signatures.len());
            for s in &e.signatures {
                println!("  key {}", s.keyid);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// push

fn push(input: &Path, level: i32, args: &ApiArgs) -> anyhow::Result<()> {
    let path = envelope_path(input)?;
    let (bytes, envelope) = read_envelope(&path)?;
    if envelope.signatures.is_empty() {
        bail!(
            "{} carries no signature: `cardeploy release sign {} --key KEY`",
            path.display(),
            path.display()
        );
    }
    let release = parse_release(&envelope.payload, &path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let sources_path = dir.join(SOURCES_FILE);
    let sources: BTreeMap<String, PathBuf> = serde_json::from_slice(
        &read(&sources_path).with_context(|| {
            format!(
                "push from the directory `release create` wrote: {SOURCES_FILE} says where each artifact is"
            )
        })?,
    )
    .with_context(|| format!("{} is not a sources file", sources_path.display()))?;

    // Every artifact must still be exactly what was signed before anything is sent.
    let mut checked: Vec<(&Artifact, &PathBuf, ChunkIndex)> = Vec::new();
    for a in &release.artifacts {
        let source = sources.get(&a.name).ok_or_else(|| {
            anyhow!(
                "{} does not say where artifact {} is: push from the directory `release create` wrote",
                sources_path.display(),
                a.name
            )
        })?;
        let index = artifact::chunk(source, &a.name)?;
        let id = index.id().hex();
        if id != a.index || check_artifact(a, index.size, &index.artifact.hex()).is_err() {
            bail!(
                "{} changed since `release create` (artifact {}: chunk index {} now, {} signed): restore it, or create and sign a new release",
                source.display(),
                a.name,
                short(&id),
                short(&a.index)
            );
        }
        checked.push((a, source, index));
    }

    let api = Api::new(args)?;
    for (a, source, index) in &checked {
        artifact::push_index(&api, source, &a.name, index, level)?;
    }
    let body: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let summary: ReleaseSummary = api
        .post("registering the release", "/api/v1/releases", &body)
        .map_err(|e| {
            with_hint(
                e,
                &[
                    (
                        409,
                        "the twin needs its root first (`cardeploy root push ROOT.json`) and every artifact's chunk index (push again)",
                    ),
                    (
                        422,
                        "the twin's root does not accept this release: check it with `cardeploy release verify ENVELOPE --root ROOT.json` against the roots the twin holds",
                    ),
                ],
            )
        })?;
    let digest = sha256_hex(&envelope.payload);
    if summary.digest != digest {
        bail!(
            "the twin registered the release as {}, but its digest is {digest}",
            summary.digest
        );
    }
    println!("{digest}");
    eprintln!(
        "release {}@{} is on the twin ({} artifacts); the line above is its digest. Next:\n  cardeploy car set-desired CAR --release {digest}",
        release.line,
        release.version,
        release.artifacts.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatible_is_read_from_the_update_section_only() {
        let manifest = "[update]\ncompatible = cardeploy-qemuarm64\nversion=1.0\n\n[image.rootfs]\ncompatible=other\n";
        assert_eq!(
            raucm_compatible(manifest).as_deref(),
            Some("cardeploy-qemuarm64")
        );
        assert_eq!(raucm_compatible("[bundle]\ncompatible=x\n"), None);
    }

    #[test]
    fn names_follow_the_manifest_rule() {
        assert!(check_name("ecu-main").is_ok());
        assert!(check_name("layer-0123456789abcdef").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "-x", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}

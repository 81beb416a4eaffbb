//! `cardeploy root`: the root document that names which keys sign for which role.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cardeploy_release::{
    Envelope, ROOT_TYPE, Role, Roles, Root, SigningKey, TrustedRoot, key_file, now_secs, sign,
};
use clap::Subcommand;

use crate::api::{Api, ApiArgs, with_hint};
use cardeploy_protocol::api::{DirectorView, RootAccepted};

use crate::files;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create root version 1, signed by the root keys given with --sign-with.
    ///
    /// Example (2-of-3 root, one release key, one director key):
    ///   cardeploy keys gen keys/root-1   (and root-2, root-3, release, director)
    ///   cardeploy root init --root-key keys/root-1.pub --root-key keys/root-2.pub \
    ///     --root-key keys/root-3.pub --threshold 2 --release-key keys/release.pub \
    ///     --director-key keys/director.pub --sign-with keys/root-1.key \
    ///     --sign-with keys/root-2.key --out root.json
    #[command(verbatim_doc_comment)]
    Init {
        #[command(flatten)]
        roles: RoleArgs,
        /// A private root key to sign with (repeat; at least THRESHOLD of them).
        #[arg(long = "sign-with", value_name = "KEY", required = true)]
        sign_with: Vec<PathBuf>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Make the next root version: new keys or thresholds, signed by the threshold of the
    /// current root's root keys and of the new ones (give every needed key with --sign-with).
    Rotate {
        /// The current root (what cars trust now).
        #[arg(long, value_name = "FILE")]
        current: PathBuf,
        #[command(flatten)]
        roles: RoleArgs,
        #[arg(long = "sign-with", value_name = "KEY", required = true)]
        sign_with: Vec<PathBuf>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Verify a root file (and, with --previous, that it rotates from that root).
    Verify {
        file: PathBuf,
        #[arg(long, value_name = "FILE")]
        previous: Option<PathBuf>,
    },
    /// Give roots to the twin, oldest first: root version 1, then each rotation
    ///
    /// The twin keeps the chain, verifies every step as a car will, and refuses a root that
    /// does not name its director key (it could not sign desired states under it).
    ///
    /// Example: cardeploy root push root-v1.json root-v2.json --twin http://twin:7080
    #[command(verbatim_doc_comment)]
    Push {
        /// Root envelopes written by `root init` / `root rotate`, oldest first.
        #[arg(value_name = "ROOT.json", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Allow cars to install an older version of a release line (e.g. back from a bad release):
    /// a downgrade override signed by the root keys, valid for --hours.
    ///
    /// Cars refuse a version below the one they run on the same line unless an override names
    /// exactly that line and version. Give it with the desired state:
    ///   cardeploy root allow-downgrade --line os --version 1.4.0 --sign-with keys/root.key \
    ///     --out allow-os-1.4.0.json
    ///   cardeploy car set-desired CAR --release os@1.4.0 --downgrade allow-os-1.4.0.json
    #[command(verbatim_doc_comment)]
    AllowDowngrade {
        /// The release line.
        #[arg(long)]
        line: String,
        /// The exact older version allowed.
        #[arg(long)]
        version: String,
        /// Hours until the override expires.
        #[arg(long, default_value_t = 24)]
        hours: u64,
        /// A private root key to sign with (repeat: the root role's threshold of them).
        #[arg(long = "sign-with", value_name = "KEY", required = true)]
        sign_with: Vec<PathBuf>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Fetch the twin's director public key into a .pub file, for `root init --director-key`.
    ///
    /// The director key is the twin's online key: it signs each car's desired state. The file
    /// has the format `keys gen` writes.
    ///
    /// The key comes over the operator API: on a network you do not trust, compare the key id
    /// printed here with the one on the twin's host before signing a root with it.
    Director {
        /// Where to write the public key, e.g. keys/director.pub.
        #[arg(long, value_name = "FILE.pub")]
        out: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct RoleArgs {
    /// A public key of the root role (repeat).
    #[arg(long = "root-key", value_name = "PUB", required = true)]
    root_keys: Vec<PathBuf>,
    /// How many root keys must sign a root.
    #[arg(long, default_value_t = 1)]
    threshold: usize,
    /// The release role's public key (the pipeline's offline key).
    #[arg(long = "release-key", value_name = "PUB", required = true)]
    release_keys: Vec<PathBuf>,
    /// The director role's public key (the twin's online key).
    #[arg(long = "director-key", value_name = "PUB", required = true)]
    director_keys: Vec<PathBuf>,
    /// Days until the root expires.
    #[arg(long, default_value_t = 365)]
    expires_days: u64,
}

fn build(version: u64, args: &RoleArgs) -> anyhow::Result<Root> {
    let mut keys = BTreeMap::new();
    let mut role = |paths: &[PathBuf], threshold: usize| -> anyhow::Result<Role> {
        let mut keyids = Vec::new();
        for p in paths {
            let key = key_file::read_public(p)?;
            keyids.push(key.id());
            keys.insert(key.id(), key);
        }
        Ok(Role { keyids, threshold })
    };
    let roles = Roles {
        root: role(&args.root_keys, args.threshold)?,
        release: role(&args.release_keys, 1)?,
        director: role(&args.director_keys, 1)?,
    };
    Ok(Root {
        version,
        expires: now_secs() + args.expires_days * 86_400,
        keys,
        roles,
    })
}

fn write_signed(root: &Root, signers: &[PathBuf], out: &Path) -> anyhow::Result<Vec<u8>> {
    let keys: Vec<SigningKey> = signers
        .iter()
        .map(|p| key_file::read_private(p))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&SigningKey> = keys.iter().collect();
    let bytes = sign(ROOT_TYPE, &serde_json::to_vec_pretty(root)?, &refs).to_json();
    files::write(out, &bytes)?;
    Ok(bytes)
}

fn describe(root: &TrustedRoot) {
    let r = root.root();
    println!(
        "root version {} valid; expires {} (unix); root {} of {}, release {} of {}, director {} of {}",
        r.version,
        r.expires,
        r.roles.root.threshold,
        r.roles.root.keyids.len(),
        r.roles.release.threshold,
        r.roles.release.keyids.len(),
        r.roles.director.threshold,
        r.roles.director.keyids.len()
    );
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init {
            roles,
            sign_with,
            out,
        } => {
            let root = build(1, &roles)?;
            let bytes = write_signed(&root, &sign_with, &out)?;
            // Read it back the way a car will before anyone ships it.
            let trusted = TrustedRoot::pinned(&bytes)
                .and_then(|t| t.fresh(now_secs()).cloned())
                .with_context(|| {
                    format!("the root written to {} does not verify", out.display())
                })?;
            describe(&trusted);
            Ok(())
        }
        Command::Rotate {
            current,
            roles,
            sign_with,
            out,
        } => {
            let trusted = TrustedRoot::pinned(&files::read(&current)?)?;
            let next = build(trusted.root().version + 1, &roles)?;
            let bytes = write_signed(&next, &sign_with, &out)?;
            let rotated = trusted
                .rotate(&bytes)
                .and_then(|r| r.fresh(now_secs()).cloned())
                .with_context(|| {
                format!(
                    "{} does not rotate from {}: sign with the threshold of the current root keys and of the new ones",
                    out.display(),
                    current.display()
                )
            });
            match rotated {
                Ok(r) => {
                    describe(&r);
                    Ok(())
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&out);
                    Err(e)
                }
            }
        }
        Command::Verify { file, previous } => {
            let bytes = files::read(&file)?;
            let trusted = match previous {
                Some(prev) => TrustedRoot::pinned(&files::read(&prev)?)?.rotate(&bytes)?,
                None => TrustedRoot::pinned(&bytes)?,
            };
            trusted.fresh(now_secs())?;
            let env = Envelope::from_json(&bytes)?;
            if env.signatures.is_empty() {
                bail!("{} carries no signatures", file.display());
            }
            describe(&trusted);
            Ok(())
        }
        Command::Push { files, api } => push(&files, &api),
        Command::Director { out, api } => director(&out, &api),
        Command::AllowDowngrade {
            line,
            version,
            hours,
            sign_with,
            out,
        } => {
            semver::Version::parse(&version)
                .with_context(|| format!("--version {version}: not a semantic version"))?;
            let doc = cardeploy_release::DowngradeOverride {
                line: line.clone(),
                version: version.clone(),
                expires: now_secs() + hours.saturating_mul(3600),
            };
            let keys: Vec<SigningKey> = sign_with
                .iter()
                .map(|p| key_file::read_private(p))
                .collect::<Result<_, _>>()?;
            let refs: Vec<&SigningKey> = keys.iter().collect();
            let envelope = sign(
                cardeploy_release::OVERRIDE_TYPE,
                &serde_json::to_vec_pretty(&doc)?,
                &refs,
            );
            files::write(&out, envelope.to_json())?;
            println!(
                "wrote {}: cars may install {line}@{version} below what they run, until {} (unix). Next:\n  cardeploy car set-desired CAR --release {line}@{version} --downgrade {}",
                out.display(),
                doc.expires,
                out.display()
            );
            Ok(())
        }
    }
}

/// Send each root to the twin in order; stop at the first it refuses.
fn push(files: &[PathBuf], args: &ApiArgs) -> anyhow::Result<()> {
    // Read and check the shape of every file before sending any, so a typo in the last name does
    // not leave the twin half-way through a chain.
    let mut roots = Vec::new();
    for file in files {
        let (bytes, _) = files::read_envelope(
            file,
            ROOT_TYPE,
            "root",
            "`cardeploy root init` writes roots",
        )?;
        let version = TrustedRoot::peek_version(&bytes)
            .with_context(|| format!("{} is not a root document", file.display()))?;
        let body: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        roots.push((file, version, body));
    }
    let api = Api::new(args)?;
    for (file, version, body) in roots {
        let answer: Result<RootAccepted, _> = api.post("pushing the root", "/api/v1/roots", &body);
        let answer = answer
            .with_context(|| format!("{} (version {version})", file.display()))
            .map_err(|e| {
                with_hint(
                    e,
                    &[
                        (
                            409,
                            "the root must name the twin's director key: fetch it with `cardeploy root director --out director.pub` and make a root with `--director-key director.pub`",
                        ),
                        (
                            422,
                            "roots must chain: push them oldest first, each one version above the twin's latest, and check each with `cardeploy root verify`",
                        ),
                    ],
                )
            })?;
        let accepted = answer.version;
        println!(
            "root version {accepted} accepted by the twin ({})",
            file.display()
        );
    }
    Ok(())
}

fn director(out: &std::path::Path, args: &ApiArgs) -> anyhow::Result<()> {
    let api = Api::new(args)?;
    let key: DirectorView = api.get("fetching the twin's director key", "/api/v1/director")?;
    let id = key.public.id();
    if id.as_str() != key.keyid {
        bail!(
            "the twin names its director key {} but the key it sent has id {id}: not writing it",
            key.keyid
        );
    }
    crate::keys::create_parent(out, 0o755)?;
    key_file::write_public(out, &key.public)?;
    println!("{id}");
    eprintln!(
        "wrote {}; the line above is the director key id. Name it in the root: \
         `cardeploy root init ... --director-key {}` (or `root rotate` for an existing root)",
        out.display(),
        out.display()
    );
    Ok(())
}

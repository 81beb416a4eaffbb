//! Signed metadata on the twin (docs/release-format.md, "Roles"): the director key that
//! signs every desired state, the chain of roots operators upload, and the check that a release
//! is signed by the release role of the current root.
//!
//! The twin holds the director key online, and only that one: it can say *which* release a car
//! should run and *when*, never *what* a release contains (the offline release key signed that).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use cardeploy_release::{
    CheckedRelease, DESIRED_TYPE, Desired, Envelope, PublicKey, SigningKey, TrustedRoot, sign,
    verify_release,
};

use crate::Error;

/// Why an operator's root or release was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "this twin has no root yet: create one with `cardeploy root init` (naming this twin's director key, `cardeploy root director`) and upload it with `cardeploy root push`"
    )]
    NoRoot,
    #[error(
        "the first root uploaded must be version 1 (cars pinned to it need every later version), not {0}"
    )]
    FirstRootVersion(u64),
    #[error(
        "root version {version} does not name this twin's director key {keyid} in its director role with threshold 1: cars would refuse every desired state this twin signs. Put {path} into the root (`cardeploy root init|rotate --director-key {path}`)"
    )]
    DirectorNotNamed {
        version: u64,
        keyid: String,
        path: PathBuf,
    },
    #[error(transparent)]
    Verify(#[from] cardeploy_release::Error),
}

struct Chain {
    trusted: Option<TrustedRoot>,
    /// Every root envelope, version 1 first: what a car pinned to an older root needs.
    envelopes: Vec<Envelope>,
}

pub(crate) struct Trust {
    director: SigningKey,
    director_pub: PathBuf,
    roots_dir: PathBuf,
    chain: RwLock<Chain>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Write `bytes` to `path` through a temp file, fsync and rename: never a torn file.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// The director key: made at first start, mode 0600, hex PKCS#8 like `cardeploy keys gen`
/// writes; its public half next to it as `director.pub` for `cardeploy root init --director`.
fn director_key(data_dir: &Path) -> Result<(SigningKey, PathBuf), Error> {
    let path = data_dir.join("director.key");
    let public = data_dir.join("director.pub");
    let key = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = unhex(&text).ok_or_else(|| Error::Config {
                path: path.clone(),
                why: "not a hex PKCS#8 key; restore it from backup (cars trust only this key through the root)".into(),
            })?;
            SigningKey::from_pkcs8(&bytes).map_err(|e| Error::Config {
                path: path.clone(),
                why: e.to_string(),
            })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate().map_err(|e| Error::Config {
                path: path.clone(),
                why: e.to_string(),
            })?;
            write_atomic(&path, format!("{}\n", hex(key.pkcs8())).as_bytes(), 0o600)?;
            tracing::info!(keyid = %key.public().id(), path = %path.display(), "director key created");
            key
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let json = serde_json::to_string_pretty(&key.public()).unwrap_or_default();
    if std::fs::read_to_string(&public).ok().as_deref() != Some(&format!("{json}\n")) {
        write_atomic(&public, format!("{json}\n").as_bytes(), 0o644)?;
    }
    Ok((key, public))
}

impl Trust {
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let (director, director_pub) = director_key(data_dir)?;
        let roots_dir = data_dir.join("roots");
        std::fs::create_dir_all(&roots_dir).map_err(io(&roots_dir))?;
        let mut chain = Chain {
            trusted: None,
            envelopes: Vec::new(),
        };
        // Roots are stored as `<version>.json` and were verified when uploaded; they are verified
        // again here so that a damaged file is found at start, not by a car.
        for version in 1.. {
            let path = roots_dir.join(format!("{version}.json"));
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(io(&path)(e)),
            };
            let bad = |e: cardeploy_release::Error| Error::Config {
                path: path.clone(),
                why: format!("stored root does not verify: {e}"),
            };
            let next = match &chain.trusted {
                None => TrustedRoot::pinned(&bytes).map_err(bad)?,
                Some(t) => t.rotate(&bytes).map_err(bad)?,
            };
            chain
                .envelopes
                .push(Envelope::from_json(&bytes).map_err(bad)?);
            chain.trusted = Some(next);
        }
        Ok(Self {
            director,
            director_pub,
            roots_dir,
            chain: RwLock::new(chain),
        })
    }

    fn chain(&self) -> std::sync::RwLockReadGuard<'_, Chain> {
        self.chain
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn director_public(&self) -> PublicKey {
        self.director.public()
    }

    /// Every root, version 1 first.
    pub fn roots(&self) -> Vec<Envelope> {
        self.chain().envelopes.clone()
    }

    /// Roots after version 1: what travels with each desired state, so that a car pinned to any
    /// older root can rotate step by step.
    pub fn rotations(&self) -> Vec<Envelope> {
        self.chain().envelopes.iter().skip(1).cloned().collect()
    }

    /// Take the next root: version 1 if there is none, else a rotation of the current one
    /// (R1–R6), fresh, and naming this twin's director key.
    pub fn add_root(&self, bytes: &[u8], now: u64) -> Result<u64, TrustError> {
        let mut chain = self
            .chain
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Pushing a chain again (`cardeploy root push root-1.json root-2.json` after a rotation)
        // is not an error: a root already held is simply acknowledged.
        let envelope = Envelope::from_json(bytes)?;
        if let Some(i) = chain.envelopes.iter().position(|e| *e == envelope) {
            return Ok(i as u64 + 1);
        }
        let next = match &chain.trusted {
            None => {
                let root = TrustedRoot::pinned(bytes)?;
                if root.root().version != 1 {
                    return Err(TrustError::FirstRootVersion(root.root().version));
                }
                root
            }
            Some(t) => t.rotate(bytes)?,
        };
        next.fresh(now)?;
        let keyid = self.director.public().id();
        let director = &next.root().roles.director;
        // The twin signs alone: its key must be in the role and one signature must suffice.
        if !director.keyids.contains(&keyid) || director.threshold != 1 {
            return Err(TrustError::DirectorNotNamed {
                version: next.root().version,
                keyid: keyid.to_string(),
                path: self.director_pub.clone(),
            });
        }
        let version = next.root().version;
        let path = self.roots_dir.join(format!("{version}.json"));
        write_atomic(&path, bytes, 0o644).map_err(|e| {
            TrustError::Verify(cardeploy_release::Error::Malformed(format!(
                "could not store the root: {e}"
            )))
        })?;
        chain.envelopes.push(envelope);
        chain.trusted = Some(next);
        tracing::info!(version, "root accepted");
        Ok(version)
    }

    /// M1–M3, M6 under the current root.
    pub fn verify_release(
        &self,
        envelope: &Envelope,
        now: u64,
        max_artifact_bytes: u64,
    ) -> Result<CheckedRelease, TrustError> {
        let chain = self.chain();
        let root = chain.trusted.as_ref().ok_or(TrustError::NoRoot)?;
        Ok(verify_release(root, envelope, now, max_artifact_bytes)?)
    }

    /// The counter scope of the root in force (D4a), if there is one.
    pub fn counter_scope(&self) -> Option<String> {
        self.chain()
            .trusted
            .as_ref()
            .map(TrustedRoot::counter_scope)
    }

    /// Sign a desired state with the director key.
    pub fn sign_desired(&self, desired: &Desired) -> Envelope {
        // Plain struct of strings and numbers: serialising cannot fail.
        let payload = serde_json::to_vec(desired).unwrap_or_default();
        sign(DESIRED_TYPE, &payload, &[&self.director])
    }
}

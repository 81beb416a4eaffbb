//! Signed metadata on the twin (docs/release-format.md, "Roles"): the director key that
//! signs every desired state, the chain of roots operators upload, and the check that a release
//! is signed by the release role of the current root.
//!
//! The twin holds the director key online, and only that one: it can say *which* release a car
//! should run and *when*, never *what* a release contains (the offline release key signed that).

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use cardeploy_release::{
    CheckedRelease, DESIRED_TYPE, Desired, Envelope, PublicKey, SigningKey, TrustedRoot, key_file,
    sign, verify_release,
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
    /// The root verified, but the twin could not keep it: its fault, not the operator's.
    #[error("could not store the root: {0}")]
    Store(crate::Error),
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

/// The director key: made at first start, mode 0600, hex PKCS#8 like `cardeploy keys gen`
/// writes; its public half next to it as `director.pub` for `cardeploy root init --director`.
fn director_key(data_dir: &Path) -> Result<(SigningKey, PathBuf), Error> {
    let path = data_dir.join("director.key");
    let public = data_dir.join("director.pub");
    let config = |path: &Path, e: cardeploy_release::Error| Error::Config {
        path: path.to_owned(),
        why: e.to_string(),
    };
    let key = match key_file::read_private(&path) {
        Ok(key) => key,
        Err(cardeploy_release::Error::KeyFileRead { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            let key = SigningKey::generate().map_err(|e| config(&path, e))?;
            key_file::write_private(&path, &key).map_err(|e| config(&path, e))?;
            tracing::info!(keyid = %key.public().id(), path = %path.display(), "director key created");
            key
        }
        Err(cardeploy_release::Error::KeyFileRead { source, .. }) => {
            return Err(io(&path)(source));
        }
        Err(e) => {
            return Err(Error::Config {
                path: path.clone(),
                why: format!(
                    "{e}; restore it from backup (cars trust only this key through the root)"
                ),
            });
        }
    };
    let text = key_file::encode_public(&key.public());
    if std::fs::read_to_string(&public).ok().as_deref() != Some(&text) {
        key_file::write_public(&public, &key.public()).map_err(|e| config(&public, e))?;
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
        cardeploy_chunks::atomic::write(&path, bytes, cardeploy_chunks::atomic::PUBLIC)
            .map_err(|e| TrustError::Store(e.into()))?;
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
    pub fn sign_desired(&self, desired: &Desired) -> Result<Envelope, Error> {
        let payload =
            serde_json::to_vec(desired).map_err(crate::error::encode("a desired state"))?;
        Ok(sign(DESIRED_TYPE, &payload, &[&self.director]))
    }
}

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
use crate::db::Db;

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
    #[error(
        "another twin instance took a different root version {version} at the same moment; list the chain (`GET /api/v1/roots`) and push the next version again"
    )]
    Raced { version: u64 },
}

struct Chain {
    trusted: Option<TrustedRoot>,
    /// Every root envelope, version 1 first: what a car pinned to an older root needs.
    envelopes: Vec<Envelope>,
}

impl Chain {
    /// The chain of `roots` (version 1 first), each verified against the one before: a damaged
    /// record is found when the twin starts or reloads, not by a car.
    fn verified(roots: &[(u64, String)]) -> Result<Self, String> {
        let mut chain = Self {
            trusted: None,
            envelopes: Vec::new(),
        };
        for (i, (version, text)) in roots.iter().enumerate() {
            if *version != i as u64 + 1 {
                return Err(format!("root version {} is missing", i + 1));
            }
            let bad =
                |e: cardeploy_release::Error| format!("stored root {version} does not verify: {e}");
            let next = match &chain.trusted {
                None => TrustedRoot::pinned(text.as_bytes()).map_err(bad)?,
                Some(t) => t.rotate(text.as_bytes()).map_err(bad)?,
            };
            chain
                .envelopes
                .push(Envelope::from_json(text.as_bytes()).map_err(bad)?);
            chain.trusted = Some(next);
        }
        Ok(chain)
    }
}

/// The root chain lives in the database (every instance reads the same one); the director key
/// in each instance's data directory (copied to every instance).
pub(crate) struct Trust {
    director: SigningKey,
    director_pub: PathBuf,
    /// Where twins before the chain moved into the database kept it (imported once).
    legacy_roots: PathBuf,
    chain: RwLock<Chain>,
    /// One root upload at a time on this instance (across instances the database decides).
    adding: tokio::sync::Mutex<()>,
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
    /// The director key; the chain is empty until [`Trust::load`].
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let (director, director_pub) = director_key(data_dir)?;
        Ok(Self {
            director,
            director_pub,
            legacy_roots: data_dir.join("roots"),
            chain: RwLock::new(Chain {
                trusted: None,
                envelopes: Vec::new(),
            }),
            adding: tokio::sync::Mutex::new(()),
        })
    }

    /// Read the chain from the database (at start, and when another instance added a root).
    /// A database without roots takes those a twin of an earlier version kept in
    /// `data_dir/roots/<version>.json`.
    pub async fn load(&self, db: &Db) -> Result<(), Error> {
        let mut stored = db.roots().await?;
        if stored.is_empty() {
            for version in 1.. {
                let path = self.legacy_roots.join(format!("{version}.json"));
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => return Err(io(&path)(e)),
                };
                db.insert_root(version, &text).await?;
                tracing::info!(version, path = %path.display(), "root moved into the database");
            }
            stored = db.roots().await?;
        }
        let chain = Chain::verified(&stored).map_err(|why| Error::Config {
            path: self.legacy_roots.clone(),
            why: format!("the root chain in the database: {why}"),
        })?;
        *self
            .chain
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = chain;
        Ok(())
    }

    /// Whether the root in force names this instance's director key (true without a root).
    pub fn names_director(&self) -> bool {
        self.chain().trusted.as_ref().is_none_or(|t| {
            t.root()
                .roles
                .director
                .keyids
                .contains(&self.director.public().id())
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
    /// (R1–R6), fresh, and naming this twin's director key. Stored in the database, durably,
    /// before it counts; every instance hears of it.
    pub async fn add_root(&self, db: &Db, bytes: &[u8], now: u64) -> Result<u64, TrustError> {
        let _one = self.adding.lock().await;
        let envelope = Envelope::from_json(bytes)?;
        let (version, next) = {
            let chain = self.chain();
            // Pushing a chain again (`cardeploy root push root-1.json root-2.json` after a
            // rotation) is not an error: a root already held is simply acknowledged.
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
            (next.root().version, next)
        };
        next.fresh(now)?;
        let keyid = self.director.public().id();
        let director = &next.root().roles.director;
        // The twin signs alone: its key must be in the role and one signature must suffice.
        if !director.keyids.contains(&keyid) || director.threshold != 1 {
            return Err(TrustError::DirectorNotNamed {
                version,
                keyid: keyid.to_string(),
                path: self.director_pub.clone(),
            });
        }
        // JSON that parsed is UTF-8.
        let text = String::from_utf8_lossy(bytes);
        if !db
            .insert_root(version, &text)
            .await
            .map_err(TrustError::Store)?
        {
            // Another instance stored this version first: take the chain as it is now.
            self.load(db).await.map_err(TrustError::Store)?;
            return match self.chain().envelopes.get(version as usize - 1) {
                Some(held) if *held == envelope => Ok(version),
                _ => Err(TrustError::Raced { version }),
            };
        }
        let mut chain = self
            .chain
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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

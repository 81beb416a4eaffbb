//! Every blob is hashed before it is first served: a file damaged on the car's disk after the
//! agent assembled it (a bad sector, a stray write) is refused rather than handed to containerd,
//! which would only find out after pulling it whole. A blob is hashed once while its file stays
//! the same (length and modification time); concurrent first requests wait for one hash.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use cardeploy_chunks::{Digest, Sha256};

/// What a verified file looked like when it was hashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// Why a blob is not served.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The file hashes to something else or has another size: damaged on disk.
    Damaged { path: PathBuf, why: String },
    /// The file cannot be read.
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Slot = Arc<tokio::sync::Mutex<Option<Stamp>>>;

#[derive(Default)]
pub(crate) struct Verifier {
    slots: Mutex<HashMap<Digest, Slot>>,
    damaged: Mutex<BTreeSet<Digest>>,
    /// Signalled when a blob is found damaged (a permit is kept if nobody waits yet).
    found: tokio::sync::Notify,
}

impl Verifier {
    /// Ok when the file at `path` is `size` bytes hashing to `digest` (hashed now, or earlier
    /// while the file was as it is now).
    pub async fn check(&self, digest: Digest, path: &Path, size: u64) -> Result<(), Refused> {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(digest)
            .or_default()
            .clone();
        let mut known = slot.lock().await;
        let now = stamp(path).map_err(|source| Refused::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        if *known == Some(now) {
            return Ok(());
        }
        *known = None;
        if now.len != size {
            return Err(self.damaged(digest, path, format!("{} bytes, {size} expected", now.len)));
        }
        let owned = path.to_owned();
        let actual = tokio::task::spawn_blocking(move || hash_file(&owned))
            .await
            .map_err(|e| Refused::Unreadable {
                path: path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| Refused::Unreadable {
                path: path.to_owned(),
                source,
            })?;
        if actual != digest {
            return Err(self.damaged(digest, path, format!("hashes to sha256:{actual}")));
        }
        *known = Some(now);
        self.damaged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&digest);
        Ok(())
    }

    fn damaged(&self, digest: Digest, path: &Path, why: String) -> Refused {
        tracing::error!(%digest, path = %path.display(), %why, "blob damaged on disk: not served");
        self.damaged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(digest);
        self.found.notify_one();
        Refused::Damaged {
            path: path.to_owned(),
            why,
        }
    }

    /// Blobs found damaged since the last call.
    pub fn take_damaged(&self) -> BTreeSet<Digest> {
        std::mem::take(&mut *self.damaged.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits until some blob is found damaged; those found since the last call.
    pub async fn next_damaged(&self) -> BTreeSet<Digest> {
        loop {
            let taken = self.take_damaged();
            if !taken.is_empty() {
                return taken;
            }
            self.found.notified().await;
        }
    }

    /// Forgets every blob not in `keep` (after the catalog changed).
    pub fn retain(&self, keep: &BTreeSet<Digest>) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|d, _| keep.contains(d));
    }
}

fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

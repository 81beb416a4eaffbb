//! What the car checks before it acts on a desired state (docs/release-format.md): the root
//! chain from the root pinned at installation (R1–R6), the release (M1–M6) and the desired state
//! (D1–D6). The agent compiles `cardeploy-release` without its `sign` feature: it can verify,
//! never sign.

use std::path::{Path, PathBuf};

use cardeploy_protocol::DesiredState;
use cardeploy_release::{
    CarContext, CheckedRelease, Desired, Error as Refused, TrustedRoot, check_desired,
    check_release,
};

use crate::Error;
use crate::error::io;

/// A desired state that passed every check, and the release it names.
#[derive(Debug)]
pub struct Accepted {
    pub release: CheckedRelease,
    pub desired: Desired,
}

/// Check `message` for this car under `root`, first taking the root rotations it carries
/// (R5–R6). Pure: returns the root to trust afterwards and what was accepted, so that a caller
/// persists the new roots before using them.
pub fn check(
    root: &TrustedRoot,
    message: &DesiredState,
    car: &CarContext,
) -> Result<(TrustedRoot, Vec<Vec<u8>>, Accepted), Refused> {
    let mut trusted = root.clone();
    let mut new_roots = Vec::new();
    // Roots the car already has are skipped; the rest must follow one by one.
    for envelope in &message.roots {
        let bytes = envelope.to_json();
        if TrustedRoot::peek_version(&bytes)? <= trusted.root().version {
            continue;
        }
        trusted = trusted.rotate(&bytes)?;
        new_roots.push(bytes);
    }
    let release = check_release(&trusted, &message.release, car, message.downgrade.as_ref())?;
    let desired = check_desired(&trusted, &message.desired, car, &release)?;
    Ok((trusted, new_roots, Accepted { release, desired }))
}

/// The roots the agent trusts: the one pinned at installation (the image carries it, config
/// `root`) and the rotations it accepted since, kept as `<state>/roots/<version>.json`. The chain
/// is verified again at every start, so a damaged or planted file is found, not trusted.
#[derive(Debug)]
pub struct Roots {
    dir: PathBuf,
}

impl Roots {
    pub fn new(state_dir: &Path) -> Result<Self, Error> {
        let dir = state_dir.join("roots");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self { dir })
    }

    /// The pinned root and every stored rotation after it, verified step by step. A stored root
    /// that does not verify ends the chain there (with a warning): the car falls back to the
    /// last good root and the twin sends the rest again.
    pub fn load(&self, pinned: &Path) -> Result<TrustedRoot, Error> {
        let bytes = std::fs::read(pinned).map_err(io(pinned))?;
        let mut trusted = TrustedRoot::pinned(&bytes).map_err(|e| Error::Config {
            path: pinned.to_owned(),
            why: format!("the pinned root does not verify: {e}"),
        })?;
        loop {
            let path = self
                .dir
                .join(format!("{}.json", trusted.root().version + 1));
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(io(&path)(e)),
            };
            match trusted.rotate(&bytes) {
                Ok(next) => trusted = next,
                Err(e) => {
                    tracing::warn!(path = %path.display(), "stored root ignored: {e}");
                    break;
                }
            }
        }
        Ok(trusted)
    }

    /// Keep accepted rotations, each written atomically, in version order.
    pub fn store(&self, roots: &[Vec<u8>]) -> Result<(), Error> {
        for bytes in roots {
            let version = TrustedRoot::peek_version(bytes).map_err(|e| Error::Config {
                path: self.dir.clone(),
                why: e.to_string(),
            })?;
            let path = self.dir.join(format!("{version}.json"));
            cardeploy_chunks::atomic::write(&path, bytes, cardeploy_chunks::atomic::PUBLIC)?;
        }
        Ok(())
    }
}

//! Reading and writing the CLI's files with the path in every error. Everything the CLI writes
//! goes through the workspace's one atomic write (`cardeploy_chunks::atomic`): a signed envelope,
//! a root or a key is never half written, and survives a power cut once the command returned.

use std::path::Path;

use anyhow::{Context, bail};
use cardeploy_chunks::atomic;
use cardeploy_release::Envelope;

pub fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

pub fn read_to_string(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// A signed envelope of `payload_type` and its bytes as read. `what` names the kind for people
/// (`root`, `release`), `made_by` which command writes such files, for the error when `path`
/// holds another kind.
pub fn read_envelope(
    path: &Path,
    payload_type: &str,
    what: &str,
    made_by: &str,
) -> anyhow::Result<(Vec<u8>, Envelope)> {
    let bytes = read(path)?;
    let envelope = Envelope::from_json(&bytes)
        .with_context(|| format!("{} is not a signed {what}", path.display()))?;
    if envelope.payload_type != payload_type {
        bail!(
            "{} is a {}, not a {what} ({made_by})",
            path.display(),
            envelope.payload_type
        );
    }
    Ok((bytes, envelope))
}

/// Write a file anyone may read (mode 0644).
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> anyhow::Result<()> {
    Ok(atomic::write(path, bytes.as_ref(), atomic::PUBLIC)?)
}

/// Write a secret (mode 0600 from its creation on).
pub fn write_private(path: &Path, bytes: impl AsRef<[u8]>) -> anyhow::Result<()> {
    Ok(atomic::write(path, bytes.as_ref(), atomic::PRIVATE)?)
}

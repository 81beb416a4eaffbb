//! Room on the disk that holds the artifacts: a fetch that finds the disk full stops with how
//! much it needs, and goes on by itself once that much is free (docs/state-machines.md).

use std::path::Path;
use std::time::Duration;

use super::Fetcher;
use crate::Error;

impl Fetcher {
    /// Wait until the artifacts' disk has `needed` bytes free, checking every `every`.
    pub async fn room_for(&self, needed: u64, every: Duration) {
        loop {
            let dir = self.artifacts.clone();
            let free = tokio::task::spawn_blocking(move || free_bytes(&dir))
                .await
                .unwrap_or(0);
            if free >= needed {
                return;
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Bytes free for an unprivileged writer on the file system holding `dir` (0 when unknown).
pub(super) fn free_bytes(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map_or(0, |s| {
        s.blocks_available().saturating_mul(s.fragment_size())
    })
}

/// Whether `e` is, at its root, a write that found no space left on the device.
pub(super) fn disk_full(e: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(nix::libc::ENOSPC)
        {
            return true;
        }
        source = err.source();
    }
    false
}

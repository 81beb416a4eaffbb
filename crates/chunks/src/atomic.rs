//! Atomic file writes: the one implementation of "temp file with a unique name, write, fsync,
//! rename, fsync of the directory" for every crate outside the agent (the CLI's envelopes and
//! keys, the twin's director key and delta cache, this crate's chunk store).
//!
//! It lives here because this is the lowest crate of the workspace that does file I/O and every
//! writer already depends on it (the twin, the CLI, the testkit, the agent); only the release
//! crate's `sign` feature (which writes key files) gains an edge to it. A reader sees the old
//! file or the new one, never a torn one; after [`write()`] returns, a power cut keeps the new one.
//!
//! Callers that write many files into few directories (the chunk store) use the two halves,
//! [`Staged::new_in`] and [`Staged::rename_to`], and fsync each directory once with [`sync_dir`].

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// Mode of files anyone may read (certificates, public keys, envelopes).
pub const PUBLIC: u32 = 0o644;
/// Mode of secrets (private keys, tokens): never readable by others, not even while written.
pub const PRIVATE: u32 = 0o600;

/// Write `bytes` to `path` atomically and durably, creating the file with `mode` (the umask
/// applies). The directory of `path` must exist.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = parent(path);
    Staged::new_in(dir, bytes, mode)?.rename_to(path)?;
    sync_dir(dir)
}

/// fsync a directory, so that the renames and creations in it survive a power cut.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("cannot sync directory", dir))
}

/// The directory a relative file name like `root.json` lives in: `.`, not the empty path.
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// A complete, fsynced temp file waiting to be renamed into place. Dropped without
/// [`Staged::rename_to`], it removes itself.
#[derive(Debug)]
pub struct Staged {
    tmp: Option<PathBuf>,
}

/// Temp names are unique within a process by this counter, and across processes by the pid; a
/// leading dot keeps them out of the listings that look for real entries.
static SEQ: AtomicU64 = AtomicU64::new(0);

impl Staged {
    /// Write and fsync `bytes` to a new temp file in `dir`, which must be on the same file
    /// system as the final path (the rename is atomic only there).
    pub fn new_in(dir: &Path, bytes: &[u8], mode: u32) -> Result<Self> {
        // create_new: a leftover of a crashed process that had the same pid is never reused
        // with its old mode or content; the next number is tried instead.
        let (tmp, mut file) = loop {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{}.{n}.tmp", std::process::id()));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(file) => break (tmp, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("cannot create", &tmp)(e)),
            }
        };
        let staged = Self {
            tmp: Some(tmp.clone()),
        };
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(Error::io("cannot write", &tmp))?;
        Ok(staged)
    }

    /// Rename the temp file to `path`, replacing what is there. Durable only once the
    /// directory of `path` is synced ([`sync_dir`]).
    pub fn rename_to(mut self, path: &Path) -> Result<()> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("cannot rename into", path)(e));
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.json");
        write(&path, b"old", PUBLIC).unwrap();
        write(&path, b"new", PUBLIC).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["root.json"]);
    }

    #[test]
    fn a_private_file_is_created_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("release.key");
        write(&path, b"secret", PRIVATE).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_staged_file_dropped_before_its_rename_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Staged::new_in(dir.path(), b"half", PUBLIC).unwrap();
        assert_eq!(
            names(dir.path()).len(),
            1,
            "the temp file exists while staged"
        );
        drop(staged);
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_rename_removes_the_temp_file_and_names_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("missing-dir").join("file");
        let err = Staged::new_in(dir.path(), b"x", PUBLIC)
            .unwrap()
            .rename_to(&target)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Io { path, .. } if path == &target),
            "{err}"
        );
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn a_relative_name_is_written_in_the_current_directory() {
        assert_eq!(parent(Path::new("root.json")), Path::new("."));
        assert_eq!(parent(Path::new("keys/a.key")), Path::new("keys"));
    }
}

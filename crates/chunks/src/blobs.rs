//! Where a [`Store`](crate::Store) keeps its objects: named byte strings with a time, whole or
//! not at all. [`FsBlobs`] keeps them as files (the car, and the twin by default); the twin has an
//! S3-compatible implementation too, so that several twin instances share one chunk store.
//!
//! Keys are relative, `/`-separated and made by the store (`chunks/ab/<hex>`, `indexes/<hex>`,
//! `keep/<name>`); they never hold `..` or start with `/`.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::{Error, Result, atomic};

/// One object found by [`Blobs::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub modified: SystemTime,
    pub size: u64,
}

/// Objects by key. Every call may block (files, or the network): async callers use
/// `spawn_blocking`.
pub trait Blobs: Send + Sync + std::fmt::Debug {
    /// The object's bytes; `None` when there is none.
    fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>>;
    /// Up to `max` bytes of the object from `offset` (none past its end), and the object's whole
    /// size; `None` when there is none.
    fn get_range(&self, key: &str, offset: u64, max: u64) -> io::Result<Option<(Vec<u8>, u64)>>;
    /// Store `bytes` under `key`, replacing what was there: a reader sees the old object or the
    /// new one, never part of one. `durable`: it survives a crash once this returns; otherwise
    /// only after the next [`Blobs::sync`].
    fn put(&self, key: &str, bytes: &[u8], durable: bool) -> io::Result<()>;
    /// The object's time (when it was stored or last touched) and size; `None` when there is
    /// none.
    fn stat(&self, key: &str) -> io::Result<Option<Listed>>;
    /// Set the object's time to now, durably; false when there is none.
    fn touch(&self, key: &str) -> io::Result<bool>;
    /// `bytes` under `key`, durably, with its time now: a content-addressed object stored
    /// already is only touched (files: no second write). A store whose touch rewrites the object
    /// anyway writes `bytes` instead of reading them back first.
    fn put_fresh(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        if !self.touch(key).unwrap_or(false) {
            self.put(key, bytes, true)?;
        }
        Ok(())
    }
    /// Remove the object; nothing happens when there is none.
    fn delete(&self, key: &str) -> io::Result<()>;
    /// Every object whose key starts with `prefix` (`"chunks/"`), in no particular order.
    fn list(&self, prefix: &str) -> io::Result<Vec<Listed>>;
    /// Make every put since the last sync durable.
    fn sync(&self) -> io::Result<()>;
    /// Where the objects are, for messages: a directory, or `s3://bucket/prefix`.
    fn location(&self) -> String;
}

/// Objects as files under a directory, written atomically (a temp file in `tmp/`, fsync,
/// rename). [`Blobs::sync`] makes the renames durable with one directory fsync per touched
/// directory, so a window of chunks costs a handful of fsyncs, not one per chunk; a durable put
/// fsyncs the directories of its own rename itself (with a shared set of dirty directories, one
/// writer's sync could find its directory taken by a concurrent sync still in progress and return
/// before the rename was durable).
#[derive(Debug)]
pub struct FsBlobs {
    root: PathBuf,
    dirty: Mutex<BTreeSet<PathBuf>>,
}

impl FsBlobs {
    /// Objects under `root`, created if missing; leftovers of writes a crash interrupted (in
    /// `tmp/`, never renamed) are removed.
    pub fn open(root: &Path) -> Result<Self> {
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp).map_err(Error::io("cannot create", &tmp))?;
        for entry in fs::read_dir(&tmp).map_err(Error::io("cannot list", &tmp))? {
            let path = entry.map_err(Error::io("cannot list", &tmp))?.path();
            let _ = fs::remove_file(&path);
        }
        Ok(Self {
            root: root.to_owned(),
            dirty: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        let bad = key.is_empty()
            || key.starts_with('/')
            || key.split('/').any(|part| part.is_empty() || part == "..");
        if bad {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a store key: {key:?}"),
            ));
        }
        Ok(self.root.join(key))
    }

    fn list_into(&self, dir: &Path, out: &mut Vec<Listed>) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            // Gone since the listing (a concurrent gc): skip it.
            let Ok(meta) = entry.metadata() else { continue };
            let path = entry.path();
            if meta.is_dir() {
                self.list_into(&path, out)?;
            } else if let Ok(relative) = path.strip_prefix(&self.root) {
                let key = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push(Listed {
                    key,
                    modified: meta.modified()?,
                    size: meta.len(),
                });
            }
        }
        Ok(())
    }
}

fn not_found_is<T>(result: io::Result<T>, none: T) -> io::Result<T> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(none),
        other => other,
    }
}

impl Blobs for FsBlobs {
    fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        not_found_is(fs::read(self.path(key)?).map(Some), None)
    }

    fn get_range(&self, key: &str, offset: u64, max: u64) -> io::Result<Option<(Vec<u8>, u64)>> {
        use std::io::{Read, Seek};
        let mut file = match File::open(self.path(key)?) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let mut bytes =
            Vec::with_capacity(usize::try_from(max.min(len.saturating_sub(offset))).unwrap_or(0));
        if offset < len {
            file.seek(io::SeekFrom::Start(offset))?;
            file.take(max).read_to_end(&mut bytes)?;
        }
        Ok(Some((bytes, len)))
    }

    fn put(&self, key: &str, bytes: &[u8], durable: bool) -> io::Result<()> {
        let path = self.path(key)?;
        let staged = atomic::Staged::new_in(&self.root.join("tmp"), bytes, atomic::PUBLIC)
            .map_err(into_io)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&dir)?;
        staged.rename_to(&path).map_err(into_io)?;
        if durable {
            // The rename's directory, and each directory above it up to the root: a chunk's
            // `chunks/<2 hex>/` may itself be new.
            for dir in path.ancestors().skip(1) {
                atomic::sync_dir(dir).map_err(into_io)?;
                if dir == self.root {
                    break;
                }
            }
        } else {
            self.dirty
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(dir);
        }
        Ok(())
    }

    fn stat(&self, key: &str) -> io::Result<Option<Listed>> {
        let meta = fs::metadata(self.path(key)?).and_then(|m| {
            Ok(Some(Listed {
                key: key.to_owned(),
                modified: m.modified()?,
                size: m.len(),
            }))
        });
        not_found_is(meta, None)
    }

    fn touch(&self, key: &str) -> io::Result<bool> {
        let touched = File::options()
            .write(true)
            .open(self.path(key)?)
            .and_then(|f| {
                f.set_modified(SystemTime::now())
                    .and_then(|()| f.sync_all())
            });
        not_found_is(touched.map(|()| true), false)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        not_found_is(fs::remove_file(self.path(key)?), ())
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<Listed>> {
        // Prefixes the store uses are directories; a partial name lists its directory and
        // filters.
        let (dir, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = if dir.is_empty() {
            self.root.clone()
        } else {
            self.path(dir)?
        };
        let mut out = Vec::new();
        self.list_into(&start, &mut out)?;
        out.retain(|l| l.key.starts_with(prefix) && !l.key.starts_with("tmp/"));
        Ok(out)
    }

    fn sync(&self) -> io::Result<()> {
        let dirs = std::mem::take(
            &mut *self
                .dirty
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for dir in dirs {
            atomic::sync_dir(&dir).map_err(into_io)?;
        }
        Ok(())
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

/// The crate's I/O errors back into `io::Error` (the trait speaks io).
fn into_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

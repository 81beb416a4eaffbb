use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::{ChunkIndex, Digest, Error, Result, atomic};

/// zstd level for chunks the store compresses itself (those that arrived as deltas). Chunks that
/// arrive compressed are kept exactly as they arrived.
const STORE_LEVEL: i32 = 3;
/// No chunk is larger than FastCDC's maximum; decompression stops there whatever a frame claims.
const MAX_CHUNK: usize = fastcdc::v2020::MAXIMUM_MAX;

/// Chunks on disk, zstd-compressed, one file per chunk:
///
/// ```text
/// <root>/chunks/<2 hex>/<64 hex>   a zstd frame
/// <root>/indexes/<64 hex>          a chunk index (its encoding)
/// <root>/keep/<name>               the id of an index that pins its chunks against gc
/// <root>/tmp/                      writes in progress (emptied on open)
/// <root>/corrupt/                  chunks that failed verification, moved aside for inspection
/// ```
///
/// Writes are atomic (temp file, fsync, rename); [`Store::sync`] makes the renames durable (one
/// directory fsync per touched directory, so a window of chunks costs a handful of fsyncs, not
/// one per chunk). A crash loses at most the chunks renamed since the last sync, never corrupts
/// one: every read decompresses and checks the sha256 against the name. A server that
/// acknowledges each upload uses [`Store::put_compressed_durable`] and
/// [`Store::put_index_durable`] instead, which are durable on return by themselves.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    dirty: Mutex<BTreeSet<PathBuf>>,
}

/// What [`Store::gc`] or [`Store::stats`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub chunks: u64,
    pub bytes_on_disk: u64,
}

impl Store {
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["chunks", "indexes", "keep", "tmp", "corrupt"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(Error::io("cannot create", &dir))?;
        }
        // Leftovers of writes a crash interrupted: never renamed, so never part of the store.
        let tmp = root.join("tmp");
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

    fn chunk_path(&self, id: &Digest) -> PathBuf {
        let hex = id.hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    pub fn has(&self, id: &Digest) -> bool {
        self.chunk_path(id).is_file()
    }

    /// Store raw chunk bytes after checking they are the chunk `id`.
    pub fn put_raw(&self, id: &Digest, data: &[u8]) -> Result<()> {
        verify(id, data)?;
        if self.has(id) {
            return Ok(());
        }
        let z = zstd::bulk::compress(data, STORE_LEVEL).map_err(Error::Zstd)?;
        self.write_atomic(&self.chunk_path(id), &z)
    }

    /// Store a zstd frame as it arrived, after decompressing it and checking it is the chunk
    /// `id`. Returns the raw bytes (callers usually need them next).
    pub fn put_compressed(&self, id: &Digest, frame: &[u8]) -> Result<Vec<u8>> {
        let data = decompress(frame).map_err(|e| match e {
            Error::Zstd(io) => Error::TransitMalformed(format!("chunk {id}: {io}")),
            other => other,
        })?;
        verify(id, &data)?;
        if !self.has(id) {
            self.write_atomic(&self.chunk_path(id), frame)?;
        }
        Ok(data)
    }

    /// [`Store::put_compressed`], durable when it returns. This call fsyncs the directories of
    /// the chunk's own rename itself (also when another writer renamed it first and has not
    /// synced yet) instead of going through the shared set [`Store::sync`] takes: with that set,
    /// one caller's sync could find its directory taken by a concurrent sync still in progress
    /// and return before the rename was durable. A chunk stored already gets its time
    /// refreshed, because the caller relies on it from now on ([`Store::gc_older_than`]).
    pub fn put_compressed_durable(&self, id: &Digest, frame: &[u8]) -> Result<Vec<u8>> {
        let data = decompress(frame).map_err(|e| match e {
            Error::Zstd(io) => Error::TransitMalformed(format!("chunk {id}: {io}")),
            other => other,
        })?;
        verify(id, &data)?;
        let path = self.chunk_path(id);
        if !(self.has(id) && touch(&path).is_ok()) {
            self.write_atomic(&path, frame)?;
        }
        self.sync_parents(&path, 2)?;
        Ok(data)
    }

    /// Whether chunk `id` is stored. If it is, and a [`Store::gc_older_than`] with `grace`
    /// would find it older than half of that, its time is refreshed: whoever asked is told the
    /// store has it and will name it in an index soon, so it must outlive the next gc.
    pub fn hold(&self, id: &Digest, grace: Duration) -> Result<bool> {
        let path = self.chunk_path(id);
        let modified = match fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io("cannot read", &path)(e)),
        };
        if age(modified) >= grace / 2 {
            match touch(&path) {
                Ok(()) => {}
                // Collected in between: the caller uploads it again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(Error::io("cannot refresh", &path)(e)),
            }
        }
        Ok(true)
    }

    /// fsync the directory holding `path` and `levels - 1` directories above it (a chunk's
    /// `chunks/<2 hex>/` may itself be new).
    fn sync_parents(&self, path: &Path, levels: usize) -> Result<()> {
        for dir in path.ancestors().skip(1).take(levels) {
            atomic::sync_dir(dir)?;
        }
        Ok(())
    }

    /// The raw bytes of chunk `id`, verified. A chunk that fails verification is moved to
    /// `corrupt/` so the next plan fetches it again.
    pub fn get(&self, id: &Digest) -> Result<Vec<u8>> {
        Ok(self.get_both(id)?.1)
    }

    /// The stored zstd frame of chunk `id` and its raw bytes, verified.
    pub fn get_both(&self, id: &Digest) -> Result<(Vec<u8>, Vec<u8>)> {
        let path = self.chunk_path(id);
        let frame = match fs::read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::ChunkMissing(*id));
            }
            Err(e) => return Err(Error::io("cannot read", &path)(e)),
        };
        let checked = decompress(&frame).and_then(|data| verify(id, &data).map(|()| data));
        match checked {
            Ok(data) => Ok((frame, data)),
            Err(e) => {
                let aside = self.root.join("corrupt").join(id.hex());
                let _ = fs::rename(&path, &aside);
                Err(Error::StoreCorrupt {
                    id: *id,
                    path,
                    why: e.to_string(),
                })
            }
        }
    }

    /// Make every rename since the last sync durable.
    pub fn sync(&self) -> Result<()> {
        let dirs = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        for dir in dirs {
            atomic::sync_dir(&dir)?;
        }
        Ok(())
    }

    /// Stage in `tmp/` (emptied on open, so a crash leaves nothing behind where the store
    /// looks), rename into place, and leave the directory fsync to [`Store::sync`] or the
    /// durable variants.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let staged = atomic::Staged::new_in(&self.root.join("tmp"), bytes, atomic::PUBLIC)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&dir).map_err(Error::io("cannot create", &dir))?;
        staged.rename_to(path)?;
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(dir);
        Ok(())
    }

    /// Keep an index (content-addressed) in the store; returns its id.
    pub fn put_index(&self, index: &ChunkIndex) -> Result<Digest> {
        let bytes = index.encode();
        let id = Digest::of(&bytes);
        let path = self.root.join("indexes").join(id.hex());
        if !path.is_file() {
            self.write_atomic(&path, &bytes)?;
        }
        Ok(id)
    }

    /// [`Store::put_index`], durable when it returns (see [`Store::put_compressed_durable`]); an
    /// index stored already gets its time refreshed.
    pub fn put_index_durable(&self, index: &ChunkIndex) -> Result<Digest> {
        let bytes = index.encode();
        let id = Digest::of(&bytes);
        let path = self.root.join("indexes").join(id.hex());
        if !(path.is_file() && touch(&path).is_ok()) {
            self.write_atomic(&path, &bytes)?;
        }
        self.sync_parents(&path, 1)?;
        Ok(id)
    }

    /// When the index `id` was stored (or last stored again).
    pub fn index_modified(&self, id: &Digest) -> Result<SystemTime> {
        let path = self.root.join("indexes").join(id.hex());
        fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(Error::io("cannot read index", &path))
    }

    /// A kept index, verified against its id.
    pub fn get_index(&self, id: &Digest, max_artifact: u64) -> Result<ChunkIndex> {
        let path = self.root.join("indexes").join(id.hex());
        let bytes = fs::read(&path).map_err(Error::io("cannot read index", &path))?;
        ChunkIndex::decode_expecting(&bytes, id, max_artifact)
    }

    pub fn has_index(&self, id: &Digest) -> bool {
        self.root.join("indexes").join(id.hex()).is_file()
    }

    /// The raw encoding of a kept index (what the twin serves on `artifact.index`), verified.
    pub fn index_bytes(&self, id: &Digest) -> Result<Vec<u8>> {
        let path = self.root.join("indexes").join(id.hex());
        let bytes = fs::read(&path).map_err(Error::io("cannot read index", &path))?;
        let actual = Digest::of(&bytes);
        if &actual != id {
            return Err(Error::IndexDigest {
                expected: *id,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Pin `index` (already stored with [`Store::put_index`]) under `name`: its chunks survive gc.
    pub fn keep(&self, name: &str, index: &Digest) -> Result<()> {
        check_name(name)?;
        let path = self.root.join("keep").join(name);
        self.write_atomic(&path, index.hex().as_bytes())?;
        self.sync()?;
        // `sync` may have found this directory taken by a concurrent sync still in progress.
        self.sync_parents(&path, 1)
    }

    /// Unpin `name`; its chunks go at the next gc unless another kept index needs them.
    pub fn unkeep(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let path = self.root.join("keep").join(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("cannot remove", &path)(e))
            }
            _ => Ok(()),
        }
    }

    /// Every pin: name → index id.
    pub fn kept(&self) -> Result<Vec<(String, Digest)>> {
        let dir = self.root.join("keep");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(Error::io("cannot list", &dir))? {
            let entry = entry.map_err(Error::io("cannot list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let text =
                fs::read_to_string(entry.path()).map_err(Error::io("cannot read", entry.path()))?;
            out.push((name, text.trim().parse()?));
        }
        out.sort();
        Ok(out)
    }

    /// How many kept indexes need each chunk (a chunk listed twice in one index counts once
    /// for it).
    pub fn refcounts(&self, max_artifact: u64) -> Result<HashMap<Digest, u32>> {
        let mut counts: HashMap<Digest, u32> = HashMap::new();
        let mut seen_index = HashSet::new();
        for (_, id) in self.kept()? {
            if !seen_index.insert(id) {
                continue;
            }
            let index = self.get_index(&id, max_artifact)?;
            let unique: HashSet<Digest> = index.chunks.iter().map(|c| c.id).collect();
            for c in unique {
                *counts.entry(c).or_default() += 1;
            }
        }
        Ok(counts)
    }

    /// Remove every chunk and index no kept index needs. Returns what was removed.
    pub fn gc(&self, max_artifact: u64) -> Result<StoreStats> {
        self.gc_older_than(max_artifact, Duration::ZERO)
    }

    /// [`Store::gc`], sparing chunks and indexes stored less than `grace` ago: a writer that
    /// stores chunks first and the index naming them last (an upload in progress) must not
    /// lose the chunks in between. Returns what was removed.
    pub fn gc_older_than(&self, max_artifact: u64, grace: Duration) -> Result<StoreStats> {
        let counts = self.refcounts(max_artifact)?;
        let kept_indexes: HashSet<String> =
            self.kept()?.into_iter().map(|(_, d)| d.hex()).collect();
        let old = |meta: &fs::Metadata| meta.modified().map_or(Duration::ZERO, age) >= grace;
        let mut removed = StoreStats::default();
        self.walk_chunks(|path, id, meta| {
            if !counts.contains_key(&id) && old(meta) {
                fs::remove_file(path).map_err(Error::io("cannot remove", path))?;
                removed.chunks += 1;
                removed.bytes_on_disk += meta.len();
            }
            Ok(())
        })?;
        let dir = self.root.join("indexes");
        for entry in fs::read_dir(&dir).map_err(Error::io("cannot list", &dir))? {
            let entry = entry.map_err(Error::io("cannot list", &dir))?;
            if !kept_indexes.contains(&*entry.file_name().to_string_lossy())
                && entry.metadata().is_ok_and(|m| old(&m))
            {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(removed)
    }

    /// Chunks and bytes on disk.
    pub fn stats(&self) -> Result<StoreStats> {
        let mut s = StoreStats::default();
        self.walk_chunks(|_, _, meta| {
            s.chunks += 1;
            s.bytes_on_disk += meta.len();
            Ok(())
        })?;
        Ok(s)
    }

    fn walk_chunks(
        &self,
        mut each: impl FnMut(&Path, Digest, &fs::Metadata) -> Result<()>,
    ) -> Result<()> {
        let top = self.root.join("chunks");
        for sub in fs::read_dir(&top).map_err(Error::io("cannot list", &top))? {
            let sub = sub.map_err(Error::io("cannot list", &top))?.path();
            if !sub.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&sub).map_err(Error::io("cannot list", &sub))? {
                let entry = entry.map_err(Error::io("cannot list", &sub))?;
                let Ok(id) = entry.file_name().to_string_lossy().parse::<Digest>() else {
                    continue;
                };
                // Gone since the listing (a concurrent gc or corruption moved it): skip it.
                let Ok(meta) = entry.metadata() else { continue };
                each(&entry.path(), id, &meta)?;
            }
        }
        Ok(())
    }
}

/// How long ago `time` was; a time in the future (a clock set back) is no time ago.
fn age(time: SystemTime) -> Duration {
    SystemTime::now()
        .duration_since(time)
        .unwrap_or(Duration::ZERO)
}

/// Set a file's modification time to now.
fn touch(path: &Path) -> std::io::Result<()> {
    File::options()
        .write(true)
        .open(path)?
        .set_modified(SystemTime::now())
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::IndexMalformed(format!(
            "`{name}` is not a valid keep name (1-128 of A-Z a-z 0-9 - _ . @, not starting with .)"
        )))
    }
}

pub(crate) fn verify(id: &Digest, data: &[u8]) -> Result<()> {
    let actual = Digest::of(data);
    if &actual == id {
        Ok(())
    } else {
        Err(Error::ChunkDigest {
            expected: *id,
            actual,
        })
    }
}

/// Decompress one zstd frame holding at most one chunk.
pub(crate) fn decompress(frame: &[u8]) -> Result<Vec<u8>> {
    zstd::bulk::decompress(frame, MAX_CHUNK).map_err(Error::Zstd)
}

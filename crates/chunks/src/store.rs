use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::blobs::{Blobs, FsBlobs};
use crate::{ChunkIndex, Digest, Error, Result};

/// zstd level for chunks the store compresses itself (those that arrived as deltas). Chunks that
/// arrive compressed are kept exactly as they arrived.
const STORE_LEVEL: i32 = 3;
/// No chunk is larger than FastCDC's maximum; decompression stops there whatever a frame claims.
const MAX_CHUNK: usize = fastcdc::v2020::MAXIMUM_MAX;

/// Chunks, zstd-compressed, one object per chunk, in [`Blobs`] (files by default):
///
/// ```text
/// chunks/<2 hex>/<64 hex>   a zstd frame
/// indexes/<64 hex>          a chunk index (its encoding)
/// keep/<name>               the id of an index that pins its chunks against gc
/// corrupt/<64 hex>          chunks that failed verification, set aside for inspection
/// ```
///
/// Writes are whole or nothing; [`Store::sync`] makes them durable in batches (a window of chunks
/// costs a handful of fsyncs on files, not one per chunk). A crash loses at most the chunks
/// written since the last sync, never corrupts one: every read decompresses and checks the sha256
/// against the name. A server that acknowledges each upload uses
/// [`Store::put_compressed_durable`] and [`Store::put_index_durable`] instead, which are durable
/// on return by themselves.
#[derive(Debug)]
pub struct Store {
    blobs: Arc<dyn Blobs>,
    /// The directory, when the objects are files.
    root: Option<PathBuf>,
}

/// What [`Store::gc`] or [`Store::stats`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub chunks: u64,
    pub bytes_on_disk: u64,
}

fn chunk_key(id: &Digest) -> String {
    let hex = id.hex();
    format!("chunks/{}/{hex}", &hex[..2])
}

fn index_key(id: &Digest) -> String {
    format!("indexes/{}", id.hex())
}

impl Store {
    /// A store of files under `root` (created if missing).
    pub fn open(root: &Path) -> Result<Self> {
        let blobs = FsBlobs::open(root)?;
        Ok(Self {
            blobs: Arc::new(blobs),
            root: Some(root.to_owned()),
        })
    }

    /// A store in any [`Blobs`] (the twin's object storage).
    pub fn with_blobs(blobs: Arc<dyn Blobs>) -> Self {
        Self { blobs, root: None }
    }

    /// The directory of a store of files.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// Where the store is, for messages.
    pub fn location(&self) -> String {
        self.blobs.location()
    }

    /// The objects themselves (the twin keeps its delta cache beside the chunks).
    pub fn blobs(&self) -> &Arc<dyn Blobs> {
        &self.blobs
    }

    fn error(&self, what: &'static str, key: &str) -> impl FnOnce(std::io::Error) -> Error {
        Error::io(
            what,
            PathBuf::from(format!("{}/{key}", self.blobs.location())),
        )
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(self
            .blobs
            .stat(key)
            .map_err(self.error("cannot read", key))?
            .is_some())
    }

    pub fn has(&self, id: &Digest) -> bool {
        self.exists(&chunk_key(id)).unwrap_or(false)
    }

    fn put(&self, key: &str, bytes: &[u8], durable: bool) -> Result<()> {
        self.blobs
            .put(key, bytes, durable)
            .map_err(self.error("cannot write", key))
    }

    /// Store raw chunk bytes after checking they are the chunk `id`.
    pub fn put_raw(&self, id: &Digest, data: &[u8]) -> Result<()> {
        verify(id, data)?;
        if self.has(id) {
            return Ok(());
        }
        let z = zstd::bulk::compress(data, STORE_LEVEL).map_err(Error::Zstd)?;
        self.put(&chunk_key(id), &z, false)
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
            self.put(&chunk_key(id), frame, false)?;
        }
        Ok(data)
    }

    /// [`Store::put_compressed`], durable when it returns, also when another writer stored the
    /// chunk first and has not synced yet. A chunk stored already gets its time refreshed,
    /// because the caller relies on it from now on ([`Store::gc_older_than`]).
    pub fn put_compressed_durable(&self, id: &Digest, frame: &[u8]) -> Result<Vec<u8>> {
        let data = decompress(frame).map_err(|e| match e {
            Error::Zstd(io) => Error::TransitMalformed(format!("chunk {id}: {io}")),
            other => other,
        })?;
        verify(id, &data)?;
        let key = chunk_key(id);
        self.blobs
            .put_fresh(&key, frame)
            .map_err(self.error("cannot write", &key))?;
        Ok(data)
    }

    /// Whether chunk `id` is stored. If it is, and a [`Store::gc_older_than`] with `grace`
    /// would find it older than half of that, its time is refreshed: whoever asked is told the
    /// store has it and will name it in an index soon, so it must outlive the next gc.
    pub fn hold(&self, id: &Digest, grace: Duration) -> Result<bool> {
        let key = chunk_key(id);
        let Some(stat) = self
            .blobs
            .stat(&key)
            .map_err(self.error("cannot read", &key))?
        else {
            return Ok(false);
        };
        if age(stat.modified) >= grace / 2 {
            // Collected in between: false, and the caller uploads it again.
            return self
                .blobs
                .touch(&key)
                .map_err(self.error("cannot refresh", &key));
        }
        Ok(true)
    }

    /// The raw bytes of chunk `id`, verified. A chunk that fails verification is set aside in
    /// `corrupt/` so the next plan fetches it again.
    pub fn get(&self, id: &Digest) -> Result<Vec<u8>> {
        Ok(self.get_both(id)?.1)
    }

    /// The stored zstd frame of chunk `id` and its raw bytes, verified.
    pub fn get_both(&self, id: &Digest) -> Result<(Vec<u8>, Vec<u8>)> {
        let key = chunk_key(id);
        let Some(frame) = self
            .blobs
            .get(&key)
            .map_err(self.error("cannot read", &key))?
        else {
            return Err(Error::ChunkMissing(*id));
        };
        let checked = decompress(&frame).and_then(|data| verify(id, &data).map(|()| data));
        match checked {
            Ok(data) => Ok((frame, data)),
            Err(e) => {
                let _ = self
                    .blobs
                    .put(&format!("corrupt/{}", id.hex()), &frame, false);
                let _ = self.blobs.delete(&key);
                Err(Error::StoreCorrupt {
                    id: *id,
                    path: PathBuf::from(format!("{}/{key}", self.blobs.location())),
                    why: e.to_string(),
                })
            }
        }
    }

    /// Make every write since the last sync durable.
    pub fn sync(&self) -> Result<()> {
        self.blobs.sync().map_err(Error::io(
            "cannot sync",
            PathBuf::from(self.blobs.location()),
        ))
    }

    /// Keep an index (content-addressed) in the store; returns its id.
    pub fn put_index(&self, index: &ChunkIndex) -> Result<Digest> {
        let bytes = index.encode();
        let id = Digest::of(&bytes);
        let key = index_key(&id);
        if !self.exists(&key)? {
            self.put(&key, &bytes, false)?;
        }
        Ok(id)
    }

    /// [`Store::put_index`], durable when it returns (see [`Store::put_compressed_durable`]); an
    /// index stored already gets its time refreshed.
    pub fn put_index_durable(&self, index: &ChunkIndex) -> Result<Digest> {
        let bytes = index.encode();
        let id = Digest::of(&bytes);
        let key = index_key(&id);
        self.blobs
            .put_fresh(&key, &bytes)
            .map_err(self.error("cannot write", &key))?;
        Ok(id)
    }

    /// When the index `id` was stored (or last stored again).
    pub fn index_modified(&self, id: &Digest) -> Result<SystemTime> {
        let key = index_key(id);
        self.blobs
            .stat(&key)
            .map_err(self.error("cannot read index", &key))?
            .map(|stat| stat.modified)
            .ok_or_else(|| {
                self.error("cannot read index", &key)(std::io::ErrorKind::NotFound.into())
            })
    }

    fn index_raw(&self, id: &Digest) -> Result<Vec<u8>> {
        let key = index_key(id);
        self.blobs
            .get(&key)
            .map_err(self.error("cannot read index", &key))?
            .ok_or_else(|| {
                self.error("cannot read index", &key)(std::io::ErrorKind::NotFound.into())
            })
    }

    /// A kept index, verified against its id.
    pub fn get_index(&self, id: &Digest, max_artifact: u64) -> Result<ChunkIndex> {
        ChunkIndex::decode_expecting(&self.index_raw(id)?, id, max_artifact)
    }

    pub fn has_index(&self, id: &Digest) -> bool {
        self.exists(&index_key(id)).unwrap_or(false)
    }

    /// The raw encoding of a kept index (what the twin serves on `artifact.index`), verified.
    pub fn index_bytes(&self, id: &Digest) -> Result<Vec<u8>> {
        let bytes = self.index_raw(id)?;
        let actual = Digest::of(&bytes);
        if &actual != id {
            return Err(Error::IndexDigest {
                expected: *id,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Pin `index` (already stored with [`Store::put_index`]) under `name`: its chunks survive
    /// gc. Durable when it returns.
    pub fn keep(&self, name: &str, index: &Digest) -> Result<()> {
        check_name(name)?;
        // What it pins must be durable before the pin is.
        self.sync()?;
        self.put(&format!("keep/{name}"), index.hex().as_bytes(), true)
    }

    /// Unpin `name`; its chunks go at the next gc unless another kept index needs them.
    pub fn unkeep(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let key = format!("keep/{name}");
        self.blobs
            .delete(&key)
            .map_err(self.error("cannot remove", &key))
    }

    /// Every pin: name → index id.
    pub fn kept(&self) -> Result<Vec<(String, Digest)>> {
        let listed = self
            .blobs
            .list("keep/")
            .map_err(self.error("cannot list", "keep/"))?;
        let mut out = Vec::new();
        for l in listed {
            let Some(text) = self
                .blobs
                .get(&l.key)
                .map_err(self.error("cannot read", &l.key))?
            else {
                // Unkept since the listing.
                continue;
            };
            let name = l.key.trim_start_matches("keep/").to_owned();
            out.push((name, String::from_utf8_lossy(&text).trim().parse()?));
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
        let old = |modified: SystemTime| age(modified) >= grace;
        let mut removed = StoreStats::default();
        for (key, id, listed) in self.chunks()? {
            if !counts.contains_key(&id) && old(listed.modified) {
                self.blobs
                    .delete(&key)
                    .map_err(self.error("cannot remove", &key))?;
                removed.chunks += 1;
                removed.bytes_on_disk += listed.size;
            }
        }
        let indexes = self
            .blobs
            .list("indexes/")
            .map_err(self.error("cannot list", "indexes/"))?;
        for l in indexes {
            let hex = l.key.trim_start_matches("indexes/");
            if !kept_indexes.contains(hex) && old(l.modified) {
                let _ = self.blobs.delete(&l.key);
            }
        }
        Ok(removed)
    }

    /// Chunks and bytes stored.
    pub fn stats(&self) -> Result<StoreStats> {
        let mut s = StoreStats::default();
        for (_, _, listed) in self.chunks()? {
            s.chunks += 1;
            s.bytes_on_disk += listed.size;
        }
        Ok(s)
    }

    /// Every stored chunk: its key, id and listing.
    fn chunks(&self) -> Result<Vec<(String, Digest, crate::blobs::Listed)>> {
        let listed = self
            .blobs
            .list("chunks/")
            .map_err(self.error("cannot list", "chunks/"))?;
        Ok(listed
            .into_iter()
            .filter_map(|l| {
                let id = l.key.rsplit('/').next()?.parse::<Digest>().ok()?;
                Some((l.key.clone(), id, l))
            })
            .collect())
    }
}

/// How long ago `time` was; a time in the future (a clock set back) is no time ago.
fn age(time: SystemTime) -> Duration {
    SystemTime::now()
        .duration_since(time)
        .unwrap_or(Duration::ZERO)
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

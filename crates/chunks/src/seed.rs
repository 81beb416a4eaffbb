use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{ChunkIndex, Digest, Error, Params, Result, chunk_file, store::verify};

/// Data the car already has — its running rootfs slot (a block device), an older layer file —
/// cut with the same FastCDC parameters as the target, so every chunk they share is found
/// wherever it moved. Only offsets are remembered (about 50 bytes per chunk), never the data.
#[derive(Debug)]
pub struct Seed {
    path: PathBuf,
    at: HashMap<Digest, (u64, u32)>,
    index: ChunkIndex,
}

impl Seed {
    /// Read `path` once from start to end and remember where each chunk is.
    pub fn scan(path: &Path, params: Params) -> Result<Self> {
        let mut at = HashMap::new();
        let index = chunk_file(path, params, |cut| {
            at.entry(cut.id)
                .or_insert((cut.offset, cut.data.len() as u32));
            Ok(())
        })?;
        Ok(Self {
            path: path.to_owned(),
            at,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The index of the seed as it was read (its own artifact digest and chunks).
    pub fn index(&self) -> &ChunkIndex {
        &self.index
    }

    pub fn locate(&self, id: &Digest) -> Option<(u64, u32)> {
        self.at.get(id).copied()
    }

    pub fn contains(&self, id: &Digest) -> bool {
        self.at.contains_key(id)
    }

    /// Read chunk `id` back and check it is still there: a seed that changed since the scan (a
    /// slot someone wrote to) yields [`Error::SeedChanged`], never wrong bytes.
    pub fn read(&self, id: &Digest) -> Result<Vec<u8>> {
        let (offset, len) = self.locate(id).ok_or(Error::Unplanned(*id))?;
        let file = File::open(&self.path).map_err(Error::io("cannot open seed", &self.path))?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(|_| Error::SeedChanged {
                path: self.path.clone(),
                offset,
                id: *id,
            })?;
        verify(id, &buf).map_err(|_| Error::SeedChanged {
            path: self.path.clone(),
            offset,
            id: *id,
        })?;
        Ok(buf)
    }
}

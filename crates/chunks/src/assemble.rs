use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{ChunkIndex, Digest, Error, Result, Seed, Sha256, Store, store::verify};

/// A finished artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assembled {
    pub size: u64,
    pub digest: Digest,
}

/// Builds a target file chunk by chunk, in order, in `<out>.partial`, and survives being killed:
/// [`Assembler::open`] verifies what an earlier attempt wrote, chunk by chunk against the index,
/// and continues after the last good chunk (a torn or unsynced tail is cut off). Only when every
/// chunk is there and the whole file hashes to the index's artifact digest does the file get its
/// name. The partial file is the car's store for the artifact being fetched: nothing is written
/// twice, and a chunk in it is verified whenever it is read back.
#[derive(Debug)]
pub struct Assembler {
    out: PathBuf,
    partial: PathBuf,
    writer: BufWriter<File>,
    hash: Sha256,
    chunks: Vec<(Digest, u32)>,
    artifact: Digest,
    next: usize,
    written: u64,
    /// Where each chunk written so far starts (first occurrence).
    at: HashMap<Digest, (u64, u32)>,
}

impl Assembler {
    pub fn open(target: &ChunkIndex, out: &Path) -> Result<Self> {
        let mut name = out.file_name().unwrap_or_default().to_owned();
        name.push(".partial");
        let partial = out.with_file_name(name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(Error::io("cannot open", &partial))?;
        let mut hash = Sha256::new();
        let mut at = HashMap::new();
        let mut next = 0;
        let mut written = 0u64;
        let mut buf = Vec::new();
        {
            let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut file);
            for c in &target.chunks {
                buf.resize(c.len as usize, 0);
                if reader.read_exact(&mut buf).is_err() || verify(&c.id, &buf).is_err() {
                    break;
                }
                hash.update(&buf);
                at.entry(c.id).or_insert((written, c.len));
                written += u64::from(c.len);
                next += 1;
            }
        }
        file.set_len(written)
            .and_then(|()| file.seek(SeekFrom::Start(written)).map(|_| ()))
            .map_err(Error::io("cannot truncate", &partial))?;
        Ok(Self {
            out: out.to_owned(),
            partial,
            writer: BufWriter::with_capacity(1 << 20, file),
            hash,
            chunks: target.chunks.iter().map(|c| (c.id, c.len)).collect(),
            artifact: target.artifact,
            next,
            written,
            at,
        })
    }

    /// Position of the next chunk to append (= chunks already in place).
    pub fn next(&self) -> usize {
        self.next
    }

    pub fn written_bytes(&self) -> u64 {
        self.written
    }

    pub fn is_complete(&self) -> bool {
        self.next == self.chunks.len()
    }

    /// A chunk already written, read back and verified.
    pub fn read_local(&mut self, id: &Digest) -> Result<Vec<u8>> {
        let (offset, len) = *self.at.get(id).ok_or(Error::Unplanned(*id))?;
        let buf = self.read_at(offset, u64::from(len))?;
        verify(id, &buf)?;
        Ok(buf)
    }

    fn read_at(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.writer
            .flush()
            .map_err(Error::io("cannot write", &self.partial))?;
        let mut buf = vec![0u8; len as usize];
        self.writer
            .get_ref()
            .read_exact_at(&mut buf, offset)
            .map_err(Error::io("cannot read", &self.partial))?;
        Ok(buf)
    }

    /// The last `n` bytes written (the dictionary of a context frame). They were verified chunk
    /// by chunk when they were appended or when the partial file was reopened.
    pub fn preceding(&mut self, n: u32) -> Result<Vec<u8>> {
        let n = u64::from(n);
        if n > self.written {
            return Err(Error::TransitMalformed(format!(
                "a context of {n} bytes asked for, only {} assembled",
                self.written
            )));
        }
        self.read_at(self.written - n, n)
    }

    /// Append the next chunk; its id and length must be the index's next ones.
    pub fn append(&mut self, id: &Digest, data: &[u8]) -> Result<()> {
        let Some(&(want, len)) = self.chunks.get(self.next) else {
            return Err(Error::IndexMalformed(format!(
                "chunk {id} appended after the last chunk of the target"
            )));
        };
        if &want != id || len as usize != data.len() {
            return Err(Error::IndexMalformed(format!(
                "chunk {id} ({} bytes) appended where the index has {want} ({len} bytes)",
                data.len()
            )));
        }
        self.writer
            .write_all(data)
            .map_err(Error::io("cannot write", &self.partial))?;
        self.hash.update(data);
        self.at.entry(*id).or_insert((self.written, len));
        self.written += u64::from(len);
        self.next += 1;
        Ok(())
    }

    /// Make what was appended durable (once per window, not per chunk).
    pub fn sync(&mut self) -> Result<()> {
        self.writer
            .flush()
            .and_then(|()| self.writer.get_ref().sync_data())
            .map_err(Error::io("cannot sync", &self.partial))
    }

    /// Check the whole artifact's digest, sync, and give the file its name. A wrong digest
    /// removes the partial file: nothing half-right is ever used.
    pub fn finish(mut self) -> Result<Assembled> {
        if !self.is_complete() {
            let missing = self.chunks[self.next].0;
            return Err(Error::Unplanned(missing));
        }
        let digest = self.hash.finish();
        if digest != self.artifact {
            drop(self.writer);
            let _ = fs::remove_file(&self.partial);
            return Err(Error::ArtifactDigest {
                expected: self.artifact,
                actual: digest,
            });
        }
        self.writer
            .flush()
            .and_then(|()| self.writer.get_ref().sync_all())
            .map_err(Error::io("cannot sync", &self.partial))?;
        drop(self.writer);
        fs::rename(&self.partial, &self.out).map_err(Error::io("cannot rename into", &self.out))?;
        // The partial file grew in place over many windows (resumable), so it is not an
        // `atomic::write`; its rename is made durable the same way.
        if let Some(dir) = self.out.parent() {
            crate::atomic::sync_dir(dir)?;
        }
        Ok(Assembled {
            size: self.written,
            digest,
        })
    }

    /// Give up: remove the partial file.
    pub fn abandon(self) {
        let partial = self.partial.clone();
        drop(self);
        let _ = fs::remove_file(partial);
    }
}

/// Write the whole target to `out` from the store or the seeds (each chunk verified as it is
/// read; one chunk in memory at a time), through an [`Assembler`]. `progress` is called with the
/// bytes written so far.
pub fn assemble(
    target: &ChunkIndex,
    store: &Store,
    seeds: &[Seed],
    out: &Path,
    mut progress: impl FnMut(u64),
) -> Result<Assembled> {
    let mut asm = Assembler::open(target, out)?;
    let result = (|| {
        while !asm.is_complete() {
            let c = target.chunks[asm.next()];
            let data = if store.has(&c.id) {
                store.get(&c.id)?
            } else if let Some(seed) = seeds.iter().find(|s| s.contains(&c.id)) {
                seed.read(&c.id)?
            } else if asm.at.contains_key(&c.id) {
                asm.read_local(&c.id)?
            } else {
                return Err(Error::Unplanned(c.id));
            };
            asm.append(&c.id, &data)?;
            progress(asm.written_bytes());
        }
        Ok(())
    })();
    match result {
        Ok(()) => asm.finish(),
        Err(e) => {
            asm.abandon();
            Err(e)
        }
    }
}

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::{ChunkIndex, Digest, Error, Result, Seed, Sha256, Store};

/// A finished artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assembled {
    pub size: u64,
    pub digest: Digest,
}

/// Write the target to `out`, chunk by chunk in order, from the store or the seeds (each chunk
/// verified as it is read; one chunk in memory at a time). The bytes go to `<out>.partial`
/// first; only when the whole artifact hashes to the index's digest is the file synced and
/// renamed to `out`. `progress` is called with the bytes written so far.
pub fn assemble(
    target: &ChunkIndex,
    store: &Store,
    seeds: &[Seed],
    out: &Path,
    mut progress: impl FnMut(u64),
) -> Result<Assembled> {
    let mut name = out.file_name().unwrap_or_default().to_owned();
    name.push(".partial");
    let partial = out.with_file_name(name);
    let file = File::create(&partial).map_err(Error::io("cannot create", &partial))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut hash = Sha256::new();
    let mut written = 0u64;
    let result = (|| {
        for c in &target.chunks {
            let data = if store.has(&c.id) {
                store.get(&c.id)?
            } else if let Some(seed) = seeds.iter().find(|s| s.contains(&c.id)) {
                seed.read(&c.id)?
            } else {
                return Err(Error::Unplanned(c.id));
            };
            hash.update(&data);
            writer
                .write_all(&data)
                .map_err(Error::io("cannot write", &partial))?;
            written += data.len() as u64;
            progress(written);
        }
        Ok(())
    })();
    if let Err(e) = result {
        drop(writer);
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    let digest = hash.finish();
    if digest != target.artifact {
        drop(writer);
        let _ = fs::remove_file(&partial);
        return Err(Error::ArtifactDigest {
            expected: target.artifact,
            actual: digest,
        });
    }
    let file = writer
        .into_inner()
        .map_err(|e| Error::io("cannot write", &partial)(e.into_error()))?;
    file.sync_all()
        .map_err(Error::io("cannot sync", &partial))?;
    drop(file);
    fs::rename(&partial, out).map_err(Error::io("cannot rename into", out))?;
    if let Some(dir) = out.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io("cannot sync directory", dir))?;
    }
    Ok(Assembled {
        size: written,
        digest,
    })
}

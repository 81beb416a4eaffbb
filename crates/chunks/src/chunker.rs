use std::fs::File;
use std::io::Read;
use std::path::Path;

use fastcdc::v2020::StreamCDC;

use crate::{ChunkIndex, ChunkRef, Digest, Error, Params, Result, Sha256};

/// One chunk as it was cut: where, how long, its id, and (while cutting) its bytes.
#[derive(Debug)]
pub struct ChunkCut<'a> {
    pub offset: u64,
    pub id: Digest,
    pub data: &'a [u8],
}

/// Cut everything `reader` yields, calling `each` per chunk in order, and return the index.
/// Memory: one `params.max` buffer.
pub fn chunk_reader(
    reader: impl Read,
    params: Params,
    mut each: impl FnMut(ChunkCut<'_>) -> Result<()>,
) -> Result<ChunkIndex> {
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut size = 0u64;
    let cdc = StreamCDC::new(
        reader,
        params.min as usize,
        params.avg as usize,
        params.max as usize,
    );
    for cut in cdc {
        let cut = cut.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(io) => Error::Chunker(io.to_string()),
            other => Error::Chunker(other.to_string()),
        })?;
        whole.update(&cut.data);
        let id = Digest::of(&cut.data);
        size += cut.data.len() as u64;
        chunks.push(ChunkRef {
            id,
            len: cut.data.len() as u32,
        });
        each(ChunkCut {
            offset: cut.offset,
            id,
            data: &cut.data,
        })?;
    }
    Ok(ChunkIndex {
        params,
        size,
        artifact: whole.finish(),
        chunks,
    })
}

/// Chunk a file (or a block device).
pub fn chunk_file(
    path: &Path,
    params: Params,
    each: impl FnMut(ChunkCut<'_>) -> Result<()>,
) -> Result<ChunkIndex> {
    let file = File::open(path).map_err(Error::io("cannot open", path))?;
    chunk_reader(
        std::io::BufReader::with_capacity(1 << 20, file),
        params,
        each,
    )
    .map_err(|e| match e {
        Error::Chunker(why) => Error::Io {
            what: "cannot read",
            path: path.to_owned(),
            source: std::io::Error::other(why),
        },
        other => other,
    })
}

/// Chunk bytes in memory (tests, small artifacts).
pub fn chunk_bytes(bytes: &[u8], params: Params) -> ChunkIndex {
    // Reading from a slice cannot fail and the callback never fails.
    chunk_reader(bytes, params, |_| Ok(())).unwrap_or_else(|_| ChunkIndex {
        params,
        size: 0,
        artifact: Digest::of(&[]),
        chunks: Vec::new(),
    })
}

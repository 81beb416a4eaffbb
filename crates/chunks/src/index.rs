//! The chunk index: an artifact's chunks in order. Binary, little-endian, content-addressed
//! (its id is the sha256 of its encoding), described in docs/delta.md:
//!
//! ```text
//! "CDIX" | version u8 = 1 | 3 zero bytes | min u32 | avg u32 | max u32 | size u64
//! | artifact sha256 [32] | count u32 | count × (length u32 | chunk sha256 [32])
//! ```

use crate::{Digest, Error, Result};

const MAGIC: &[u8; 4] = b"CDIX";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 4 + 12 + 8 + 32 + 4;
const ENTRY: usize = 4 + 32;

/// Bytes of an index's header: enough to learn the length of the whole encoding with
/// [`ChunkIndex::encoded_len`] before reading it.
pub const INDEX_HEADER_BYTES: usize = HEADER;

/// FastCDC parameters. They are part of every index: a seed must be cut with the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Params {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Params {
    /// What cardeploy uses: 16 / 64 / 256 KiB. 64 KiB keeps the index of a 400 MiB rootfs near
    /// 230 KiB while a changed region still costs little, because a chunk that does not match is
    /// sent as a delta against the old bytes instead of whole (see `transit`).
    pub const DEFAULT: Params = Params {
        min: 16 << 10,
        avg: 64 << 10,
        max: 256 << 10,
    };

    fn validate(self) -> Result<Self> {
        let ok = (fastcdc::v2020::MINIMUM_MIN as u32..=fastcdc::v2020::MINIMUM_MAX as u32)
            .contains(&self.min)
            && (fastcdc::v2020::AVERAGE_MIN as u32..=fastcdc::v2020::AVERAGE_MAX as u32)
                .contains(&self.avg)
            && (fastcdc::v2020::MAXIMUM_MIN as u32..=fastcdc::v2020::MAXIMUM_MAX as u32)
                .contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max
            && self.min.is_multiple_of(2)
            && self.avg.is_multiple_of(2)
            && self.max.is_multiple_of(2);
        if ok {
            Ok(self)
        } else {
            Err(Error::IndexMalformed(format!(
                "chunking parameters {}/{}/{} are outside FastCDC's bounds",
                self.min, self.avg, self.max
            )))
        }
    }
}

/// What an index's header says.
struct Header {
    params: Params,
    size: u64,
    artifact: Digest,
    count: u32,
}

impl Header {
    fn parse(bytes: &[u8], max_artifact: u64) -> Result<Self> {
        let bad = |why: &str| Error::IndexMalformed(why.to_owned());
        if bytes.len() < HEADER {
            return Err(bad("shorter than its header"));
        }
        if &bytes[0..4] != MAGIC {
            return Err(bad("not a cardeploy chunk index (bad magic)"));
        }
        if bytes[4] != VERSION || bytes[5..8] != [0, 0, 0] {
            return Err(Error::IndexMalformed(format!(
                "version {} is not supported (this build reads version {VERSION})",
                bytes[4]
            )));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let params = Params {
            min: u32_at(8),
            avg: u32_at(12),
            max: u32_at(16),
        }
        .validate()?;
        let mut size8 = [0u8; 8];
        size8.copy_from_slice(&bytes[20..28]);
        let size = u64::from_le_bytes(size8);
        if size > max_artifact {
            return Err(Error::IndexTooLarge {
                size,
                limit: max_artifact,
            });
        }
        let mut artifact = [0u8; 32];
        artifact.copy_from_slice(&bytes[28..60]);
        let count = u32_at(60);
        let fewest = size.div_ceil(u64::from(params.max));
        let most = if size == 0 {
            0
        } else {
            (size - 1) / u64::from(params.min) + 1
        };
        if !(fewest..=most).contains(&u64::from(count)) {
            return Err(Error::IndexMalformed(format!(
                "{count} chunks cannot make {size} bytes with chunks of {}..={} bytes",
                params.min, params.max
            )));
        }
        Ok(Self {
            params,
            size,
            artifact: Digest(artifact),
            count,
        })
    }

    fn encoded_len(&self) -> u64 {
        HEADER as u64 + u64::from(self.count) * ENTRY as u64
    }
}

/// One chunk of an artifact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub id: Digest,
    pub len: u32,
}

/// An artifact's chunks in order, with the parameters that cut them and the digest of the whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkIndex {
    pub params: Params,
    pub size: u64,
    pub artifact: Digest,
    pub chunks: Vec<ChunkRef>,
}

impl ChunkIndex {
    /// The index's own id: sha256 of its encoding.
    pub fn id(&self) -> Digest {
        Digest::of(&self.encode())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.chunks.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[VERSION, 0, 0, 0]);
        out.extend_from_slice(&self.params.min.to_le_bytes());
        out.extend_from_slice(&self.params.avg.to_le_bytes());
        out.extend_from_slice(&self.params.max.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.artifact.0);
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&c.id.0);
        }
        out
    }

    /// The length of the whole encoding that starts with `header` (at least
    /// [`INDEX_HEADER_BYTES`] of it), after checking everything the header alone can tell: the
    /// magic and version, FastCDC's bounds on the parameters, the artifact size against
    /// `max_artifact` (`IndexTooLarge`), and a chunk count that such a size allows (none above
    /// `max`, every one but the last at least `min`). A receiver learns how much it is about to
    /// read, and that it may, before reading it: an index has no fixed size limit, only the
    /// artifact it describes does.
    pub fn encoded_len(header: &[u8], max_artifact: u64) -> Result<u64> {
        Ok(Header::parse(header, max_artifact)?.encoded_len())
    }

    /// Parse an index received from anywhere, refusing one that describes more than
    /// `max_artifact` bytes. Checks every structural rule: chunk lengths within the parameters
    /// (only the last may be shorter than `min`), lengths summing to `size`, no trailing bytes.
    pub fn decode(bytes: &[u8], max_artifact: u64) -> Result<Self> {
        let Header {
            params,
            size,
            artifact,
            count,
        } = Header::parse(bytes, max_artifact)?;
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let count = count as usize;
        if bytes.len() as u64 != HEADER as u64 + count as u64 * ENTRY as u64 {
            return Err(Error::IndexMalformed(format!(
                "header says {count} chunks, the body holds {} bytes (truncated or padded)",
                bytes.len() - HEADER
            )));
        }
        let mut chunks = Vec::with_capacity(count);
        let mut sum = 0u64;
        for i in 0..count {
            let o = HEADER + i * ENTRY;
            let len = u32_at(o);
            let last = i + 1 == count;
            if len == 0 || len > params.max || (!last && len < params.min) {
                return Err(Error::IndexMalformed(format!(
                    "chunk {i} has length {len}, outside {}..={} for these parameters",
                    params.min, params.max
                )));
            }
            let mut id = [0u8; 32];
            id.copy_from_slice(&bytes[o + 4..o + 36]);
            sum += u64::from(len);
            chunks.push(ChunkRef {
                id: Digest(id),
                len,
            });
        }
        if sum != size {
            return Err(Error::IndexMalformed(format!(
                "chunk lengths add up to {sum} bytes, the header says {size}"
            )));
        }
        Ok(Self {
            params,
            size,
            artifact,
            chunks,
        })
    }

    /// Parse and check that the bytes are the index named `expected`.
    pub fn decode_expecting(bytes: &[u8], expected: &Digest, max_artifact: u64) -> Result<Self> {
        let actual = Digest::of(bytes);
        if &actual != expected {
            return Err(Error::IndexDigest {
                expected: *expected,
                actual,
            });
        }
        Self::decode(bytes, max_artifact)
    }

    /// Byte offset of every chunk (one more entry than chunks: the end).
    pub fn offsets(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.chunks.len() + 1);
        let mut at = 0u64;
        out.push(0);
        for c in &self.chunks {
            at += u64::from(c.len);
            out.push(at);
        }
        out
    }
}

//! Chunks on the wire (`artifact.chunks`, docs/protocol.md): each chunk travels as one frame,
//! zstd-compressed either whole or as a delta whose zstd dictionary is a range of the base
//! artifact the car already holds. Choosing that range is the whole trick: a changed chunk's old
//! version almost always lies between the nearest chunks that did match, at about the same
//! relative position, because files in an image or a tar move by shifts, not by shuffles.
//!
//! New content has no old version to refer to; for it the dictionary is the target's own bytes
//! just before the chunk (which the car has already assembled), so consecutive new chunks
//! compress almost as well as one stream.
//!
//! ```text
//! 'W' | chunk sha256 [32] | raw length u32 | zstd frame
//! 'D' | chunk sha256 [32] | raw length u32 | base start u32 | base count u32 | zstd frame
//! 'C' | chunk sha256 [32] | raw length u32 | preceding length u32 | zstd frame
//! ```

use std::collections::HashMap;

use crate::{ChunkIndex, ChunkRef, Digest, Error, Result, store::verify};

/// The largest reference a delta may use: bounds the car's memory (reference + decoder) at
/// about twice this, whatever the artifact size.
pub const MAX_REFERENCE: u64 = 8 << 20;
/// The most target bytes before a chunk a context frame may use as its dictionary.
pub const MAX_CONTEXT: u32 = 1 << 20;
/// zstd's window for deltas: covers the whole reference plus the chunk.
const DELTA_WINDOW_LOG: u32 = 24;
/// A reference dictionary starts with these bytes so zstd never mistakes base data that
/// happens to start with its dictionary magic for a trained dictionary.
const GUARD: [u8; 8] = *b"cdref\0\0\0";
/// No chunk is larger than FastCDC's maximum.
const MAX_CHUNK: u32 = fastcdc::v2020::MAXIMUM_MAX as u32;

/// A run of chunks of the base artifact, by position in its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    pub start: u32,
    pub count: u32,
}

/// How a frame's payload is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Whole,
    Delta(Reference),
    /// Compressed with the `n` target bytes just before the chunk as dictionary.
    Context(u32),
}

/// One chunk in transit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub id: Digest,
    pub raw_len: u32,
    pub encoding: Encoding,
    pub data: Vec<u8>,
}

impl Frame {
    /// Check that this is the chunk asked for, at the length its index declares, before a byte
    /// is decompressed: a sender cannot make the receiver produce more than the index allows.
    pub fn expect(&self, id: &Digest, len: u32) -> Result<()> {
        if &self.id != id {
            return Err(Error::TransitMalformed(format!(
                "asked for chunk {id}, got {}",
                self.id
            )));
        }
        if self.raw_len != len {
            return Err(Error::ChunkLength {
                id: *id,
                declared: len,
                sent: self.raw_len,
            });
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(45 + self.data.len());
        match self.encoding {
            Encoding::Whole => out.push(b'W'),
            Encoding::Delta(_) => out.push(b'D'),
            Encoding::Context(_) => out.push(b'C'),
        }
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        match self.encoding {
            Encoding::Delta(r) => {
                out.extend_from_slice(&r.start.to_le_bytes());
                out.extend_from_slice(&r.count.to_le_bytes());
            }
            Encoding::Context(n) => out.extend_from_slice(&n.to_le_bytes()),
            Encoding::Whole => {}
        }
        out.extend_from_slice(&self.data);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::TransitMalformed(why.to_owned());
        if bytes.len() < 37 {
            return Err(bad("shorter than a frame header"));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes[1..33]);
        let raw_len = u32_at(33);
        if raw_len == 0 || raw_len > MAX_CHUNK {
            return Err(Error::TransitMalformed(format!(
                "raw length {raw_len} is outside 1..={MAX_CHUNK}"
            )));
        }
        let (encoding, body) = match bytes[0] {
            b'W' => (Encoding::Whole, 37),
            b'D' if bytes.len() >= 45 => (
                Encoding::Delta(Reference {
                    start: u32_at(37),
                    count: u32_at(41),
                }),
                45,
            ),
            b'D' => return Err(bad("delta frame shorter than its header")),
            b'C' if bytes.len() >= 41 => {
                let n = u32_at(37);
                if n == 0 || n > MAX_CONTEXT {
                    return Err(Error::TransitMalformed(format!(
                        "context of {n} bytes is outside 1..={MAX_CONTEXT}"
                    )));
                }
                (Encoding::Context(n), 41)
            }
            b'C' => return Err(bad("context frame shorter than its header")),
            other => {
                return Err(Error::TransitMalformed(format!(
                    "unknown frame kind {other:#04x}"
                )));
            }
        };
        if bytes.len() == body {
            return Err(bad("frame without payload"));
        }
        Ok(Self {
            id: Digest(id),
            raw_len,
            encoding,
            data: bytes[body..].to_vec(),
        })
    }
}

/// Where a target chunk's old version probably is in the base: precomputed once per
/// (target, base) pair from the chunks the two share.
#[derive(Debug)]
pub struct ReferencePlanner {
    base_offsets: Vec<u64>,
    target_offsets: Vec<u64>,
    /// For each target position: the base position of the nearest matched chunk at or before
    /// it, and at or after it.
    prev: Vec<Option<(usize, usize)>>,
    next: Vec<Option<(usize, usize)>>,
    max_reference: u64,
}

impl ReferencePlanner {
    pub fn new(target: &ChunkIndex, base: &ChunkIndex, max_reference: u64) -> Self {
        let mut in_base: HashMap<Digest, usize> = HashMap::with_capacity(base.chunks.len());
        for (p, c) in base.chunks.iter().enumerate() {
            in_base.entry(c.id).or_insert(p);
        }
        let n = target.chunks.len();
        let matched: Vec<Option<usize>> = target
            .chunks
            .iter()
            .map(|c| in_base.get(&c.id).copied())
            .collect();
        let mut prev = vec![None; n];
        let mut last = None;
        for i in 0..n {
            if let Some(p) = matched[i] {
                last = Some((i, p));
            }
            prev[i] = last;
        }
        let mut next = vec![None; n];
        let mut last = None;
        for i in (0..n).rev() {
            if let Some(p) = matched[i] {
                last = Some((i, p));
            }
            next[i] = last;
        }
        Self {
            base_offsets: base.offsets(),
            target_offsets: target.offsets(),
            prev,
            next,
            max_reference,
        }
    }

    fn base_len(&self) -> usize {
        self.base_offsets.len() - 1
    }

    /// The base range to use as dictionary for target chunk `i`, or `None` when the base is
    /// empty.
    pub fn reference(&self, i: usize) -> Option<Reference> {
        let nb = self.base_len();
        if nb == 0 || i >= self.prev.len() {
            return None;
        }
        // Target gap: between the end of the previous matched chunk and the start of the next;
        // base gap: between their counterparts. Without a neighbour, the gap runs to the edge.
        let (t0, b0) = match self.prev[i] {
            Some((j, p)) => (self.target_offsets[j + 1], p + 1),
            None => (0, 0),
        };
        let (t1, b1) = match self.next[i] {
            Some((k, q)) => (self.target_offsets[k], q),
            None => (*self.target_offsets.last().unwrap_or(&0), nb),
        };
        // Base chunks [lo, hi) of the gap; when the neighbours crossed (content moved) or the
        // gap is empty (pure insertion), look around the previous neighbour instead.
        let (lo, hi) = if b0 < b1 {
            (b0, b1)
        } else {
            let around = b0.min(nb.saturating_sub(1));
            (around.saturating_sub(1), (around + 2).min(nb))
        };
        let gap_start = self.base_offsets[lo];
        let gap_end = self.base_offsets[hi];
        let gap = gap_end - gap_start;
        let (want_start, want_end) = if gap <= self.max_reference {
            (gap_start, gap_end)
        } else {
            // Same relative position inside the base gap as the chunk has inside the target
            // gap, centred, clipped to the gap.
            let t = self.target_offsets[i];
            let span = t1.saturating_sub(t0).max(1);
            let rel = (t.saturating_sub(t0)) as f64 / span as f64;
            let centre = gap_start + (rel.clamp(0.0, 1.0) * gap as f64) as u64;
            let half = self.max_reference / 2;
            let start = centre.saturating_sub(half).max(gap_start);
            let start = start.min(gap_end - self.max_reference);
            (start, start + self.max_reference)
        };
        // Whole chunks from the one holding `want_start`. That chunk may start before the
        // wanted range, so the end is held to `max_reference` from where the reference really
        // starts: the car refuses a larger reference (`DeltaReferenceTooLarge`), and a frame the
        // twin cannot check by decoding it is sent whole.
        let first = self
            .base_offsets
            .partition_point(|&o| o <= want_start)
            .saturating_sub(1)
            .max(lo);
        let end = want_end.min(self.base_offsets[first] + self.max_reference);
        let mut last = first;
        while last < hi && self.base_offsets[last + 1] <= end {
            last += 1;
        }
        if last == first {
            last = first + 1; // one chunk is never more than MAX_REFERENCE allows
        }
        Some(Reference {
            start: first as u32,
            count: (last - first) as u32,
        })
    }
}

/// Builds the dictionary bytes of a reference from the base chunks' raw bytes.
pub fn reference_dictionary(chunks: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut dict = GUARD.to_vec();
    for c in chunks {
        dict.extend_from_slice(&c);
    }
    dict
}

/// Compresses chunks for the wire, reusing the zstd dictionary while consecutive chunks share
/// a reference (they usually do: they lie in the same changed region).
pub struct DeltaEncoder {
    level: i32,
    current: Option<(Reference, zstd::bulk::Compressor<'static>)>,
}

impl std::fmt::Debug for DeltaEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaEncoder")
            .field("level", &self.level)
            .finish()
    }
}

impl DeltaEncoder {
    pub fn new(level: i32) -> Self {
        Self {
            level,
            current: None,
        }
    }

    /// A delta frame for `raw` against `reference`; `dictionary` is called only when the
    /// reference differs from the previous one and must return [`reference_dictionary`] bytes.
    pub fn delta(
        &mut self,
        id: Digest,
        raw: &[u8],
        reference: Reference,
        dictionary: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Frame> {
        let reuse = matches!(&self.current, Some((r, _)) if *r == reference);
        if !reuse {
            self.current = Some((reference, compressor(self.level, &dictionary()?)?));
        }
        let Some((_, c)) = self.current.as_mut() else {
            return Err(Error::Zstd(std::io::Error::other("no compressor")));
        };
        let data = c.compress(raw).map_err(Error::Zstd)?;
        Ok(Frame {
            id,
            raw_len: raw.len() as u32,
            encoding: Encoding::Delta(reference),
            data,
        })
    }
}

impl DeltaEncoder {
    /// A context frame for `raw`: `preceding` are the target bytes just before it (at most
    /// [`MAX_CONTEXT`]).
    pub fn context(&self, id: Digest, raw: &[u8], preceding: &[u8]) -> Result<Frame> {
        let n = u32::try_from(preceding.len())
            .ok()
            .filter(|n| (1..=MAX_CONTEXT).contains(n))
            .ok_or_else(|| Error::TransitMalformed("context length out of range".into()))?;
        let mut c = compressor(self.level, &reference_dictionary([preceding.to_vec()]))?;
        let data = c.compress(raw).map_err(Error::Zstd)?;
        Ok(Frame {
            id,
            raw_len: raw.len() as u32,
            encoding: Encoding::Context(n),
            data,
        })
    }
}

/// A zstd compressor with `dict` (guarded raw content) and a window that covers it.
fn compressor(level: i32, dict: &[u8]) -> Result<zstd::bulk::Compressor<'static>> {
    let mut c = zstd::bulk::Compressor::with_dictionary(level, dict).map_err(Error::Zstd)?;
    c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(DELTA_WINDOW_LOG))
        .map_err(Error::Zstd)?;
    Ok(c)
}

/// A whole frame from a zstd frame already made (the twin stores chunks compressed).
pub fn whole(id: Digest, raw_len: u32, zstd_frame: Vec<u8>) -> Frame {
    Frame {
        id,
        raw_len,
        encoding: Encoding::Whole,
        data: zstd_frame,
    }
}

/// Reverses [`DeltaEncoder`] on the car. The reference is kept while consecutive frames share
/// it and handed to zstd by reference as a prefix: decoding with a prefix builds no tables and
/// copies nothing, so the car holds the reference once.
#[derive(Default)]
pub struct DeltaDecoder {
    current: Option<(Reference, Vec<u8>)>,
}

impl std::fmt::Debug for DeltaDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeltaDecoder")
    }
}

impl DeltaDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The raw bytes of `frame`, verified against its id. `base` are the chunks of the base
    /// index the sender may refer to (empty without one): a reference outside them, or larger
    /// than [`MAX_REFERENCE`] bytes, is refused before anything is read. `dictionary` reads the
    /// referenced base chunks (from a seed or the store) and is called only when the reference
    /// changes; `preceding` returns the target bytes just before the chunk.
    pub fn decode(
        &mut self,
        frame: &Frame,
        base: &[ChunkRef],
        dictionary: impl FnOnce(Reference) -> Result<Vec<u8>>,
        preceding: impl FnOnce(u32) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let raw = match frame.encoding {
            Encoding::Context(n) => {
                let dict = reference_dictionary([preceding(n)?]);
                with_prefix(&dict, &frame.data, frame.raw_len as usize)
            }
            Encoding::Whole => zstd::bulk::decompress(&frame.data, frame.raw_len as usize),
            Encoding::Delta(r) => {
                let end = u64::from(r.start) + u64::from(r.count);
                if r.count == 0 || end > base.len() as u64 {
                    return Err(Error::DeltaReference {
                        id: frame.id,
                        start: u64::from(r.start),
                        end,
                        len: base.len(),
                    });
                }
                reference_size(frame.id, &base[r.start as usize..end as usize])?;
                let reuse = matches!(&self.current, Some((cur, _)) if *cur == r);
                if !reuse {
                    self.current = None; // free the old reference before reading the new one
                    self.current = Some((r, dictionary(r)?));
                }
                match &self.current {
                    Some((_, dict)) => with_prefix(dict, &frame.data, frame.raw_len as usize),
                    None => Err(std::io::Error::other("no reference")),
                }
            }
        }
        .map_err(|e| Error::TransitMalformed(format!("chunk {}: {e}", frame.id)))?;
        if raw.len() != frame.raw_len as usize {
            return Err(Error::TransitMalformed(format!(
                "chunk {}: {} bytes decoded, the frame says {}",
                frame.id,
                raw.len(),
                frame.raw_len
            )));
        }
        verify(&frame.id, &raw)?;
        Ok(raw)
    }
}

/// The bytes of a reference, refused above [`MAX_REFERENCE`] (counted only that far, so a
/// reference claiming the whole base costs nothing to refuse).
fn reference_size(id: Digest, chunks: &[ChunkRef]) -> Result<u64> {
    let mut bytes = 0u64;
    for c in chunks {
        bytes += u64::from(c.len);
        if bytes > MAX_REFERENCE {
            return Err(Error::DeltaReferenceTooLarge {
                id,
                limit: MAX_REFERENCE,
            });
        }
    }
    Ok(bytes)
}

fn with_prefix(prefix: &[u8], frame: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    let zerr = |code: usize| std::io::Error::other(zstd::zstd_safe::get_error_name(code));
    let mut dctx = zstd::zstd_safe::DCtx::try_create()
        .ok_or_else(|| std::io::Error::other("zstd could not create a decoder"))?;
    dctx.ref_prefix(prefix).map_err(zerr)?;
    let mut out = Vec::with_capacity(capacity);
    dctx.decompress(&mut out, frame).map_err(zerr)?;
    Ok(out)
}

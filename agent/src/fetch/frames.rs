//! Applying a window of frames: decode each (whole or delta), append it in order after the
//! local chunks before it, and sync. A delta that does not decode to its chunk is the frame's
//! fault, not the car's: it is asked for again whole.

use bytes::Bytes;
use cardeploy_chunks::transit::{DeltaDecoder, Encoding, Frame, reference_dictionary};
use cardeploy_chunks::{Assembler, ChunkIndex, Digest, Plan, Seed, Source};

use crate::Error;

/// What the car has locally while it applies a window.
pub(super) struct Local<'a> {
    pub index: &'a ChunkIndex,
    pub plan: &'a Plan,
    pub seeds: &'a [Seed],
    pub base: Option<&'a ChunkIndex>,
}

/// How far a window got.
pub(super) enum Applied {
    All,
    /// The frame at `at` is a delta that did not decode to its chunk: ask for it whole.
    Again {
        at: usize,
        why: String,
    },
}

/// Whether a decoding error is the frame's fault (a bad delta), as opposed to the car's own
/// seeds or disk.
fn frame_fault(e: &cardeploy_chunks::Error) -> bool {
    use cardeploy_chunks::Error as E;
    matches!(
        e,
        E::ChunkDigest { .. }
            | E::TransitMalformed(_)
            | E::DeltaReference { .. }
            | E::DeltaReferenceTooLarge { .. }
    )
}

/// Decode `frames` (one per `window` entry) and append them in order with every local chunk
/// before them — so a context frame finds the bytes before it in the partial file — then sync.
pub(super) fn apply(
    asm: &mut Assembler,
    decoder: &mut DeltaDecoder,
    local: Local<'_>,
    window: &[(usize, Digest, u32)],
    frames: &[Bytes],
) -> Result<Applied, Error> {
    let Local {
        index,
        plan,
        seeds,
        base,
    } = local;
    for (at, (bytes, (pos, want, len))) in frames.iter().zip(window).enumerate() {
        append_until(asm, index, plan, seeds, *pos)?;
        let frame = Frame::decode(bytes)?;
        frame.expect(want, *len)?;
        let delta = !matches!(frame.encoding, Encoding::Whole);
        if matches!(frame.encoding, Encoding::Delta(_)) && base.is_none() {
            return Err(Error::TwinAnswer(format!(
                "chunk {} came as a delta, but no base was offered",
                frame.id
            )));
        }
        let decoded = decoder.decode(
            &frame,
            base.map_or(&[][..], |b| &b.chunks),
            |r| {
                let Some(b) = base else {
                    return Err(cardeploy_chunks::Error::Unplanned(frame.id));
                };
                let range = &b.chunks[r.start as usize..(r.start + r.count) as usize];
                let mut parts = Vec::with_capacity(range.len());
                for c in range {
                    parts.push(read_seed(seeds, &c.id)?);
                }
                Ok(reference_dictionary(parts))
            },
            |n| asm.preceding(n),
        );
        match decoded {
            Ok(raw) => asm.append(&frame.id, &raw)?,
            Err(e) if delta && frame_fault(&e) => {
                return Ok(Applied::Again {
                    at,
                    why: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    asm.sync()?;
    Ok(Applied::All)
}

/// Append the local chunks before position `upto`: from the partial file itself or a seed.
/// Fetched chunks are appended as they are decoded; meeting one here means it never arrived.
pub(super) fn append_until(
    asm: &mut Assembler,
    index: &ChunkIndex,
    plan: &Plan,
    seeds: &[Seed],
    upto: usize,
) -> Result<(), Error> {
    while asm.next() < upto {
        let p = asm.next();
        let c = index.chunks[p];
        let data = match plan.sources[p] {
            Source::Fetch => {
                return Err(Error::TwinAnswer(format!(
                    "chunk {} at position {p} never arrived",
                    c.id
                )));
            }
            Source::Local => asm.read_local(&c.id)?,
            Source::Seed { seed } => seeds[seed].read(&c.id)?,
            Source::Store => return Err(cardeploy_chunks::Error::Unplanned(c.id).into()),
        };
        asm.append(&c.id, &data)?;
    }
    Ok(())
}

fn read_seed(seeds: &[Seed], id: &Digest) -> Result<Vec<u8>, cardeploy_chunks::Error> {
    match seeds.iter().find(|s| s.contains(id)) {
        Some(seed) => seed.read(id),
        None => Err(cardeploy_chunks::Error::Unplanned(*id)),
    }
}

use std::fs;

use crate::transit::{
    DeltaDecoder, DeltaEncoder, Encoding, Frame, ReferencePlanner, reference_dictionary,
};
use crate::*;

const SMALL: Params = Params {
    min: 1024,
    avg: 4096,
    max: 16384,
};

/// Pseudo-random but compressible bytes (words from a small vocabulary), like real files.
fn corpus(seed: u64, len: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"alpha ", b"beta ", b"gamma\n", b"delta ", b"car ", b"twin ", b"slot\n", b"0x1f ",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        if rng.u8(..) < 20 {
            out.push(rng.u8(..));
        } else {
            out.extend_from_slice(words[rng.usize(..words.len())]);
        }
    }
    out.truncate(len);
    out
}

/// `old` with a few edits: bytes changed in place, an insertion, a deletion.
fn edited(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    for at in [1000, 50_000, 120_000] {
        new[at] ^= 0x55;
    }
    new.splice(70_000..70_000, corpus(99, 3000));
    new.drain(150_000..152_000);
    new
}

#[test]
fn index_round_trips_and_is_content_addressed() {
    let data = corpus(1, 200_000);
    let index = chunk_bytes(&data, SMALL);
    assert_eq!(index.size, 200_000);
    assert_eq!(index.artifact, Digest::of(&data));
    let bytes = index.encode();
    let back = ChunkIndex::decode_expecting(&bytes, &index.id(), 1 << 30).unwrap();
    assert_eq!(back, index);
}

#[test]
fn truncated_index_is_refused() {
    let index = chunk_bytes(&corpus(1, 100_000), SMALL);
    let bytes = index.encode();
    let err = ChunkIndex::decode(&bytes[..bytes.len() - 10], 1 << 30).unwrap_err();
    assert!(matches!(err, Error::IndexMalformed(_)), "{err}");
}

#[test]
fn reordered_index_is_refused_by_digest_and_by_artifact_digest() {
    let data = corpus(1, 100_000);
    let index = chunk_bytes(&data, SMALL);
    let mut reordered = index.clone();
    reordered.chunks.swap(0, 1);
    let err = ChunkIndex::decode_expecting(&reordered.encode(), &index.id(), 1 << 30).unwrap_err();
    assert!(matches!(err, Error::IndexDigest { .. }), "{err}");

    // Even when it is asked for under its own id, assembly refuses the result.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    chunk_reader(&data[..], SMALL, |c| store.put_raw(&c.id, c.data)).unwrap();
    let out = dir.path().join("out.img");
    let err = assemble(&reordered, &store, &[], &out, |_| {}).unwrap_err();
    assert!(matches!(err, Error::ArtifactDigest { .. }), "{err}");
    assert!(!out.exists());
    assert!(!dir.path().join("out.img.partial").exists());
}

#[test]
fn index_claiming_a_size_beyond_the_limit_is_refused() {
    let index = chunk_bytes(&corpus(1, 100_000), SMALL);
    let err = ChunkIndex::decode(&index.encode(), 50_000).unwrap_err();
    assert!(
        matches!(
            err,
            Error::IndexTooLarge {
                size: 100_000,
                limit: 50_000
            }
        ),
        "{err}"
    );
}

/// A valid index of `size` bytes in chunks of the default average, with made-up chunk ids (no
/// chunk data is needed to test the index itself).
pub(crate) fn synthetic_index(size: u64) -> ChunkIndex {
    let avg = u64::from(Params::DEFAULT.avg);
    let chunks = (0..size.div_ceil(avg))
        .map(|i| ChunkRef {
            id: Digest::of(&i.to_le_bytes()),
            len: u32::try_from(avg.min(size - i * avg)).unwrap(),
        })
        .collect();
    ChunkIndex {
        params: Params::DEFAULT,
        size,
        artifact: Digest::of(b"sixteen gibibytes"),
        chunks,
    }
}

#[test]
fn an_index_of_a_16_gib_artifact_decodes_and_its_length_is_known_from_its_header() {
    let size = 16u64 << 30;
    let index = synthetic_index(size);
    let bytes = index.encode();
    assert!(bytes.len() > 9 << 20, "{} bytes", bytes.len());
    assert_eq!(
        ChunkIndex::encoded_len(&bytes[..INDEX_HEADER_BYTES], size).unwrap(),
        bytes.len() as u64
    );
    let back = ChunkIndex::decode_expecting(&bytes, &index.id(), size).unwrap();
    assert_eq!(back.chunks.len(), 262_144);
    // One byte less allowed and the header alone refuses it.
    let err = ChunkIndex::encoded_len(&bytes[..INDEX_HEADER_BYTES], size - 1).unwrap_err();
    assert!(matches!(err, Error::IndexTooLarge { .. }), "{err}");
}

#[test]
fn a_header_whose_chunk_count_cannot_make_its_size_is_refused() {
    let index = chunk_bytes(&corpus(1, 100_000), SMALL);
    let mut bytes = index.encode();
    // More chunks than 100,000 bytes can hold at 1 KiB minimum: a header that would make a
    // receiver read 36 bytes per claimed chunk.
    bytes[60..64].copy_from_slice(&1_000_000u32.to_le_bytes());
    let err = ChunkIndex::encoded_len(&bytes, 1 << 30).unwrap_err();
    assert!(matches!(err, Error::IndexMalformed(_)), "{err}");
    bytes[60..64].copy_from_slice(&1u32.to_le_bytes());
    let err = ChunkIndex::encoded_len(&bytes, 1 << 30).unwrap_err();
    assert!(matches!(err, Error::IndexMalformed(_)), "{err}");
}

#[test]
fn index_with_lengths_that_do_not_add_up_is_refused() {
    let mut index = chunk_bytes(&corpus(1, 100_000), SMALL);
    index.size += 1;
    let err = ChunkIndex::decode(&index.encode(), 1 << 30).unwrap_err();
    assert!(matches!(err, Error::IndexMalformed(_)), "{err}");
}

#[test]
fn store_verifies_every_read_and_moves_corrupt_chunks_aside() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = corpus(2, 5000);
    let id = Digest::of(&data);
    store.put_raw(&id, &data).unwrap();
    store.sync().unwrap();
    assert_eq!(store.get(&id).unwrap(), data);

    // Wrong bytes under a name are refused at the door.
    let err = store.put_raw(&Digest::of(b"other"), &data).unwrap_err();
    assert!(matches!(err, Error::ChunkDigest { .. }), "{err}");

    // A chunk damaged on disk is detected, moved aside, and is then missing (fetched again).
    let path = dir
        .path()
        .join("chunks")
        .join(&id.hex()[..2])
        .join(id.hex());
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let err = store.get(&id).unwrap_err();
    assert!(matches!(err, Error::StoreCorrupt { .. }), "{err}");
    assert!(!store.has(&id));
    assert!(dir.path().join("corrupt").join(id.hex()).exists());
}

#[test]
fn leftover_temp_files_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path()).unwrap();
    fs::write(dir.path().join("tmp").join("123.half-written"), b"x").unwrap();
    Store::open(dir.path()).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
}

#[test]
fn gc_removes_exactly_the_chunks_no_kept_index_needs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = corpus(3, 200_000);
    let b = edited(&a);
    let ia = chunk_reader(&a[..], SMALL, |c| store.put_raw(&c.id, c.data)).unwrap();
    let ib = chunk_reader(&b[..], SMALL, |c| store.put_raw(&c.id, c.data)).unwrap();
    store.keep("a", &store.put_index(&ia).unwrap()).unwrap();
    store.keep("b", &store.put_index(&ib).unwrap()).unwrap();
    let counts = store.refcounts(1 << 30).unwrap();
    assert!(counts.values().any(|&n| n == 2), "a and b share chunks");
    assert_eq!(store.gc(1 << 30).unwrap().chunks, 0);

    store.unkeep("a").unwrap();
    let removed = store.gc(1 << 30).unwrap();
    let only_a = ia
        .chunks
        .iter()
        .filter(|c| !ib.chunks.iter().any(|d| d.id == c.id))
        .count();
    assert_eq!(removed.chunks as usize, only_a);
    assert!(ib.chunks.iter().all(|c| store.has(&c.id)));
    assert!(!store.has_index(&ia.id()));
}

/// Set a stored file's modification time `secs` into the past.
fn age_file(path: &std::path::Path, secs: u64) {
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(then)
        .unwrap();
}

fn chunk_file(store: &Store, id: &Digest) -> std::path::PathBuf {
    let hex = id.hex();
    store
        .root()
        .unwrap()
        .join("chunks")
        .join(&hex[..2])
        .join(hex)
}

#[test]
fn gc_with_a_grace_period_spares_what_was_stored_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let day = std::time::Duration::from_secs(86_400);
    let a = corpus(5, 100_000);
    let ia = chunk_reader(&a[..], SMALL, |c| store.put_raw(&c.id, c.data)).unwrap();
    let index = store.put_index(&ia).unwrap();
    // Nothing kept: everything is garbage, but all of it is fresh.
    let removed = store.gc_older_than(1 << 30, day).unwrap();
    assert_eq!(removed.chunks, 0);
    assert!(store.has_index(&index));

    let (old, fresh) = ia.chunks.split_at(ia.chunks.len() / 2);
    let old_only: std::collections::HashSet<_> = old
        .iter()
        .filter(|c| !fresh.iter().any(|f| f.id == c.id))
        .map(|c| c.id)
        .collect();
    for id in &old_only {
        age_file(&chunk_file(&store, id), 2 * 86_400);
    }
    let removed = store.gc_older_than(1 << 30, day).unwrap();
    assert_eq!(removed.chunks as usize, old_only.len());
    assert!(old_only.iter().all(|id| !store.has(id)));
    assert!(fresh.iter().all(|c| store.has(&c.id)));
    assert!(store.has_index(&index), "the index is fresh");

    age_file(
        &store.root().unwrap().join("indexes").join(index.hex()),
        2 * 86_400,
    );
    store.gc_older_than(1 << 30, day).unwrap();
    assert!(!store.has_index(&index));
}

#[test]
fn a_chunk_held_or_stored_again_is_young_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let day = std::time::Duration::from_secs(86_400);
    let data = corpus(6, 5000);
    let id = Digest::of(&data);
    let frame = zstd::bulk::compress(&data, 3).unwrap();
    assert!(!store.hold(&id, day).unwrap());
    assert_eq!(store.put_compressed_durable(&id, &frame).unwrap(), data);
    let path = chunk_file(&store, &id);

    age_file(&path, 2 * 86_400);
    assert!(store.hold(&id, day).unwrap());
    assert_eq!(store.gc_older_than(1 << 30, day).unwrap().chunks, 0);

    age_file(&path, 2 * 86_400);
    store.put_compressed_durable(&id, &frame).unwrap();
    assert_eq!(store.gc_older_than(1 << 30, day).unwrap().chunks, 0);

    // Held at a quarter of the grace period: still young enough, left as it is.
    age_file(&path, 86_400 / 4);
    let before = fs::metadata(&path).unwrap().modified().unwrap();
    assert!(store.hold(&id, day).unwrap());
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), before);

    let wrong = zstd::bulk::compress(b"other bytes", 3).unwrap();
    assert!(matches!(
        store.put_compressed_durable(&id, &wrong),
        Err(Error::ChunkDigest { .. })
    ));
}

#[test]
fn a_durable_index_put_stores_it_and_refreshes_a_stored_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = corpus(7, 50_000);
    let ia = chunk_reader(&a[..], SMALL, |c| store.put_raw(&c.id, c.data)).unwrap();
    let id = store.put_index_durable(&ia).unwrap();
    assert_eq!(store.get_index(&id, 1 << 30).unwrap(), ia);
    let path = store.root().unwrap().join("indexes").join(id.hex());
    age_file(&path, 2 * 86_400);
    let aged = store.index_modified(&id).unwrap();
    store.put_index_durable(&ia).unwrap();
    assert!(store.index_modified(&id).unwrap() > aged);
}

#[test]
fn plan_takes_from_store_then_seed_then_network() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let old = corpus(4, 200_000);
    let new = edited(&old);
    let seed_path = dir.path().join("slot-a.img");
    fs::write(&seed_path, &old).unwrap();
    let seed = Seed::scan(&seed_path, SMALL).unwrap();
    let target = chunk_bytes(&new, SMALL);
    let plan = Plan::new(&target, &store, std::slice::from_ref(&seed));
    let s = plan.stats;
    assert_eq!(s.planned_bytes, new.len() as u64);
    assert!(s.seed_bytes > s.planned_bytes / 2, "{s:?}");
    assert!(
        s.fetch_bytes > 0 && s.fetch_bytes < s.planned_bytes / 2,
        "{s:?}"
    );
    assert_eq!(s.store_bytes, 0);

    let windows = plan.windows(2, 1 << 20);
    assert_eq!(
        windows.iter().map(|w| w.len()).sum::<usize>(),
        plan.missing().len()
    );
    assert!(windows.iter().all(|w| w.len() <= 2));
}

#[test]
fn a_seed_that_changes_under_us_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let seed_path = dir.path().join("slot-a.img");
    let old = corpus(5, 100_000);
    fs::write(&seed_path, &old).unwrap();
    let seed = Seed::scan(&seed_path, SMALL).unwrap();
    let first = seed.index().chunks[0].id;
    assert!(seed.read(&first).is_ok());
    let mut changed = old.clone();
    changed[10] ^= 1;
    fs::write(&seed_path, &changed).unwrap();
    let err = seed.read(&first).unwrap_err();
    assert!(matches!(err, Error::SeedChanged { offset: 0, .. }), "{err}");
}

#[test]
fn deltas_against_the_base_are_small_and_exact() {
    let old = corpus(6, 300_000);
    let new = edited(&old);
    let base = chunk_bytes(&old, SMALL);
    let target = chunk_bytes(&new, SMALL);
    let base_chunks: Vec<Vec<u8>> = {
        let mut v = Vec::new();
        chunk_reader(&old[..], SMALL, |c| {
            v.push(c.data.to_vec());
            Ok(())
        })
        .unwrap();
        v
    };
    let planner = ReferencePlanner::new(&target, &base, transit::MAX_REFERENCE);
    let in_base: std::collections::HashSet<_> = base.chunks.iter().map(|c| c.id).collect();
    let offsets = target.offsets();
    let mut enc = DeltaEncoder::new(19);
    let mut dec = DeltaDecoder::new();
    let (mut delta_bytes, mut whole_bytes) = (0, 0);
    for (i, c) in target.chunks.iter().enumerate() {
        if in_base.contains(&c.id) {
            continue;
        }
        let raw = &new[offsets[i] as usize..offsets[i + 1] as usize];
        let r = planner.reference(i).unwrap();
        let dict = || {
            Ok(reference_dictionary(
                base_chunks[r.start as usize..(r.start + r.count) as usize]
                    .iter()
                    .cloned(),
            ))
        };
        let frame = enc.delta(c.id, raw, r, dict).unwrap();
        let wire = Frame::decode(&frame.encode()).unwrap();
        assert_eq!(wire, frame);
        let back = dec
            .decode(
                &wire,
                &base.chunks,
                |r| {
                    Ok(reference_dictionary(
                        base_chunks[r.start as usize..(r.start + r.count) as usize]
                            .iter()
                            .cloned(),
                    ))
                },
                |_| unreachable!(),
            )
            .unwrap();
        assert_eq!(back, raw);
        delta_bytes += wire.data.len();
        whole_bytes += zstd::bulk::compress(raw, 19).unwrap().len();
    }
    assert!(whole_bytes > 0);
    // Three flipped bytes, 3000 inserted and 2000 removed: the deltas are a small fraction.
    assert!(
        delta_bytes * 4 < whole_bytes,
        "delta {delta_bytes} vs whole {whole_bytes}"
    );
}

#[test]
fn a_tampered_frame_is_refused() {
    let data = corpus(7, 10_000);
    let id = Digest::of(&data);
    let z = zstd::bulk::compress(&corpus(8, 10_000), 3).unwrap();
    let frame = transit::whole(id, 10_000, z);
    let err = DeltaDecoder::new()
        .decode(&frame, &[], |_| unreachable!(), |_| unreachable!())
        .unwrap_err();
    assert!(matches!(err, Error::ChunkDigest { .. }), "{err}");

    let mut delta = frame.clone();
    delta.encoding = Encoding::Delta(transit::Reference {
        start: 5,
        count: 10,
    });
    let err = DeltaDecoder::new()
        .decode(
            &delta,
            &base_of(12, 1 << 16),
            |_| unreachable!(),
            |_| unreachable!(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DeltaReference {
                start: 5,
                end: 15,
                len: 12,
                ..
            }
        ),
        "{err}"
    );

    let err = Frame::decode(b"X0123").unwrap_err();
    assert!(matches!(err, Error::TransitMalformed(_)), "{err}");
}

#[test]
fn assembly_streams_from_store_and_seed_and_checks_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let old = corpus(9, 200_000);
    let new = edited(&old);
    let seed_path = dir.path().join("slot-a.img");
    fs::write(&seed_path, &old).unwrap();
    let seeds = [Seed::scan(&seed_path, SMALL).unwrap()];
    let target = chunk_bytes(&new, SMALL);
    let offsets = target.offsets();
    let plan = Plan::new(&target, &store, &seeds);
    for &(i, id, _) in plan.missing() {
        store
            .put_raw(&id, &new[offsets[i] as usize..offsets[i + 1] as usize])
            .unwrap();
    }
    let out = dir.path().join("new.img");
    let mut last = 0;
    let done = assemble(&target, &store, &seeds, &out, |n| last = n).unwrap();
    assert_eq!(done.size, new.len() as u64);
    assert_eq!(last, new.len() as u64);
    assert_eq!(fs::read(&out).unwrap(), new);
}

#[test]
fn assembly_without_a_source_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let target = chunk_bytes(&corpus(10, 50_000), SMALL);
    let out = dir.path().join("x.img");
    let err = assemble(&target, &store, &[], &out, |_| {}).unwrap_err();
    assert!(matches!(err, Error::Unplanned(_)), "{err}");
    assert!(!out.exists());
    assert!(!dir.path().join("x.img.partial").exists());
}

#[test]
fn an_interrupted_assembly_resumes_after_the_last_good_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(11, 300_000);
    let target = chunk_bytes(&data, SMALL);
    let offsets = target.offsets();
    let out = dir.path().join("a.img");
    let mut asm = Assembler::open(&target, &out).unwrap();
    for i in 0..10 {
        let raw = &data[offsets[i] as usize..offsets[i + 1] as usize];
        asm.append(&target.chunks[i].id, raw).unwrap();
    }
    asm.sync().unwrap();
    drop(asm);
    // A power cut left a torn, unsynced tail: half of chunk 10 and garbage.
    let partial = dir.path().join("a.img.partial");
    let mut bytes = fs::read(&partial).unwrap();
    bytes.extend_from_slice(&data[offsets[10] as usize..offsets[10] as usize + 500]);
    bytes.extend_from_slice(&[0u8; 4000]);
    fs::write(&partial, bytes).unwrap();

    let mut asm = Assembler::open(&target, &out).unwrap();
    assert_eq!(asm.next(), 10);
    assert_eq!(asm.written_bytes(), offsets[10]);
    // Out-of-order appends are refused.
    let err = asm.append(&target.chunks[11].id, b"x").unwrap_err();
    assert!(matches!(err, Error::IndexMalformed(_)), "{err}");
    for i in 10..target.chunks.len() {
        let raw = &data[offsets[i] as usize..offsets[i + 1] as usize];
        asm.append(&target.chunks[i].id, raw).unwrap();
    }
    let done = asm.finish().unwrap();
    assert_eq!(done.digest, Digest::of(&data));
    assert_eq!(fs::read(&out).unwrap(), data);
    assert!(!partial.exists());
}

#[test]
fn new_content_compresses_against_the_bytes_before_it() {
    // Two chunks of fresh content that resemble each other, like two new files of one package.
    let first = corpus(21, 60_000);
    let mut second = first.clone();
    second[100] ^= 1;
    let id = Digest::of(&second);
    let enc = DeltaEncoder::new(19);
    let frame = enc.context(id, &second, &first).unwrap();
    let wire = Frame::decode(&frame.encode()).unwrap();
    assert_eq!(wire.encoding, Encoding::Context(60_000));
    let alone = zstd::bulk::compress(&second, 19).unwrap().len();
    assert!(
        wire.data.len() * 10 < alone,
        "{} vs {alone}",
        wire.data.len()
    );
    let back = DeltaDecoder::new()
        .decode(
            &wire,
            &[],
            |_| unreachable!(),
            |n| {
                assert_eq!(n, 60_000);
                Ok(first.clone())
            },
        )
        .unwrap();
    assert_eq!(back, second);
}

/// `n` base chunks of `len` bytes each (their ids do not matter to a reference check).
fn base_of(n: usize, len: u32) -> Vec<crate::ChunkRef> {
    (0..n)
        .map(|i| crate::ChunkRef {
            id: Digest::of(&i.to_le_bytes()),
            len,
        })
        .collect()
}

#[test]
fn a_delta_against_more_than_the_reference_limit_is_refused_before_reading_the_base() {
    let raw = corpus(3, 1000);
    let frame = Frame {
        id: Digest::of(&raw),
        raw_len: 1000,
        encoding: Encoding::Delta(transit::Reference {
            start: 0,
            count: 40,
        }),
        data: zstd::bulk::compress(&raw, 3).unwrap(),
    };
    // 40 chunks of 256 KiB: 10 MiB, above the 8 MiB limit; the dictionary is never asked for.
    let err = DeltaDecoder::new()
        .decode(
            &frame,
            &base_of(40, 256 << 10),
            |_| unreachable!(),
            |_| unreachable!(),
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::DeltaReferenceTooLarge { limit, .. } if limit == transit::MAX_REFERENCE),
        "{err}"
    );
}

/// An index of chunks with the given ids and lengths (the planner looks at nothing else).
fn index_of(chunks: &[(u64, u32)]) -> ChunkIndex {
    ChunkIndex {
        params: Params::DEFAULT,
        size: chunks.iter().map(|&(_, len)| u64::from(len)).sum(),
        artifact: Digest::of(b"not read"),
        chunks: chunks
            .iter()
            .map(|&(id, len)| crate::ChunkRef {
                id: Digest::of(&id.to_le_bytes()),
                len,
            })
            .collect(),
    }
}

#[test]
fn no_reference_is_larger_than_the_limit_the_car_enforces() {
    // Chunk lengths across FastCDC's whole range and gaps far larger than the limit, so the
    // window of a large gap rarely starts on a chunk boundary: the case that once produced
    // references up to one chunk over the limit, which the car refuses.
    for seed in 0..200 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let limit = u64::from(rng.u32(1..4)) << 20;
        let mut len = || rng.u32(16 << 10..=256 << 10);
        let base: Vec<(u64, u32)> = (0..300).map(|i| (i, len())).collect();
        let mut rng = fastrand::Rng::with_seed(seed + 1000);
        let target: Vec<(u64, u32)> = base
            .iter()
            .map(|&(id, len)| {
                if rng.u8(..) < 20 {
                    (id, len) // shared with the base
                } else {
                    (id + 10_000, rng.u32(16 << 10..=256 << 10))
                }
            })
            .collect();
        let (base, target) = (index_of(&base), index_of(&target));
        let planner = ReferencePlanner::new(&target, &base, limit);
        for i in 0..target.chunks.len() {
            let r = planner.reference(i).unwrap();
            let chunks = &base.chunks[r.start as usize..(r.start + r.count) as usize];
            assert!(r.count >= 1);
            let bytes: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
            assert!(
                bytes <= limit,
                "seed {seed}, chunk {i}: reference of {bytes} bytes, limit {limit}"
            );
        }
    }
}

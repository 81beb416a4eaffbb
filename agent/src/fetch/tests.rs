use cardeploy_chunks::transit::{DeltaEncoder, whole};
use cardeploy_chunks::{ChunkIndex, ChunkRef, Params};

use super::*;

fn text(seed: u64, len: usize) -> Vec<u8> {
    let words: [&[u8]; 4] = [b"slot ", b"twin ", b"car\n", b"ecu "];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 4) as usize]);
    }
    out.truncate(len);
    out
}

#[test]
fn a_delta_that_fails_on_the_car_is_asked_for_again_and_the_window_goes_on_from_it() {
    let a = text(1, 64 << 10);
    let mut x = a.clone();
    x[1000] ^= 0x20;
    let data = [a.clone(), x.clone()].concat();
    let index = ChunkIndex {
        params: Params::DEFAULT,
        size: data.len() as u64,
        artifact: Digest::of(&data),
        chunks: [&a, &x]
            .iter()
            .map(|c| ChunkRef {
                id: Digest::of(c),
                len: c.len() as u32,
            })
            .collect(),
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("app");
    let mut asm = Assembler::open(&index, &out).unwrap();
    let plan = Plan::resuming(&index, 0, None, &[]);
    let window: Vec<(usize, Digest, u32)> = index
        .chunks
        .iter()
        .enumerate()
        .map(|(p, c)| (p, c.id, c.len))
        .collect();
    let whole_frame = |c: &[u8]| {
        Bytes::from(
            whole(
                Digest::of(c),
                c.len() as u32,
                zstd::bulk::compress(c, 3).unwrap(),
            )
            .encode(),
        )
    };
    // X as a delta against the bytes before it, damaged on the way.
    let mut context = DeltaEncoder::new(3)
        .context(Digest::of(&x), &x, &a)
        .unwrap();
    let middle = context.data.len() / 2;
    context.data[middle] ^= 0xff;
    let frames = vec![whole_frame(&a), Bytes::from(context.encode())];
    let mut decoder = DeltaDecoder::new();
    let local = || Local {
        index: &index,
        plan: &plan,
        seeds: &[],
        base: None,
    };
    match apply(&mut asm, &mut decoder, local(), &window, &frames).unwrap() {
        Applied::Again { at, .. } => assert_eq!(at, 1),
        Applied::All => panic!("a damaged delta was taken"),
    }
    assert_eq!(asm.next(), 1, "the chunk before it is in place");
    // The same chunk, whole: the window ends and the artifact verifies.
    let again = [whole_frame(&x)];
    assert!(matches!(
        apply(&mut asm, &mut decoder, local(), &window[1..], &again).unwrap(),
        Applied::All
    ));
    asm.finish().unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[test]
fn a_whole_frame_that_does_not_verify_is_an_error_not_a_retry() {
    let a = text(2, 20 << 10);
    let index = ChunkIndex {
        params: Params::DEFAULT,
        size: a.len() as u64,
        artifact: Digest::of(&a),
        chunks: vec![ChunkRef {
            id: Digest::of(&a),
            len: a.len() as u32,
        }],
    };
    let dir = tempfile::tempdir().unwrap();
    let mut asm = Assembler::open(&index, &dir.path().join("app")).unwrap();
    let plan = Plan::resuming(&index, 0, None, &[]);
    let wrong = text(4, a.len());
    let frame = whole(
        Digest::of(&a),
        a.len() as u32,
        zstd::bulk::compress(&wrong, 3).unwrap(),
    );
    let result = apply(
        &mut asm,
        &mut DeltaDecoder::new(),
        Local {
            index: &index,
            plan: &plan,
            seeds: &[],
            base: None,
        },
        &[(0, Digest::of(&a), a.len() as u32)],
        &[Bytes::from(frame.encode())],
    );
    assert!(
        matches!(
            result,
            Err(Error::Chunks(cardeploy_chunks::Error::ChunkDigest { .. }))
        ),
        "{:?}",
        result.err()
    );
}

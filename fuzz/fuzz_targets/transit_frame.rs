//! A transit frame from the twin: parsing and decoding (whole, delta against a reference,
//! context) never panic and never yield bytes that do not hash to the frame's id.
#![no_main]

use cardeploy_chunks::{ChunkRef, Digest};
use cardeploy_chunks::transit::{DeltaDecoder, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode(data) else {
        return;
    };
    assert_eq!(Frame::decode(&frame.encode()).ok(), Some(frame.clone()));
    let reference = b"cdref\0\0\0 some base bytes the car holds".to_vec();
    // A base of four 4 MiB chunks: references of one or two pass the size check, more do not.
    let base: Vec<ChunkRef> = (0u8..4)
        .map(|i| ChunkRef {
            id: Digest::of(&[i]),
            len: 4 << 20,
        })
        .collect();
    let decoded = DeltaDecoder::new().decode(
        &frame,
        &base,
        |_| Ok(reference.clone()),
        |n| Ok(vec![0x5a; n.min(4096) as usize]),
    );
    if let Ok(raw) = decoded {
        assert_eq!(Digest::of(&raw), frame.id);
        assert_eq!(raw.len(), frame.raw_len as usize);
    }
});

//! A chunk index from the network or the disk: decoding never panics, and whatever decodes
//! encodes back to the same bytes (the index is content-addressed, so that must hold).
#![no_main]

use cardeploy_chunks::ChunkIndex;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = ChunkIndex::decode(data, 1 << 40) {
        assert_eq!(index.encode(), data);
        assert_eq!(index.offsets().last().copied(), Some(index.size));
    }
});

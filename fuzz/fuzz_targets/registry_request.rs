//! What any process on the car can send the car's registry, and the manifests it parses:
//! nothing panics, and a range it answers with lies inside the blob.
#![no_main]

use cardeploy_registry::{manifest, request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let _ = request::route(&request::decode_path(&text));
    let size = u64::from(size) * 1000;
    if let request::Span::Part { start, end } = request::span(Some(&text), size) {
        assert!(start <= end && end < size, "{text}: {start}-{end} of {size}");
    }
    let _ = request::accepts(text.split('\n'), manifest::OCI_MANIFEST);
    let _ = manifest::parse(rest);
});

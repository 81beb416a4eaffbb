//! A signed envelope from the network: parsing and verification never panic, and nothing
//! verifies against a key that signed nothing.
#![no_main]

use cardeploy_release::{Envelope, PublicKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::from_json(data) else {
        return;
    };
    let _ = Envelope::from_json(&envelope.to_json()).map(|back| assert_eq!(back, envelope));
    // A fixed key nobody holds the private half of: no input may verify against it.
    let key = PublicKey::from_bytes([7u8; 32]);
    assert!(envelope.verify(&envelope.payload_type, &[key], 1).is_err());
});

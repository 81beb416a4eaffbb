//! Signing and key generation (feature `sign`): for the pipeline tool and tests, never the car.

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::{Envelope, Error, PublicKey, Signature, pae};

/// An ed25519 private key (PKCS#8 v2, as ring writes it).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({:?})", self.public().id())
    }
}

impl SigningKey {
    pub fn generate() -> Result<Self, Error> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| Error::Key("no randomness to generate a key".into()))?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    /// A key from a fixed seed: reproducible keys for checked-in test fixtures only.
    pub fn from_seed(seed: [u8; 32]) -> Result<Self, Error> {
        // ring builds PKCS#8 only for keys it generates; the v1 document for a seed is the fixed
        // 16-byte prefix of RFC 8410 followed by the seed.
        let mut pkcs8 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        pkcs8.extend_from_slice(&seed);
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|e| Error::Key(format!("bad seed: {e}")))?;
        Ok(Self { pair, pkcs8 })
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, Error> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| Error::Key(format!("not an ed25519 PKCS#8 key: {e}")))?;
        Ok(Self {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The PKCS#8 bytes, to be written with mode 0600.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public(&self) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey::from_bytes(bytes)
    }

    fn signature(&self, payload_type: &str, payload: &[u8]) -> Signature {
        Signature {
            keyid: self.public().id().to_string(),
            sig: self
                .pair
                .sign(&pae(payload_type, payload))
                .as_ref()
                .to_vec(),
        }
    }
}

/// An envelope over `payload` signed by each of `keys`.
pub fn sign(payload_type: &str, payload: &[u8], keys: &[&SigningKey]) -> Envelope {
    Envelope {
        payload_type: payload_type.to_owned(),
        payload: payload.to_vec(),
        signatures: keys
            .iter()
            .map(|k| k.signature(payload_type, payload))
            .collect(),
    }
}

impl Envelope {
    /// Add `key`'s signature (pipelines where each holder of a threshold signs in turn). A key
    /// that already signed is not added twice.
    pub fn add_signature(&mut self, key: &SigningKey) {
        let id = key.public().id().to_string();
        if self.signatures.iter().any(|s| s.keyid == id) {
            return;
        }
        let sig = key.signature(&self.payload_type, &self.payload);
        self.signatures.push(sig);
    }
}

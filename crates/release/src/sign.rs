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

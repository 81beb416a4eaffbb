use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;

/// A key's name: the sha256 of its raw 32-byte ed25519 public key, in hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    pub fn of(public: &[u8; 32]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, public);
        Self(crate::hex::encode(digest.as_ref()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", &self.0[..self.0.len().min(16)])
    }
}

/// An ed25519 public key as it appears in a root document: `{"ed25519": "<64 hex>"}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    #[serde(rename = "ed25519", with = "hex32")]
    bytes: [u8; 32],
}

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self { bytes }
    }

    pub fn id(&self) -> KeyId {
        KeyId::of(&self.bytes)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Whether `sig` is this key's ed25519 signature of `message`.
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.bytes)
            .verify(message, sig)
            .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({:?})", self.id())
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        super::parse_hex32(&text).map_err(serde::de::Error::custom)
    }
}

pub(crate) fn parse_hex32(text: &str) -> Result<[u8; 32], Error> {
    if text.len() != 64 {
        return Err(Error::Key(format!(
            "an ed25519 public key is 64 hex digits, not {}",
            text.len()
        )));
    }
    crate::hex::decode(text)
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or_else(|| Error::Key(format!("`{text}` is not hex")))
}

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::{Error, KeyId, PublicKey};

/// Largest envelope accepted, checked before parsing (V1).
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;
/// Most signatures one envelope may carry (V2).
pub const MAX_SIGNATURES: usize = 32;

/// A DSSE envelope: the payload exactly as signed, its type, and signatures over
/// [`pae`]`(payload_type, payload)`. JSON on the wire, payload and signatures base64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub signatures: Vec<Signature>,
}

/// One signature and the id of the key that claims it. Unknown key ids are allowed on the wire
/// (a document may be signed for several audiences) and simply never count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub keyid: String,
    pub sig: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope {
    #[serde(rename = "payloadType")]
    payload_type: String,
    payload: String,
    signatures: Vec<WireSignature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSignature {
    keyid: String,
    sig: String,
}

/// DSSE's pre-authentication encoding: what is actually signed. Binding the payload type into
/// the signed bytes is what stops a signature over one kind of document from passing for
/// another.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// A payload whose signatures met the threshold: the only way to get at a payload's bytes for
/// parsing is through [`Envelope::verify`].
#[derive(Debug)]
pub struct Verified<'a> {
    pub payload: &'a [u8],
    /// The distinct trusted keys whose signatures verified.
    pub signers: Vec<KeyId>,
}

impl Envelope {
    /// Parse an envelope from untrusted bytes (V1, V2).
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        // V1: the size is bounded before anything is parsed.
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(Error::TooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        // V2: exactly the DSSE fields, base64 that decodes, a bounded number of signatures.
        let wire: WireEnvelope =
            serde_json::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))?;
        Self::from_wire(wire)
    }

    fn from_wire(wire: WireEnvelope) -> Result<Self, Error> {
        if wire.signatures.len() > MAX_SIGNATURES {
            return Err(Error::Malformed(format!(
                "{} signatures, at most {MAX_SIGNATURES} are accepted",
                wire.signatures.len()
            )));
        }
        let b64 = |what: &str, text: &str| {
            STANDARD
                .decode(text)
                .map_err(|e| Error::Malformed(format!("{what} is not base64: {e}")))
        };
        let payload = b64("payload", &wire.payload)?;
        let signatures = wire
            .signatures
            .into_iter()
            .map(|s| {
                Ok(Signature {
                    sig: b64("a signature", &s.sig)?,
                    keyid: s.keyid,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            payload_type: wire.payload_type,
            payload,
            signatures,
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Plain strings and vectors: serialising cannot fail.
        serde_json::to_vec_pretty(&self.to_wire()).unwrap_or_default()
    }

    fn to_wire(&self) -> WireEnvelope {
        WireEnvelope {
            payload_type: self.payload_type.clone(),
            payload: STANDARD.encode(&self.payload),
            signatures: self
                .signatures
                .iter()
                .map(|s| WireSignature {
                    keyid: s.keyid.clone(),
                    sig: STANDARD.encode(&s.sig),
                })
                .collect(),
        }
    }

    /// Check the envelope against `keys` with a `threshold` (V3–V6) and hand out the payload.
    pub fn verify(
        &self,
        expected_type: &str,
        keys: &[PublicKey],
        threshold: usize,
    ) -> Result<Verified<'_>, Error> {
        // V3: a threshold of 0 would accept anything; one above the key count nothing.
        if threshold == 0 || threshold > keys.len() {
            return Err(Error::ImpossibleThreshold {
                threshold,
                keys: keys.len(),
            });
        }
        // V4: the payload type is the one the caller expects.
        if self.payload_type != expected_type {
            return Err(Error::PayloadType {
                expected: expected_type.to_owned(),
                found: self.payload_type.clone(),
            });
        }
        // V5: each signature by a trusted key over PAE(type, payload) counts, each key once.
        let message = pae(&self.payload_type, &self.payload);
        let mut signers = BTreeSet::new();
        for s in &self.signatures {
            let Some(key) = keys.iter().find(|k| k.id().as_str() == s.keyid) else {
                continue;
            };
            if key.verifies(&message, &s.sig) {
                signers.insert(key.id());
            }
        }
        // V6: enough distinct trusted keys.
        if signers.len() < threshold {
            return Err(Error::BelowThreshold {
                valid: signers.len(),
                threshold,
                seen: self.signatures.len(),
            });
        }
        Ok(Verified {
            payload: &self.payload,
            signers: signers.into_iter().collect(),
        })
    }
}

/// Envelopes nested in other messages (the desired state a car receives carries several) use the
/// same wire form and the same V2 checks; V1 is then the enclosing message's size limit.
impl Serialize for Envelope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_wire().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = WireEnvelope::deserialize(d)?;
        Self::from_wire(wire).map_err(serde::de::Error::custom)
    }
}

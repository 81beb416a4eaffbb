//! The root document: which keys may sign for which role, and with what threshold. The car pins
//! one root at installation; every later root must be signed by the threshold of the root it
//! replaces and by its own (steps R1–R6, docs/release-format.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Envelope, Error, KeyId, PublicKey};

/// Payload type of root documents.
pub const ROOT_TYPE: &str = "application/vnd.cardeploy.root+json";

/// The roles a root names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleName {
    Root,
    Release,
    Director,
}

/// Keys and threshold of one role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub keyids: Vec<KeyId>,
    pub threshold: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    pub root: Role,
    pub release: Role,
    pub director: Role,
}

/// The root document (the payload of a root envelope).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Starts at 1, grows by exactly one per rotation.
    pub version: u64,
    /// Unix seconds after which this root is no longer trusted.
    pub expires: u64,
    /// Every key once (S1: a key id listed twice is refused, not reduced to its last entry).
    #[serde(deserialize_with = "crate::shape::unique_keys")]
    pub keys: BTreeMap<KeyId, PublicKey>,
    pub roles: Roles,
}

impl Root {
    pub fn role(&self, name: RoleName) -> &Role {
        match name {
            RoleName::Root => &self.roles.root,
            RoleName::Release => &self.roles.release,
            RoleName::Director => &self.roles.director,
        }
    }

    /// The public keys of a role, in the order the role lists them.
    pub fn keys_of(&self, name: RoleName) -> Vec<PublicKey> {
        self.role(name)
            .keyids
            .iter()
            .filter_map(|id| self.keys.get(id).cloned())
            .collect()
    }

    /// R3: every key is named by its own id, every role names known keys (each once) and has a
    /// threshold it can meet.
    fn check(&self) -> Result<(), Error> {
        for (id, key) in &self.keys {
            if &key.id() != id {
                return Err(Error::Malformed(format!(
                    "root lists key {id} under an id that is not the sha256 of its public key"
                )));
            }
        }
        for (label, role) in [
            ("root", &self.roles.root),
            ("release", &self.roles.release),
            ("director", &self.roles.director),
        ] {
            let mut seen = std::collections::BTreeSet::new();
            for id in &role.keyids {
                if !self.keys.contains_key(id) {
                    return Err(Error::Malformed(format!(
                        "role {label} names key {id}, which the root does not list"
                    )));
                }
                if !seen.insert(id) {
                    return Err(Error::Malformed(format!(
                        "role {label} names key {id} twice"
                    )));
                }
            }
            if role.threshold == 0 || role.threshold > role.keyids.len() {
                return Err(Error::ImpossibleThreshold {
                    threshold: role.threshold,
                    keys: role.keyids.len(),
                });
            }
        }
        Ok(())
    }
}

/// A root the car trusts: pinned at installation or reached by verified rotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedRoot {
    root: Root,
}

fn parse(envelope: &[u8]) -> Result<(Envelope, Root), Error> {
    let env = Envelope::from_json(envelope)?;
    // The payload is parsed here only to learn which keys should have signed it; nothing in it
    // is used before the signatures below are checked.
    let root: Root = crate::shape::strict(&env.payload, "root")?;
    Ok((env, root))
}

fn not_expired(root: &Root, now: u64) -> Result<(), Error> {
    if now >= root.expires {
        return Err(Error::Expired {
            what: format!("root version {}", root.version),
            expires: root.expires,
            now,
        });
    }
    Ok(())
}

impl TrustedRoot {
    /// R1–R3: the root pinned at installation must be consistent and signed by its own root
    /// role's threshold. Whether it is still fresh is asked when it is used (R4, [`Self::fresh`]):
    /// a car whose pinned root has expired must still be able to rotate to a newer one.
    pub fn pinned(envelope: &[u8]) -> Result<Self, Error> {
        let (env, root) = parse(envelope)?;
        root.check()?; // R3
        env.verify(
            ROOT_TYPE,
            &root.keys_of(RoleName::Root),
            root.roles.root.threshold,
        )?; // R2
        Ok(Self { root })
    }

    /// R5–R6: a new root replaces this one only if its version is exactly one more, it is
    /// signed by this root's root-role threshold *and* its own, and it is consistent. Expiry is
    /// checked on the root in use (R4), not on the steps of a chain.
    pub fn rotate(&self, envelope: &[u8]) -> Result<Self, Error> {
        let (env, next) = parse(envelope)?;
        // The highest version has no successor: checked, never wrapped.
        if self.root.version.checked_add(1) != Some(next.version) {
            return Err(Error::RootVersion {
                have: self.root.version,
                got: next.version,
            });
        }
        next.check()?;
        // R5: the old threshold approves the change of keys...
        env.verify(
            ROOT_TYPE,
            &self.root.keys_of(RoleName::Root),
            self.root.roles.root.threshold,
        )?;
        // R6: ...and the new keys can use what they claim.
        env.verify(
            ROOT_TYPE,
            &next.keys_of(RoleName::Root),
            next.roles.root.threshold,
        )?;
        Ok(Self { root: next })
    }

    /// R4: this root may be used at `now` (freeze protection: an attacker replaying an old
    /// root cannot keep a car on it forever).
    pub fn fresh(&self, now: u64) -> Result<&Self, Error> {
        not_expired(&self.root, now)?;
        Ok(self)
    }

    /// The version of a root envelope, read without trusting it: enough to order a chain before
    /// verifying each step.
    pub fn peek_version(envelope: &[u8]) -> Result<u64, Error> {
        Ok(parse(envelope)?.1.version)
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// D4a: the scope of desired-state counters under this root — the director role's keys and
    /// threshold. A rotation that changes them starts a fresh scope, in which the car counts
    /// from nothing again (a leaked director key may have pushed the old one's counter out of
    /// reach).
    pub fn counter_scope(&self) -> String {
        let director = &self.root.roles.director;
        let mut ids: Vec<&str> = director.keyids.iter().map(KeyId::as_str).collect();
        ids.sort_unstable();
        crate::sha256_hex(format!("{}:{}", director.threshold, ids.join(",")).as_bytes())
    }

    /// Verify an envelope of `payload_type` signed by `role` under this root (V1–V6).
    pub fn verify<'a>(
        &self,
        role: RoleName,
        payload_type: &str,
        envelope: &'a Envelope,
    ) -> Result<crate::Verified<'a>, Error> {
        envelope.verify(
            payload_type,
            &self.root.keys_of(role),
            self.root.role(role).threshold,
        )
    }
}

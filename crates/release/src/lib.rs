//! Signed metadata for cardeploy (docs/release-format.md: the roles and the bytes): DSSE envelopes whose
//! payload travels exactly as it was signed, ed25519 keys (ring) named by the sha256 of their
//! public key, and k-of-n threshold verification. Verification is always compiled; signing and
//! key generation only with feature `sign`, which the car agent never enables.
//!
//! The step numbers in comments (`V1`…) are those of docs/release-format.md.
//! Tests: `cargo test -p cardeploy-release`.

mod documents;
mod envelope;
mod error;
pub mod hex;
mod key;
pub mod key_file;
mod root;
mod shape;
#[cfg(feature = "sign")]
mod sign;

pub use documents::{
    Artifact, ArtifactKind, CAR_REGISTRY, CarContext, CheckedRelease, CounterMark, DESIRED_TYPE,
    Desired, DowngradeOverride, Image, InstalledOs, MAX_CLOCK_SKEW_SECS, MAX_COUNTER,
    MAX_COUNTER_STEP, MAX_DESIRED_LIFETIME_SECS, OVERRIDE_TYPE, RELEASE_TYPE, Release, Workload,
    check_artifact, check_desired, check_line, check_release, check_repository, older, safe_name,
    sha256_hex, verify_release,
};
pub use envelope::{Envelope, MAX_ENVELOPE_BYTES, MAX_SIGNATURES, Signature, Verified, pae};
pub use error::Error;
pub use key::{KeyId, PublicKey};
pub use root::{ROOT_TYPE, Role, RoleName, Roles, Root, TrustedRoot};
#[cfg(feature = "sign")]
pub use sign::{SigningKey, sign};

/// Seconds since the Unix epoch: the clock that expiries and issue times are compared to. A clock
/// set before 1970 reads as 0, at which every issue time lies in the future and is refused.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;

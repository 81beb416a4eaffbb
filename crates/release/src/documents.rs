//! The release manifest (signed offline by the release role) and the desired state (signed per
//! car by the twin's director role), with the checks a car makes before acting (steps M1–M6 and
//! D1–D6, docs/release-format.md).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{Envelope, Error, RoleName, TrustedRoot};

pub const RELEASE_TYPE: &str = "application/vnd.cardeploy.release+json";
pub const DESIRED_TYPE: &str = "application/vnd.cardeploy.desired+json";
pub const OVERRIDE_TYPE: &str = "application/vnd.cardeploy.override+json";

/// What an artifact is, so the car knows what to do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactKind {
    RaucBundle,
    OciManifest,
    OciConfig,
    OciLayer,
    /// A Kubernetes manifest (YAML) the release applies; listed again under `workloads`.
    KubeManifest,
}

/// One artifact of a release, pinned by digest and size, fetched by chunk index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub kind: ArtifactKind,
    pub name: String,
    /// sha256 of the artifact, hex.
    pub digest: String,
    pub size: u64,
    /// sha256 of its chunk index (docs/delta.md), hex.
    pub index: String,
}

/// A Kubernetes manifest the release applies, pinned by digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub digest: String,
}

/// A container image the release carries, as the car's registry serves it: the repository
/// `registry.cardeploy.local/<name>`, whose image is the `oci-manifest` artifact `manifest`.
/// Workloads name it by that digest (`cardeploy release create` rewrites their references).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Repository name (the OCI distribution spec's grammar, [`check_repository`]).
    pub name: String,
    /// sha256 (hex) of the image manifest.
    pub manifest: String,
    /// The tag the image was built with, served too (for people; workloads use the digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// The host workloads name the car's registry by; k3s mirrors it to the agent's registry on
/// loopback (`/etc/rancher/k3s/registries.yaml`).
pub const CAR_REGISTRY: &str = "registry.cardeploy.local";

/// The release manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The release line; versions are monotonic within it.
    pub line: String,
    /// Semantic version.
    pub version: String,
    /// RAUC `compatible` of the hardware it is for.
    pub compatible: String,
    /// Unix seconds.
    pub created: u64,
    pub artifacts: Vec<Artifact>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Absent from releases without containers, so their bytes are as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
}

/// The desired state for one car.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    pub car_id: String,
    /// sha256 (hex) of the release manifest's payload bytes.
    pub release: String,
    /// Grows with every desired state for this car.
    pub counter: u64,
    pub issued: u64,
    pub expires: u64,
}

/// A root-signed permission to install an older version of a line (e.g. after a bad release).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DowngradeOverride {
    pub line: String,
    pub version: String,
    pub expires: u64,
}

/// A desired-state counter may grow by at most this much in one step (D4): a leaked director key
/// cannot push a car's counter out of reach in one document.
pub const MAX_COUNTER_STEP: u64 = 1 << 20;
/// No counter is above this (D4): whatever happens, the next one can always be written.
pub const MAX_COUNTER: u64 = 1 << 62;
/// How far in the future a desired state's `issued` may be by the car's clock (D5).
pub const MAX_CLOCK_SKEW_SECS: u64 = 3600;
/// The longest a desired state may be valid, `expires - issued` (D5): as long as the twin's
/// longest lifetime, 366 days.
pub const MAX_DESIRED_LIFETIME_SECS: u64 = 366 * 86_400;

/// The highest desired-state counter a car accepted, and the scope it counts in (D4a: the
/// director role of the root in force when it was accepted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterMark {
    pub scope: String,
    pub last: u64,
}

/// The OS the car runs, for rollback protection by hardware (M5a): the line and version of the
/// last OS release installed on this car, whatever line later releases claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstalledOs {
    pub line: String,
    pub version: semver::Version,
}

/// What the car knows about itself when it checks a release and a desired state.
#[derive(Clone, Debug)]
pub struct CarContext {
    pub car_id: String,
    pub compatible: String,
    pub now: u64,
    /// The highest desired-state counter accepted so far, in its scope.
    pub counter: Option<CounterMark>,
    /// The highest version installed per release line.
    pub installed: std::collections::BTreeMap<String, semver::Version>,
    /// The OS this hardware runs (M5a), when an OS release was installed.
    pub os: Option<InstalledOs>,
    /// Largest artifact the car accepts.
    pub max_artifact_bytes: u64,
}

/// M2's rule for release lines: one canonical form, so that `ECU-MAIN`, `ecu-main.` and
/// `ecu-main` cannot be three lines. 1–64 of `a–z 0–9 -`, starting and ending alphanumeric.
pub fn check_line(line: &str) -> Result<(), Error> {
    let ok = !line.is_empty()
        && line.len() <= 64
        && line
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !line.starts_with('-')
        && !line.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::LineName {
            line: line.to_owned(),
        })
    }
}

/// Whether `a` is older than `b` by SemVer precedence: build metadata does not count, so
/// `2.0.0+build9` and `2.0.0+build10` are the same version.
pub fn older(a: &semver::Version, b: &semver::Version) -> bool {
    a.cmp_precedence(b) == std::cmp::Ordering::Less
}

fn hex64(what: &str, s: &str) -> Result<(), Error> {
    if s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::Malformed(format!(
            "{what} `{s}` is not a lowercase hex sha256"
        )))
    }
}

/// M3's rule for names (release lines, artifacts, workloads), which become file names on the car:
/// 1–64 of A–Z a–z 0–9 - _ ., starting alphanumeric. `what` names the field in the error.
pub fn safe_name(what: &str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::UnsafeName {
            what: what.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// M3's rule for image names, the OCI distribution spec's repository grammar: `/`-separated
/// components of lowercase alphanumeric runs joined by `.`, `_`, `__` or one or more `-`; at
/// most 255 characters.
pub fn check_repository(name: &str) -> Result<(), Error> {
    fn component(c: &str) -> bool {
        let b = c.as_bytes();
        let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
            return false;
        }
        // Every run of separators between alphanumerics is `.`, `_`, `__` or `-+`.
        c.split(|x: char| x.is_ascii_lowercase() || x.is_ascii_digit())
            .filter(|sep| !sep.is_empty())
            .all(|sep| sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-'))
    }
    if !name.is_empty() && name.len() <= 255 && name.split('/').all(component) {
        Ok(())
    } else {
        Err(Error::UnsafeName {
            what:
                "image name (an OCI repository name: lowercase a-z 0-9, joined by . _ __ - and /)"
                    .to_owned(),
            name: name.to_owned(),
        })
    }
}

/// sha256 hex of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A release the car may install, with the digest that desired states name it by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedRelease {
    pub release: Release,
    pub version: semver::Version,
    /// sha256 of the manifest payload.
    pub digest: String,
}

/// M1–M3 and M6, the checks that do not depend on a particular car: what the twin checks when a
/// release is registered and what `cardeploy release verify` checks.
pub fn verify_release(
    root: &TrustedRoot,
    envelope: &Envelope,
    now: u64,
    max_artifact_bytes: u64,
) -> Result<CheckedRelease, Error> {
    // M1: signed by the release role under the trusted root, which is still fresh (R4).
    root.fresh(now)?;
    let verified = root.verify(RoleName::Release, RELEASE_TYPE, envelope)?;
    // M2: the manifest itself, exactly the bytes that were verified, in its strict shape (S1).
    let release: Release = crate::shape::strict(verified.payload, "release manifest")?;
    let version = semver::Version::parse(&release.version).map_err(|e| {
        Error::Malformed(format!(
            "release version `{}` is not semver: {e}",
            release.version
        ))
    })?;
    check_line(&release.line)?;
    // M3: artifacts and workloads are well formed; names are safe file names, unique; sizes
    // within the car's limit.
    let mut names = BTreeSet::new();
    for a in &release.artifacts {
        safe_name("artifact name", &a.name)?;
        if !names.insert(a.name.as_str()) {
            return Err(Error::Malformed(format!(
                "artifact `{}` listed twice",
                a.name
            )));
        }
        hex64("artifact digest", &a.digest)?;
        hex64("chunk index", &a.index)?;
        if a.size > max_artifact_bytes {
            return Err(Error::ArtifactTooLarge {
                name: a.name.clone(),
                size: a.size,
                limit: max_artifact_bytes,
            });
        }
    }
    for w in &release.workloads {
        safe_name("workload name", &w.name)?;
        hex64("workload digest", &w.digest)?;
        // A workload is applied from the artifact that carries it: same name, same digest.
        let carried = release.artifacts.iter().any(|a| {
            a.kind == ArtifactKind::KubeManifest && a.name == w.name && a.digest == w.digest
        });
        if !carried {
            return Err(Error::Malformed(format!(
                "workload `{}` has no kube-manifest artifact of the same name and digest",
                w.name
            )));
        }
    }
    // M3 (images): a valid repository name, once each, whose manifest the release carries.
    let mut image_names = BTreeSet::new();
    for i in &release.images {
        check_repository(&i.name)?;
        hex64("image manifest", &i.manifest)?;
        if !image_names.insert(i.name.as_str()) {
            return Err(Error::Malformed(format!("image `{}` listed twice", i.name)));
        }
        let carried = release
            .artifacts
            .iter()
            .any(|a| a.kind == ArtifactKind::OciManifest && a.digest == i.manifest);
        if !carried {
            return Err(Error::Malformed(format!(
                "image `{}` names manifest {}, which is no oci-manifest artifact of the release",
                i.name, i.manifest
            )));
        }
    }
    // M6: the digest desired states use to name this release.
    let digest = sha256_hex(verified.payload);
    Ok(CheckedRelease {
        release,
        version,
        digest,
    })
}

/// M1–M6: verify a release envelope for this car.
pub fn check_release(
    root: &TrustedRoot,
    envelope: &Envelope,
    car: &CarContext,
    downgrade: Option<&Envelope>,
) -> Result<CheckedRelease, Error> {
    let checked = verify_release(root, envelope, car.now, car.max_artifact_bytes)?;
    let (release, version) = (&checked.release, &checked.version);
    // M4: for this hardware.
    if release.compatible != car.compatible {
        return Err(Error::Incompatible {
            release: release.compatible.clone(),
            car: car.compatible.clone(),
        });
    }
    // A root-signed override naming exactly this line and version, not expired.
    let overridden = || -> Result<bool, Error> {
        let Some(env) = downgrade else {
            return Ok(false);
        };
        let v = root.verify(RoleName::Root, OVERRIDE_TYPE, env)?;
        let o: DowngradeOverride = crate::shape::strict(v.payload, "downgrade override")?;
        Ok(o.line == release.line && o.version == release.version && car.now < o.expires)
    };
    // M5: never older than what the line already runs (by SemVer precedence), unless the root
    // allows exactly this.
    if let Some(installed) = car.installed.get(&release.line)
        && older(version, installed)
        && !overridden()?
    {
        return Err(Error::Downgrade {
            line: release.line.clone(),
            installed: installed.to_string(),
            offered: version.to_string(),
        });
    }
    // M5a: an OS release is held against the OS this hardware runs, whatever line it claims: a
    // lower version, or the same OS moved to another line, needs the same override.
    let carries_os = release
        .artifacts
        .iter()
        .any(|a| a.kind == ArtifactKind::RaucBundle);
    if carries_os && let Some(os) = &car.os {
        if os.line != release.line && !overridden()? {
            return Err(Error::LineSwitch {
                compatible: car.compatible.clone(),
                running: format!("{}@{}", os.line, os.version),
                offered: format!("{}@{}", release.line, release.version),
            });
        }
        if older(version, &os.version) && !overridden()? {
            return Err(Error::Downgrade {
                line: format!("{} (the OS of {})", os.line, car.compatible),
                installed: os.version.to_string(),
                offered: version.to_string(),
            });
        }
    }
    Ok(checked)
}

/// D1–D6: verify a desired-state envelope for this car and the release it names.
pub fn check_desired(
    root: &TrustedRoot,
    envelope: &Envelope,
    car: &CarContext,
    release: &CheckedRelease,
) -> Result<Desired, Error> {
    // D1: signed by the director role under the trusted root, which is still fresh (R4).
    root.fresh(car.now)?;
    let verified = root.verify(RoleName::Director, DESIRED_TYPE, envelope)?;
    // D2: the document, in its strict shape (S1).
    let desired: Desired = crate::shape::strict(verified.payload, "desired state")?;
    // D3: for this car.
    if desired.car_id != car.car_id {
        return Err(Error::OtherCar {
            ours: car.car_id.clone(),
            theirs: desired.car_id,
        });
    }
    // D4: newer than anything accepted before in this counter scope (a replay carries an old
    // counter), but not by more than a step; D4a: a root whose director role changed starts a
    // fresh scope.
    if desired.counter == 0 || desired.counter > MAX_COUNTER {
        return Err(Error::CounterJump {
            counter: desired.counter,
            last: 0,
            limit: MAX_COUNTER,
        });
    }
    if let Some(mark) = &car.counter
        && mark.scope == root.counter_scope()
    {
        if desired.counter <= mark.last {
            return Err(Error::Replay {
                counter: desired.counter,
                last: mark.last,
            });
        }
        if desired.counter - mark.last > MAX_COUNTER_STEP {
            return Err(Error::CounterJump {
                counter: desired.counter,
                last: mark.last,
                limit: mark.last.saturating_add(MAX_COUNTER_STEP),
            });
        }
    }
    // D5: issued no later than now (with some clock skew), valid for a bounded time, and not
    // expired (freeze protection).
    let time = |why: String| Error::Time {
        what: format!("desired state #{}", desired.counter),
        why,
    };
    if desired.issued > car.now.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(time(format!(
            "issued at {}, more than {MAX_CLOCK_SKEW_SECS} s after now ({}) by this car's clock",
            desired.issued, car.now
        )));
    }
    if desired.expires <= desired.issued {
        return Err(time(format!(
            "expires at {}, not after it was issued ({})",
            desired.expires, desired.issued
        )));
    }
    if desired.expires - desired.issued > MAX_DESIRED_LIFETIME_SECS {
        return Err(time(format!(
            "valid for {} s, longer than the {MAX_DESIRED_LIFETIME_SECS} s a desired state may be",
            desired.expires - desired.issued
        )));
    }
    if car.now >= desired.expires {
        return Err(Error::Expired {
            what: format!("desired state #{}", desired.counter),
            expires: desired.expires,
            now: car.now,
        });
    }
    // D6: it names exactly this release.
    if desired.release != release.digest {
        return Err(Error::ReleaseMismatch {
            named: desired.release,
            got: release.digest.clone(),
        });
    }
    Ok(desired)
}

/// A1: what the chunk index says about an artifact (its size and whole-artifact digest) must be
/// what the release declared, before a byte is downloaded. The index is already known to be the
/// one the release names (its id is the digest the release lists); this catches a release whose
/// index and declaration disagree, so the download can never run past the declared size.
pub fn check_artifact(artifact: &Artifact, size: u64, digest: &str) -> Result<(), Error> {
    if size != artifact.size {
        return Err(Error::ArtifactMismatch {
            name: artifact.name.clone(),
            what: "size",
            declared: artifact.size.to_string(),
            found: size.to_string(),
        });
    }
    if digest != artifact.digest {
        return Err(Error::ArtifactMismatch {
            name: artifact.name.clone(),
            what: "digest",
            declared: artifact.digest.clone(),
            found: digest.to_owned(),
        });
    }
    Ok(())
}

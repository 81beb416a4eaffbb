//! The generator of `tests/data/<threat>/`: one directory per threat of docs/release-format.md,
//! each holding the signed documents a car would receive and a `case.json` naming the check to
//! run and the exact error variant it must end in. Keys come from fixed seeds and times are fixed,
//! so the files are byte-for-byte reproducible: `agent/tests/threats.rs` regenerates them into a
//! temp dir and compares, so the checked-in fixtures can never drift from this generator.
//!
//! Regenerate with `cargo xtask fixtures`.

use std::collections::BTreeMap;
use std::path::Path;

use cardeploy_chunks::transit::{Encoding, Frame};
use cardeploy_chunks::{ChunkIndex, Params, chunk_bytes};
use cardeploy_release::{
    Artifact, ArtifactKind, DESIRED_TYPE, Desired, DowngradeOverride, Envelope,
    MAX_CLOCK_SKEW_SECS, MAX_COUNTER, MAX_COUNTER_STEP, MAX_DESIRED_LIFETIME_SECS, OVERRIDE_TYPE,
    RELEASE_TYPE, ROOT_TYPE, Release, Role, Roles, Root, SigningKey, TrustedRoot, pae, sha256_hex,
    sign,
};
use serde_json::{Value, json};

/// The fixed "now" of every case.
pub const NOW: u64 = 1_800_000_000;
pub const CAR: &str = "VIN-FIXTURE";
pub const COMPATIBLE: &str = "cardeploy-qemuarm64";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed([seed; 32]).expect("a fixed seed is a valid key")
}

struct Keys {
    root: [SigningKey; 2],
    release: [SigningKey; 2],
    director: SigningKey,
    stranger: SigningKey,
}

fn keys() -> Keys {
    Keys {
        root: [key(1), key(2)],
        release: [key(3), key(4)],
        director: key(5),
        stranger: key(9),
    }
}

fn role(keys: &[&SigningKey], threshold: usize) -> Role {
    Role {
        keyids: keys.iter().map(|k| k.public().id()).collect(),
        threshold,
    }
}

/// A root over `root_keys` (threshold `root_threshold`), both release keys with
/// `release_threshold`, and the director.
fn root_doc(
    k: &Keys,
    version: u64,
    root_keys: &[&SigningKey],
    root_threshold: usize,
    release_threshold: usize,
) -> Root {
    let mut all: Vec<&SigningKey> = root_keys.to_vec();
    all.extend([&k.release[0], &k.release[1], &k.director]);
    Root {
        version,
        expires: NOW + 10 * 365 * 86_400,
        keys: all.iter().map(|k| (k.public().id(), k.public())).collect(),
        roles: Roles {
            root: role(root_keys, root_threshold),
            release: role(&[&k.release[0], &k.release[1]], release_threshold),
            director: role(&[&k.director], 1),
        },
    }
}

fn signed(payload_type: &str, doc: &impl serde::Serialize, keys: &[&SigningKey]) -> Envelope {
    sign(
        payload_type,
        &serde_json::to_vec(doc).expect("plain document"),
        keys,
    )
}

/// 200 KiB of fixed pseudo-random bytes: the artifact of every case.
fn artifact_bytes() -> Vec<u8> {
    crate::noise(0x9e37_79b9_7f4a_7c15, 200 << 10)
}

fn artifact(index: &ChunkIndex) -> Artifact {
    Artifact {
        kind: ArtifactKind::RaucBundle,
        name: "rootfs".into(),
        digest: index.artifact.hex(),
        size: index.size,
        index: index.id().hex(),
    }
}

fn release_doc(index: &ChunkIndex) -> Release {
    Release {
        line: "ecu".into(),
        version: "2.0.0".into(),
        compatible: COMPATIBLE.into(),
        created: NOW - 100,
        artifacts: vec![artifact(index)],
        workloads: Vec::new(),
        images: Vec::new(),
    }
}

fn desired_doc(release: &Envelope) -> Desired {
    Desired {
        car_id: CAR.into(),
        release: sha256_hex(&release.payload),
        counter: 5,
        issued: NOW - 10,
        expires: NOW + 3600,
    }
}

/// The counter scope of a root (D4a).
fn scope_of(root: &Envelope) -> String {
    TrustedRoot::pinned(&root.to_json())
        .expect("the generator's roots verify")
        .counter_scope()
}

/// What the car knows about itself in every case unless the case says otherwise: counter 4
/// accepted under `root`'s director, ecu 1.0.0 installed, no OS release installed yet.
fn car(root: &Envelope) -> Value {
    json!({
        "car_id": CAR,
        "compatible": COMPATIBLE,
        "now": NOW,
        "counter": {"scope": scope_of(root), "last": 4},
        "installed": {"ecu": "1.0.0"},
        "os": null,
        "max_artifact_bytes": 1u64 << 30,
    })
}

/// One case: its files and what it must end in.
#[derive(Default)]
struct Case {
    /// What to run: `message` (rotations + M1–M6 + D1–D6, what the agent runs on a desired
    /// state), `rotation` (R5–R6 of `rotation.json` over `root.json`), `index` (A1: the chunk
    /// index against the release's declaration), `frame` (a transit frame for the index's first
    /// chunk).
    check: &'static str,
    /// `ok` or the exact `cardeploy_release::Error` / `cardeploy_chunks::Error` variant.
    expect: &'static str,
    why: &'static str,
    files: BTreeMap<&'static str, Vec<u8>>,
    /// What the car knows, where it differs from [`car`].
    car: Option<Value>,
}

fn message_case(
    expect: &'static str,
    why: &'static str,
    root: &Envelope,
    release: &Envelope,
    desired: &Envelope,
) -> Case {
    let mut files = BTreeMap::new();
    files.insert("root.json", root.to_json());
    files.insert("release.json", release.to_json());
    files.insert("desired.json", desired.to_json());
    Case {
        check: "message",
        expect,
        why,
        files,
        car: None,
    }
}

/// `case` with the car's context changed by `change`.
fn with_car(mut case: Case, root: &Envelope, change: impl FnOnce(&mut Value)) -> Case {
    let mut c = car(root);
    change(&mut c);
    case.car = Some(c);
    case
}

fn cases() -> BTreeMap<&'static str, Case> {
    let k = keys();
    let data = artifact_bytes();
    let index = chunk_bytes(&data, Params::DEFAULT);
    let root1 = root_doc(&k, 1, &[&k.root[0], &k.root[1]], 1, 1);
    let root = signed(ROOT_TYPE, &root1, &[&k.root[0]]);
    let release = signed(RELEASE_TYPE, &release_doc(&index), &[&k.release[0]]);
    let desired = signed(DESIRED_TYPE, &desired_doc(&release), &[&k.director]);
    let director = |release: &Envelope| signed(DESIRED_TYPE, &desired_doc(release), &[&k.director]);
    let mut cases = BTreeMap::new();

    cases.insert(
        "valid",
        message_case(
            "ok",
            "every check passes: the baseline the other cases change one thing of",
            &root,
            &release,
            &desired,
        ),
    );

    let mut tampered = release.clone();
    let text = String::from_utf8(tampered.payload.clone()).expect("json");
    tampered.payload = text.replace("\"2.0.0\"", "\"2.0.1\"").into_bytes();
    cases.insert(
        "tampered-payload",
        message_case(
            "BelowThreshold",
            "the release payload was changed after signing: the signature no longer verifies",
            &root,
            &tampered,
            &director(&tampered),
        ),
    );

    let unknown = signed(RELEASE_TYPE, &release_doc(&index), &[&k.stranger]);
    cases.insert(
        "unknown-key",
        message_case(
            "BelowThreshold",
            "the release is signed by a key the root does not name",
            &root,
            &unknown,
            &director(&unknown),
        ),
    );

    let root_2of2 = signed(
        ROOT_TYPE,
        &root_doc(&k, 1, &[&k.root[0], &k.root[1]], 1, 2),
        &[&k.root[0]],
    );
    cases.insert(
        "below-threshold",
        message_case(
            "BelowThreshold",
            "the root wants 2 release signatures, the release carries 1",
            &root_2of2,
            &release,
            &desired,
        ),
    );

    let mut twice = release.clone();
    twice.signatures.push(twice.signatures[0].clone());
    cases.insert(
        "duplicate-signature",
        message_case(
            "BelowThreshold",
            "one release signature listed twice must count once against a threshold of 2",
            &root_2of2,
            &twice,
            &director(&twice),
        ),
    );

    // The release key's signature over the same bytes as another payload type, relabelled.
    let payload = serde_json::to_vec(&release_doc(&index)).expect("plain document");
    let other_type = sign(DESIRED_TYPE, &payload, &[&k.release[0]]);
    let relabelled = Envelope {
        payload_type: RELEASE_TYPE.into(),
        payload: payload.clone(),
        signatures: other_type.signatures,
    };
    debug_assert_ne!(pae(DESIRED_TYPE, &payload), pae(RELEASE_TYPE, &payload));
    cases.insert(
        "wrong-payload-type",
        message_case(
            "BelowThreshold",
            "a signature from the right key made over another payload type does not verify as a release",
            &root,
            &relabelled,
            &director(&relabelled),
        ),
    );

    let mut d = desired_doc(&release);
    d.expires = NOW - 1;
    cases.insert(
        "expired-desired",
        message_case(
            "Expired",
            "the desired state expired a second before now (freeze protection)",
            &root,
            &release,
            &signed(DESIRED_TYPE, &d, &[&k.director]),
        ),
    );

    let mut d = desired_doc(&release);
    d.counter = 4;
    cases.insert(
        "replayed-counter",
        message_case(
            "Replay",
            "counter 4 again, when 4 was already accepted",
            &root,
            &release,
            &signed(DESIRED_TYPE, &d, &[&k.director]),
        ),
    );

    let mut d = desired_doc(&release);
    d.car_id = "VIN-OTHER".into();
    cases.insert(
        "other-car",
        message_case(
            "OtherCar",
            "a desired state signed for another car",
            &root,
            &release,
            &signed(DESIRED_TYPE, &d, &[&k.director]),
        ),
    );

    let mut d = desired_doc(&release);
    d.release = "00".repeat(32);
    cases.insert(
        "release-mismatch",
        message_case(
            "ReleaseMismatch",
            "the desired state names another release than the one it travels with",
            &root,
            &release,
            &signed(DESIRED_TYPE, &d, &[&k.director]),
        ),
    );

    let mut old = release_doc(&index);
    old.version = "0.9.0".into();
    let old = signed(RELEASE_TYPE, &old, &[&k.release[0]]);
    cases.insert(
        "downgrade",
        message_case(
            "Downgrade",
            "ecu 0.9.0 offered to a car that runs ecu 1.0.0, without an override",
            &root,
            &old,
            &director(&old),
        ),
    );
    let allow = DowngradeOverride {
        line: "ecu".into(),
        version: "0.9.0".into(),
        expires: NOW + 3600,
    };
    let mut case = message_case(
        "ok",
        "the same downgrade, allowed by an override the root role signed",
        &root,
        &old,
        &director(&old),
    );
    case.files.insert(
        "downgrade.json",
        signed(OVERRIDE_TYPE, &allow, &[&k.root[0]]).to_json(),
    );
    cases.insert("downgrade-with-override", case);
    let mut case = message_case(
        "BelowThreshold",
        "an override signed by the release key instead of the root role does not allow it",
        &root,
        &old,
        &director(&old),
    );
    case.files.insert(
        "downgrade.json",
        signed(OVERRIDE_TYPE, &allow, &[&k.release[0]]).to_json(),
    );
    cases.insert("downgrade-override-not-by-root", case);

    let mut other = release_doc(&index);
    other.compatible = "other-board".into();
    let other = signed(RELEASE_TYPE, &other, &[&k.release[0]]);
    cases.insert(
        "incompatible-hardware",
        message_case(
            "Incompatible",
            "a release for other hardware",
            &root,
            &other,
            &director(&other),
        ),
    );

    let mut traversal = release_doc(&index);
    traversal.artifacts[0].name = "../../etc/passwd".into();
    let traversal = signed(RELEASE_TYPE, &traversal, &[&k.release[0]]);
    cases.insert(
        "path-traversal",
        message_case(
            "UnsafeName",
            "an artifact name that would write outside the artifact directory",
            &root,
            &traversal,
            &director(&traversal),
        ),
    );

    let mut big = release_doc(&index);
    big.artifacts[0].size = (1 << 30) + 1;
    let big = signed(RELEASE_TYPE, &big, &[&k.release[0]]);
    cases.insert(
        "artifact-too-large",
        message_case(
            "ArtifactTooLarge",
            "an artifact declared larger than the car accepts, refused before any download",
            &root,
            &big,
            &director(&big),
        ),
    );

    let mut expired_root = root1.clone();
    expired_root.expires = NOW - 1;
    cases.insert(
        "expired-root",
        message_case(
            "Expired",
            "the only root the car has expired: nothing signed under it is used",
            &signed(ROOT_TYPE, &expired_root, &[&k.root[0]]),
            &release,
            &desired,
        ),
    );

    // Declared size and digest against the chunk index the release names.
    for (name, field, why) in [
        (
            "artifact-size-mismatch",
            "size",
            "the chunk index describes one byte less than the release declares",
        ),
        (
            "artifact-digest-mismatch",
            "digest",
            "the chunk index assembles to another artifact than the release declares",
        ),
    ] {
        let mut doc = release_doc(&index);
        match field {
            "size" => doc.artifacts[0].size += 1,
            _ => doc.artifacts[0].digest = sha256_hex(b"another artifact"),
        }
        let env = signed(RELEASE_TYPE, &doc, &[&k.release[0]]);
        let mut files = BTreeMap::new();
        files.insert("root.json", root.to_json());
        files.insert("release.json", env.to_json());
        files.insert("index.cdix", index.encode());
        cases.insert(
            name,
            Case {
                check: "index",
                expect: "ArtifactMismatch",
                why,
                files,
                car: None,
            },
        );
    }

    // A frame for the first chunk claiming more bytes than the index declares for it.
    let first = index.chunks[0];
    let mut longer = data[..first.len as usize].to_vec();
    longer.extend_from_slice(&[0u8; 4096]);
    let frame = Frame {
        id: first.id,
        raw_len: first.len + 4096,
        encoding: Encoding::Whole,
        data: zstd::bulk::compress(&longer, 3).expect("zstd"),
    };
    let mut files = BTreeMap::new();
    files.insert("root.json", root.to_json());
    files.insert("release.json", release.to_json());
    files.insert("index.cdix", index.encode());
    files.insert("frame.bin", frame.encode());
    cases.insert(
        "artifact-larger-while-downloading",
        Case {
            check: "frame",
            expect: "ChunkLength",
            why: "the twin sends a chunk claiming 4 KiB more than the index declares: refused before decompressing, so nothing beyond the declared size is ever written",
            files,
            car: None,
        },
    );

    // Root rotation: v1 needs 2 of 2 root keys; v2 is signed by one old key and the new one.
    let strict = root_doc(&k, 1, &[&k.root[0], &k.root[1]], 2, 1);
    let next = root_doc(&k, 2, &[&k.root[0], &k.stranger], 1, 1);
    let mut files = BTreeMap::new();
    files.insert(
        "root.json",
        signed(ROOT_TYPE, &strict, &[&k.root[0], &k.root[1]]).to_json(),
    );
    files.insert(
        "rotation.json",
        signed(ROOT_TYPE, &next, &[&k.root[0], &k.stranger]).to_json(),
    );
    cases.insert(
        "rotation-without-old-threshold",
        Case {
            check: "rotation",
            expect: "BelowThreshold",
            why: "a new root signed by 1 of the 2 old root keys the old root requires",
            files,
            car: None,
        },
    );
    let mut files = BTreeMap::new();
    files.insert(
        "root.json",
        signed(ROOT_TYPE, &strict, &[&k.root[0], &k.root[1]]).to_json(),
    );
    files.insert(
        "rotation.json",
        signed(ROOT_TYPE, &next, &[&k.root[0], &k.root[1], &k.stranger]).to_json(),
    );
    cases.insert(
        "rotation-valid",
        Case {
            check: "rotation",
            expect: "ok",
            why: "the same rotation signed by both old keys and the new one",
            files,
            car: None,
        },
    );

    // D4: a counter may grow by a bounded step, and never to where the next cannot be written.
    for (name, counter, why) in [
        (
            "counter-jump",
            4 + MAX_COUNTER_STEP + 1,
            "a desired state one past the largest step above the last accepted counter (a leaked director key fast-forwarding the car)",
        ),
        (
            "counter-beyond-highest",
            u64::MAX,
            "counter 2^64-1: every later desired state would be a replay",
        ),
    ] {
        let mut d = desired_doc(&release);
        d.counter = counter;
        cases.insert(
            name,
            message_case(
                "CounterJump",
                why,
                &root,
                &release,
                &signed(DESIRED_TYPE, &d, &[&k.director]),
            ),
        );
    }
    // D4a: a root rotation to a new director key starts a fresh scope: a car whose counter was
    // pushed to the top takes counter 1 from the new key.
    let new_director = key(6);
    let mut v2 = root_doc(&k, 2, &[&k.root[0], &k.root[1]], 1, 1);
    v2.keys.remove(&k.director.public().id());
    v2.keys
        .insert(new_director.public().id(), new_director.public());
    v2.roles.director = role(&[&new_director], 1);
    let rotation = signed(ROOT_TYPE, &v2, &[&k.root[0]]);
    let mut d = desired_doc(&release);
    d.counter = 1;
    let mut case = with_car(
        message_case(
            "ok",
            "the car's counter sits at the highest there is under the old director key; a root rotation to a new one starts afresh and counter 1 is taken",
            &root,
            &release,
            &signed(DESIRED_TYPE, &d, &[&new_director]),
        ),
        &root,
        |c| c["counter"]["last"] = json!(MAX_COUNTER),
    );
    case.files.insert("rotation.json", rotation.to_json());
    cases.insert("counter-fresh-scope-after-director-rotation", case);

    // M5a: the OS is held against what this hardware runs, whatever line a release claims.
    let runs_ecu_2 = |c: &mut Value| c["os"] = json!({"line": "ecu", "version": "2.0.0"});
    let mut beta = release_doc(&index);
    beta.line = "ecu-beta".into();
    beta.version = "0.1.0".into();
    let beta = signed(RELEASE_TYPE, &beta, &[&k.release[0]]);
    cases.insert(
        "os-on-another-line",
        with_car(
            message_case(
                "LineSwitch",
                "a car running ecu 2.0.0 offered an OS bundle for the same hardware as ecu-beta 0.1.0: the old-OS rollback moved to another line",
                &root,
                &beta,
                &director(&beta),
            ),
            &root,
            runs_ecu_2,
        ),
    );
    let mut case = with_car(
        message_case(
            "ok",
            "the same switch, allowed by an override the root role signed for ecu-beta 0.1.0",
            &root,
            &beta,
            &director(&beta),
        ),
        &root,
        runs_ecu_2,
    );
    let switch = DowngradeOverride {
        line: "ecu-beta".into(),
        version: "0.1.0".into(),
        expires: NOW + 3600,
    };
    case.files.insert(
        "downgrade.json",
        signed(OVERRIDE_TYPE, &switch, &[&k.root[0]]).to_json(),
    );
    cases.insert("os-on-another-line-with-override", case);

    // M2: one canonical form per line.
    for (name, line) in [("line-upper-case", "ECU"), ("line-trailing-dot", "ecu.")] {
        let mut doc = release_doc(&index);
        doc.line = line.into();
        let env = signed(RELEASE_TYPE, &doc, &[&k.release[0]]);
        cases.insert(
            name,
            message_case(
                "LineName",
                "a line that is `ecu` to a person but another line to a byte comparison",
                &root,
                &env,
                &director(&env),
            ),
        );
    }

    // M5: SemVer precedence; build metadata does not count.
    let mut same = release_doc(&index);
    same.version = "2.0.0+build9".into();
    let same = signed(RELEASE_TYPE, &same, &[&k.release[0]]);
    cases.insert(
        "build-metadata-same-version",
        with_car(
            message_case(
                "ok",
                "2.0.0+build9 offered where 2.0.0+build10 is installed: the same version, not a downgrade",
                &root,
                &same,
                &director(&same),
            ),
            &root,
            |c| c["installed"]["ecu"] = json!("2.0.0+build10"),
        ),
    );

    // S1: signed payloads are JSON objects; a key map lists each key once.
    let positional = json!([
        "ecu",
        "2.0.0",
        COMPATIBLE,
        NOW - 100,
        [serde_json::to_value(artifact(&index)).expect("plain document")],
        []
    ]);
    let array = sign(
        RELEASE_TYPE,
        &serde_json::to_vec(&positional).expect("plain document"),
        &[&k.release[0]],
    );
    cases.insert(
        "positional-array-payload",
        message_case(
            "Malformed",
            "the release manifest signed as a positional JSON array instead of an object",
            &root,
            &array,
            &director(&array),
        ),
    );
    let text =
        String::from_utf8(serde_json::to_vec(&root1).expect("plain document")).expect("json");
    let id = k.director.public().id();
    let entry = format!(
        "\"{id}\":{}",
        serde_json::to_string(&k.director.public()).expect("plain document")
    );
    let twice = text.replacen(&entry, &format!("{entry},{entry}"), 1);
    debug_assert_ne!(twice, text);
    cases.insert(
        "duplicate-root-key",
        message_case(
            "Malformed",
            "a root whose key map lists the director key twice",
            &sign(ROOT_TYPE, twice.as_bytes(), &[&k.root[0]]),
            &release,
            &desired,
        ),
    );

    // D5: issued no later than now (plus clock skew), expiring after it was issued, for a
    // bounded time.
    for (name, issued, expires, why) in [
        (
            "issued-in-the-future",
            NOW + MAX_CLOCK_SKEW_SECS + 60,
            NOW + MAX_CLOCK_SKEW_SECS + 3600,
            "a desired state issued an hour and a minute after the car's now",
        ),
        (
            "expires-before-issued",
            NOW - 10,
            NOW - 20,
            "a desired state that expires before it was issued",
        ),
        (
            "lifetime-too-long",
            NOW - 10,
            NOW - 10 + MAX_DESIRED_LIFETIME_SECS + 1,
            "a desired state valid for a second more than a desired state may be",
        ),
    ] {
        let mut d = desired_doc(&release);
        d.issued = issued;
        d.expires = expires;
        cases.insert(
            name,
            message_case(
                "Time",
                why,
                &root,
                &release,
                &signed(DESIRED_TYPE, &d, &[&k.director]),
            ),
        );
    }

    // R5: the highest root version has no successor (checked, never wrapped).
    let mut top = root1.clone();
    top.version = u64::MAX;
    let mut after = root1.clone();
    after.version = 0;
    let mut files = BTreeMap::new();
    files.insert(
        "root.json",
        signed(ROOT_TYPE, &top, &[&k.root[0]]).to_json(),
    );
    files.insert(
        "rotation.json",
        signed(ROOT_TYPE, &after, &[&k.root[0]]).to_json(),
    );
    cases.insert(
        "root-highest-version",
        Case {
            check: "rotation",
            expect: "RootVersion",
            why: "a root at the highest version: the next rotation is refused, not wrapped to 0",
            files,
            car: None,
        },
    );

    cases
}

/// Write every case under `dir` (`tests/data`), replacing what is there.
pub fn generate(dir: &Path) -> std::io::Result<()> {
    let k = keys();
    let standard = signed(
        ROOT_TYPE,
        &root_doc(&k, 1, &[&k.root[0], &k.root[1]], 1, 1),
        &[&k.root[0]],
    );
    for (name, case) in cases() {
        let at = dir.join(name);
        if at.exists() {
            std::fs::remove_dir_all(&at)?;
        }
        std::fs::create_dir_all(&at)?;
        for (file, bytes) in &case.files {
            std::fs::write(at.join(file), bytes)?;
        }
        let meta = json!({
            "threat": name,
            "why": case.why,
            "check": case.check,
            "expect": case.expect,
            "car": case.car.unwrap_or_else(|| car(&standard)),
        });
        let mut text = serde_json::to_string_pretty(&meta).expect("json");
        text.push('\n');
        std::fs::write(at.join("case.json"), text)?;
    }
    Ok(())
}

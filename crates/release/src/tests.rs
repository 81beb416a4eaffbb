use crate::*;

const ROOT: &str = "application/vnd.cardeploy.root+json";
const RELEASE: &str = "application/vnd.cardeploy.release+json";

fn keys(n: usize) -> Vec<SigningKey> {
    (0..n).map(|_| SigningKey::generate().unwrap()).collect()
}

fn publics(keys: &[SigningKey]) -> Vec<PublicKey> {
    keys.iter().map(SigningKey::public).collect()
}

#[test]
fn pae_matches_the_dsse_specification() {
    assert_eq!(
        pae("http://example.com/HelloWorld", b"hello world"),
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
    );
}

#[test]
fn a_threshold_of_signatures_verifies_and_survives_json() {
    let k = keys(3);
    let env = sign(RELEASE, br#"{"version":"1.2.0"}"#, &[&k[0], &k[2]]);
    let back = Envelope::from_json(&env.to_json()).unwrap();
    assert_eq!(back, env);
    let ok = back.verify(RELEASE, &publics(&k), 2).unwrap();
    assert_eq!(ok.payload, br#"{"version":"1.2.0"}"#);
    assert_eq!(ok.signers.len(), 2);
}

#[test]
fn a_tampered_payload_is_refused() {
    let k = keys(1);
    let mut env = sign(RELEASE, b"version 1", &[&k[0]]);
    env.payload = b"version 9".to_vec();
    let err = env.verify(RELEASE, &publics(&k), 1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BelowThreshold {
                valid: 0,
                threshold: 1,
                seen: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn a_signature_from_an_unknown_key_does_not_count() {
    let trusted = keys(1);
    let stranger = keys(1);
    let env = sign(RELEASE, b"x", &[&stranger[0]]);
    let err = env.verify(RELEASE, &publics(&trusted), 1).unwrap_err();
    assert!(
        matches!(err, Error::BelowThreshold { valid: 0, .. }),
        "{err}"
    );
}

#[test]
fn signatures_below_the_threshold_are_refused() {
    let k = keys(3);
    let env = sign(ROOT, b"root", &[&k[0]]);
    let err = env.verify(ROOT, &publics(&k), 2).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BelowThreshold {
                valid: 1,
                threshold: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn the_same_signature_twice_counts_once() {
    let k = keys(2);
    let mut env = sign(ROOT, b"root", &[&k[0]]);
    env.signatures.push(env.signatures[0].clone());
    let err = env.verify(ROOT, &publics(&k), 2).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BelowThreshold {
                valid: 1,
                seen: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_signature_over_another_payload_type_does_not_count() {
    let k = keys(1);
    // Signed as a release, relabelled as a root: the PAE binds the type into the signature.
    let mut env = sign(RELEASE, b"doc", &[&k[0]]);
    env.payload_type = ROOT.to_owned();
    let err = env.verify(ROOT, &publics(&k), 1).unwrap_err();
    assert!(
        matches!(err, Error::BelowThreshold { valid: 0, .. }),
        "{err}"
    );
    // And an envelope of the wrong type is refused before any signature is looked at.
    let env = sign(RELEASE, b"doc", &[&k[0]]);
    let err = env.verify(ROOT, &publics(&k), 1).unwrap_err();
    assert!(matches!(err, Error::PayloadType { .. }), "{err}");
}

#[test]
fn impossible_thresholds_are_refused() {
    let k = keys(2);
    let env = sign(ROOT, b"root", &[&k[0], &k[1]]);
    for threshold in [0, 3] {
        let err = env.verify(ROOT, &publics(&k), threshold).unwrap_err();
        assert!(matches!(err, Error::ImpossibleThreshold { .. }), "{err}");
    }
}

#[test]
fn malformed_and_oversized_envelopes_are_refused_before_use() {
    let err = Envelope::from_json(&vec![b' '; MAX_ENVELOPE_BYTES + 1]).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    let err =
        Envelope::from_json(br#"{"payloadType":"x","payload":"***","signatures":[]}"#).unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err}");
    let err = Envelope::from_json(br#"{"payloadType":"x","payload":"","signatures":[],"extra":1}"#)
        .unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err}");
}

#[test]
fn keys_round_trip_through_pkcs8_and_json() {
    let k = SigningKey::generate().unwrap();
    let again = SigningKey::from_pkcs8(k.pkcs8()).unwrap();
    assert_eq!(again.public(), k.public());
    let json = serde_json::to_string(&k.public()).unwrap();
    let back: PublicKey = serde_json::from_str(&json).unwrap();
    assert_eq!(back, k.public());
    assert_eq!(back.id().as_str().len(), 64);
    assert!(serde_json::from_str::<PublicKey>(r#"{"ed25519":"zz"}"#).is_err());
}

/// A root document over `root_keys` (threshold `k`), with one release and one director key.
fn root_doc(
    version: u64,
    root_keys: &[&SigningKey],
    k: usize,
    release: &SigningKey,
    director: &SigningKey,
) -> Root {
    let mut keys = std::collections::BTreeMap::new();
    for key in root_keys.iter().copied().chain([release, director]) {
        keys.insert(key.public().id(), key.public());
    }
    Root {
        version,
        expires: 2_000_000_000,
        keys,
        roles: Roles {
            root: Role {
                keyids: root_keys.iter().map(|k| k.public().id()).collect(),
                threshold: k,
            },
            release: Role {
                keyids: vec![release.public().id()],
                threshold: 1,
            },
            director: Role {
                keyids: vec![director.public().id()],
                threshold: 1,
            },
        },
    }
}

fn signed_root(root: &Root, signers: &[&SigningKey]) -> Vec<u8> {
    sign(ROOT_TYPE, &serde_json::to_vec(root).unwrap(), signers).to_json()
}

const NOW: u64 = 1_800_000_000;

#[test]
fn a_pinned_root_signed_by_its_threshold_is_trusted_and_names_the_role_keys() {
    let k = keys(5);
    let root = root_doc(1, &[&k[0], &k[1], &k[2]], 2, &k[3], &k[4]);
    let trusted = TrustedRoot::pinned(&signed_root(&root, &[&k[0], &k[2]])).unwrap();
    let release = sign(RELEASE, b"release v1", &[&k[3]]);
    assert!(trusted.verify(RoleName::Release, RELEASE, &release).is_ok());
    // The director key cannot sign for the release role.
    let forged = sign(RELEASE, b"release v1", &[&k[4]]);
    let err = trusted
        .verify(RoleName::Release, RELEASE, &forged)
        .unwrap_err();
    assert!(
        matches!(err, Error::BelowThreshold { valid: 0, .. }),
        "{err}"
    );
}

#[test]
fn a_root_rotation_needs_the_old_threshold_and_the_new() {
    let k = keys(7);
    let v1 = root_doc(1, &[&k[0], &k[1], &k[2]], 2, &k[3], &k[4]);
    let trusted = TrustedRoot::pinned(&signed_root(&v1, &[&k[0], &k[1]])).unwrap();
    // v2 replaces root key 2 with key 5 and the release key with key 6.
    let v2 = root_doc(2, &[&k[0], &k[1], &k[5]], 2, &k[6], &k[4]);

    // Signed by the new threshold only (one old key + the new key is not the old threshold).
    let err = trusted
        .rotate(&signed_root(&v2, &[&k[0], &k[5]]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::BelowThreshold {
                valid: 1,
                threshold: 2,
                ..
            }
        ),
        "{err}"
    );
    // Keys 0 and 1 are in both roots: they meet the old threshold and the new one.
    let rotated = trusted.rotate(&signed_root(&v2, &[&k[0], &k[1]])).unwrap();
    assert_eq!(rotated.root().version, 2);
    let release = sign(RELEASE, b"release v2", &[&k[6]]);
    assert!(rotated.verify(RoleName::Release, RELEASE, &release).is_ok());
    let old_release_key = sign(RELEASE, b"release v2", &[&k[3]]);
    assert!(
        rotated
            .verify(RoleName::Release, RELEASE, &old_release_key)
            .is_err()
    );
}

#[test]
fn a_root_rotation_that_skips_a_version_or_goes_back_is_refused() {
    let k = keys(5);
    let v1 = root_doc(1, &[&k[0]], 1, &k[3], &k[4]);
    let trusted = TrustedRoot::pinned(&signed_root(&v1, &[&k[0]])).unwrap();
    for version in [1, 3] {
        let next = root_doc(version, &[&k[0]], 1, &k[3], &k[4]);
        let err = trusted.rotate(&signed_root(&next, &[&k[0]])).unwrap_err();
        assert!(matches!(err, Error::RootVersion { have: 1, .. }), "{err}");
    }
}

#[test]
fn an_expired_root_is_refused() {
    let k = keys(3);
    let mut v1 = root_doc(1, &[&k[0]], 1, &k[1], &k[2]);
    v1.expires = NOW - 1;
    let err = TrustedRoot::pinned(&signed_root(&v1, &[&k[0]]))
        .and_then(|t| t.fresh(NOW).cloned())
        .unwrap_err();
    assert!(matches!(err, Error::Expired { .. }), "{err}");
}

#[test]
fn a_root_with_a_key_under_a_foreign_id_or_an_unmeetable_role_is_refused() {
    let k = keys(3);
    let mut v1 = root_doc(1, &[&k[0]], 1, &k[1], &k[2]);
    let release_id = k[1].public().id();
    v1.keys.insert(release_id, k[2].public());
    let err = TrustedRoot::pinned(&signed_root(&v1, &[&k[0]]))
        .and_then(|t| t.fresh(NOW).cloned())
        .unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err}");

    let mut v1 = root_doc(1, &[&k[0]], 1, &k[1], &k[2]);
    v1.roles.director.threshold = 2;
    let err = TrustedRoot::pinned(&signed_root(&v1, &[&k[0]]))
        .and_then(|t| t.fresh(NOW).cloned())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ImpossibleThreshold {
                threshold: 2,
                keys: 1
            }
        ),
        "{err}"
    );
}

struct Fleet {
    k: Vec<SigningKey>,
    root: TrustedRoot,
}

/// Keys: 0 root, 1 release, 2 director.
fn fleet() -> Fleet {
    let k = keys(3);
    let doc = root_doc(1, &[&k[0]], 1, &k[1], &k[2]);
    let root = TrustedRoot::pinned(&signed_root(&doc, &[&k[0]])).unwrap();
    Fleet { k, root }
}

fn manifest(version: &str) -> Release {
    Release {
        line: "ecu-main".into(),
        version: version.into(),
        compatible: "cardeploy-qemuarm64".into(),
        created: NOW,
        artifacts: vec![Artifact {
            kind: ArtifactKind::RaucBundle,
            name: "rootfs".into(),
            digest: "ab".repeat(32),
            size: 1 << 20,
            index: "cd".repeat(32),
        }],
        workloads: vec![],
        images: Vec::new(),
    }
}

/// The car: counter 4 accepted under `root`'s director, ecu-main 1.4.0 installed.
fn car_in(root: &TrustedRoot) -> CarContext {
    CarContext {
        car_id: "VIN1".into(),
        compatible: "cardeploy-qemuarm64".into(),
        now: NOW,
        counter: Some(CounterMark {
            scope: root.counter_scope(),
            last: 4,
        }),
        installed: [("ecu-main".to_owned(), semver::Version::new(1, 4, 0))].into(),
        os: None,
        max_artifact_bytes: 1 << 30,
    }
}

impl Fleet {
    fn release(&self, r: &Release) -> Envelope {
        sign(RELEASE_TYPE, &serde_json::to_vec(r).unwrap(), &[&self.k[1]])
    }

    fn desired(&self, d: &Desired) -> Envelope {
        sign(DESIRED_TYPE, &serde_json::to_vec(d).unwrap(), &[&self.k[2]])
    }
}

fn desired_for(release: &CheckedRelease) -> Desired {
    Desired {
        car_id: "VIN1".into(),
        release: release.digest.clone(),
        counter: 5,
        issued: NOW,
        expires: NOW + 3600,
    }
}

#[test]
fn a_release_and_its_desired_state_pass_every_step() {
    let f = fleet();
    let checked = check_release(
        &f.root,
        &f.release(&manifest("1.5.0")),
        &car_in(&f.root),
        None,
    )
    .unwrap();
    assert_eq!(checked.version, semver::Version::new(1, 5, 0));
    let desired = check_desired(
        &f.root,
        &f.desired(&desired_for(&checked)),
        &car_in(&f.root),
        &checked,
    )
    .unwrap();
    assert_eq!(desired.counter, 5);
}

#[test]
fn a_release_signed_by_the_director_is_refused() {
    let f = fleet();
    let env = sign(
        RELEASE_TYPE,
        &serde_json::to_vec(&manifest("1.5.0")).unwrap(),
        &[&f.k[2]],
    );
    let err = check_release(&f.root, &env, &car_in(&f.root), None).unwrap_err();
    assert!(
        matches!(err, Error::BelowThreshold { valid: 0, .. }),
        "{err}"
    );
}

#[test]
fn incompatible_hardware_is_refused() {
    let f = fleet();
    let mut m = manifest("1.5.0");
    m.compatible = "other-board".into();
    let err = check_release(&f.root, &f.release(&m), &car_in(&f.root), None).unwrap_err();
    assert!(matches!(err, Error::Incompatible { .. }), "{err}");
}

#[test]
fn path_traversal_in_artifact_names_is_refused() {
    let f = fleet();
    for bad in ["../etc/passwd", "/abs", "a/b", ".hidden", ""] {
        let mut m = manifest("1.5.0");
        m.artifacts[0].name = bad.into();
        let err = check_release(&f.root, &f.release(&m), &car_in(&f.root), None).unwrap_err();
        assert!(matches!(err, Error::UnsafeName { .. }), "{bad}: {err}");
    }
}

#[test]
fn an_artifact_larger_than_the_car_accepts_is_refused() {
    let f = fleet();
    let mut m = manifest("1.5.0");
    m.artifacts[0].size = 2 << 30;
    let err = check_release(&f.root, &f.release(&m), &car_in(&f.root), None).unwrap_err();
    assert!(matches!(err, Error::ArtifactTooLarge { .. }), "{err}");
}

#[test]
fn a_downgrade_is_refused_unless_the_root_allows_exactly_it() {
    let f = fleet();
    let old = f.release(&manifest("1.3.9"));
    let err = check_release(&f.root, &old, &car_in(&f.root), None).unwrap_err();
    assert!(matches!(err, Error::Downgrade { .. }), "{err}");

    let allow = |version: &str, signer: &SigningKey| {
        let o = DowngradeOverride {
            line: "ecu-main".into(),
            version: version.into(),
            expires: NOW + 60,
        };
        sign(OVERRIDE_TYPE, &serde_json::to_vec(&o).unwrap(), &[signer])
    };
    // An override signed by the release key is not the root's word.
    let err = check_release(
        &f.root,
        &old,
        &car_in(&f.root),
        Some(&allow("1.3.9", &f.k[1])),
    )
    .unwrap_err();
    assert!(matches!(err, Error::BelowThreshold { .. }), "{err}");
    // The root's override for another version does not cover this one.
    let err = check_release(
        &f.root,
        &old,
        &car_in(&f.root),
        Some(&allow("1.3.8", &f.k[0])),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Downgrade { .. }), "{err}");
    assert!(
        check_release(
            &f.root,
            &old,
            &car_in(&f.root),
            Some(&allow("1.3.9", &f.k[0]))
        )
        .is_ok()
    );
}

#[test]
fn desired_states_for_another_car_replayed_expired_or_naming_another_release_are_refused() {
    let f = fleet();
    let checked = check_release(
        &f.root,
        &f.release(&manifest("1.5.0")),
        &car_in(&f.root),
        None,
    )
    .unwrap();
    type Case = (&'static str, fn(&mut Desired), fn(&Error) -> bool);
    let cases: [Case; 4] = [
        (
            "another car",
            |d| d.car_id = "VIN2".into(),
            |e| matches!(e, Error::OtherCar { .. }),
        ),
        (
            "replayed counter",
            |d| d.counter = 4,
            |e| {
                matches!(
                    e,
                    Error::Replay {
                        counter: 4,
                        last: 4
                    }
                )
            },
        ),
        (
            "expired",
            |d| {
                d.issued = NOW - 100;
                d.expires = NOW;
            },
            |e| matches!(e, Error::Expired { .. }),
        ),
        (
            "another release",
            |d| d.release = "00".repeat(32),
            |e| matches!(e, Error::ReleaseMismatch { .. }),
        ),
    ];
    for (what, change, expected) in cases {
        let mut d = desired_for(&checked);
        change(&mut d);
        let err = check_desired(&f.root, &f.desired(&d), &car_in(&f.root), &checked).unwrap_err();
        assert!(expected(&err), "{what}: {err}");
    }
    // Signed by the release key instead of the director: refused.
    let env = sign(
        DESIRED_TYPE,
        &serde_json::to_vec(&desired_for(&checked)).unwrap(),
        &[&f.k[1]],
    );
    let err = check_desired(&f.root, &env, &car_in(&f.root), &checked).unwrap_err();
    assert!(matches!(err, Error::BelowThreshold { .. }), "{err}");
}

#[test]
fn an_index_that_disagrees_with_the_declared_artifact_is_refused() {
    let a = &manifest("1.5.0").artifacts[0];
    assert!(check_artifact(a, a.size, &a.digest).is_ok());
    let err = check_artifact(a, a.size + 1, &a.digest).unwrap_err();
    assert!(
        matches!(err, Error::ArtifactMismatch { what: "size", .. }),
        "{err}"
    );
    let err = check_artifact(a, a.size, &"ef".repeat(32)).unwrap_err();
    assert!(
        matches!(err, Error::ArtifactMismatch { what: "digest", .. }),
        "{err}"
    );
}

#[test]
fn a_workload_must_be_carried_by_a_manifest_artifact() {
    let f = fleet();
    let mut m = manifest("1.5.0");
    m.workloads.push(Workload {
        name: "app".into(),
        digest: "12".repeat(32),
    });
    let err = check_release(&f.root, &f.release(&m), &car_in(&f.root), None).unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err}");
    m.artifacts.push(Artifact {
        kind: ArtifactKind::KubeManifest,
        name: "app".into(),
        digest: "12".repeat(32),
        size: 100,
        index: "34".repeat(32),
    });
    assert!(check_release(&f.root, &f.release(&m), &car_in(&f.root), None).is_ok());
}

#[test]
fn an_image_must_have_a_repository_name_and_its_manifest_among_the_artifacts() {
    let f = fleet();
    let mut m = manifest("1.5.0");
    m.images.push(Image {
        name: "acme/nav".into(),
        manifest: "56".repeat(32),
        tag: Some("2.0".into()),
    });
    let err = check_release(&f.root, &f.release(&m), &car_in(&f.root), None).unwrap_err();
    assert!(
        matches!(err, Error::Malformed(ref m) if m.contains("acme/nav")),
        "{err}"
    );
    m.artifacts.push(Artifact {
        kind: ArtifactKind::OciManifest,
        name: "acme.nav.manifest".into(),
        digest: "56".repeat(32),
        size: 500,
        index: "78".repeat(32),
    });
    assert!(check_release(&f.root, &f.release(&m), &car_in(&f.root), None).is_ok());
    for bad in ["Acme/nav", "acme//nav", "../nav", "nav-", "a___b", ""] {
        m.images[0].name = bad.into();
        let err = check_release(&f.root, &f.release(&m), &car_in(&f.root), None).unwrap_err();
        assert!(matches!(err, Error::UnsafeName { .. }), "{bad}: {err}");
    }
    m.images[0].name = "acme/nav".into();
    m.images.push(m.images[0].clone());
    let err = check_release(&f.root, &f.release(&m), &car_in(&f.root), None).unwrap_err();
    assert!(
        matches!(err, Error::Malformed(ref m) if m.contains("twice")),
        "{err}"
    );
}

#[test]
fn envelopes_nest_in_messages_with_the_same_checks() {
    let f = fleet();
    let env = f.release(&manifest("1.5.0"));
    let json = serde_json::to_vec(&env).unwrap();
    let back: Envelope = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, env);
    let bad = String::from_utf8(json)
        .unwrap()
        .replace("\"payload\":\"", "\"payload\":\"!");
    assert!(serde_json::from_str::<Envelope>(&bad).is_err());
}

#[test]
fn seeded_keys_are_reproducible() {
    let a = SigningKey::from_seed([7; 32]).unwrap();
    let b = SigningKey::from_seed([7; 32]).unwrap();
    assert_eq!(a.public(), b.public());
    let env = crate::sign(RELEASE, b"x", &[&a]);
    assert_eq!(env, crate::sign(RELEASE, b"x", &[&b]));
}

fn counter_case(
    f: &Fleet,
    root: &TrustedRoot,
    car: &CarContext,
    counter: u64,
) -> Result<(), Error> {
    let checked = check_release(root, &f.release(&manifest("1.5.0")), car, None)?;
    let mut d = desired_for(&checked);
    d.counter = counter;
    check_desired(root, &f.desired(&d), car, &checked).map(|_| ())
}

#[test]
fn counters_grow_by_a_bounded_step_and_never_past_the_highest() {
    let f = fleet();
    let car = car_in(&f.root);
    assert!(counter_case(&f, &f.root, &car, 5).is_ok());
    assert!(counter_case(&f, &f.root, &car, 4 + MAX_COUNTER_STEP).is_ok());
    for (counter, limit) in [
        (5 + MAX_COUNTER_STEP, 4 + MAX_COUNTER_STEP),
        (u64::MAX, MAX_COUNTER),
        (0, MAX_COUNTER),
    ] {
        let err = counter_case(&f, &f.root, &car, counter).unwrap_err();
        assert!(
            matches!(err, Error::CounterJump { limit: l, .. } if l == limit),
            "{counter}: {err}"
        );
    }
    // A car that has never accepted one takes any counter up to the highest.
    let mut fresh = car.clone();
    fresh.counter = None;
    assert!(counter_case(&f, &f.root, &fresh, MAX_COUNTER).is_ok());
}

#[test]
fn a_root_that_replaces_the_director_key_starts_a_fresh_counter_scope() {
    let mut f = fleet();
    // The car was pushed to a counter no honest twin reaches (a leaked director key).
    let mut car = car_in(&f.root);
    car.counter = Some(CounterMark {
        scope: f.root.counter_scope(),
        last: MAX_COUNTER,
    });
    let err = counter_case(&f, &f.root, &car, MAX_COUNTER).unwrap_err();
    assert!(matches!(err, Error::Replay { .. }), "{err}");
    // Root 2 names a new director key: the old counter does not count under it.
    let director = keys(1).remove(0);
    let v2 = root_doc(2, &[&f.k[0]], 1, &f.k[1], &director);
    let rotated = f.root.rotate(&signed_root(&v2, &[&f.k[0]])).unwrap();
    assert_ne!(rotated.counter_scope(), f.root.counter_scope());
    f.k[2] = director;
    assert!(counter_case(&f, &rotated, &car, 1).is_ok());
    // A rotation that keeps the director key keeps the scope.
    let v3 = root_doc(3, &[&f.k[0]], 1, &f.k[1], &f.k[2]);
    let again = rotated.rotate(&signed_root(&v3, &[&f.k[0]])).unwrap();
    assert_eq!(again.counter_scope(), rotated.counter_scope());
}

#[test]
fn an_os_release_is_held_against_the_os_this_hardware_runs_whatever_its_line() {
    let f = fleet();
    let mut car = car_in(&f.root);
    car.os = Some(InstalledOs {
        line: "ecu-main".into(),
        version: semver::Version::new(2, 0, 0),
    });
    let on = |line: &str, version: &str| {
        let mut m = manifest(version);
        m.line = line.into();
        f.release(&m)
    };
    let allow = |line: &str, version: &str| {
        let o = DowngradeOverride {
            line: line.into(),
            version: version.into(),
            expires: NOW + 60,
        };
        sign(OVERRIDE_TYPE, &serde_json::to_vec(&o).unwrap(), &[&f.k[0]])
    };
    // Another line, lower version: the old-OS rollback the check exists to stop.
    let err = check_release(&f.root, &on("ecu-beta", "0.1.0"), &car, None).unwrap_err();
    assert!(matches!(err, Error::LineSwitch { .. }), "{err}");
    // Another line, higher version: still a switch of the OS to another line.
    let err = check_release(&f.root, &on("ecu-beta", "9.0.0"), &car, None).unwrap_err();
    assert!(matches!(err, Error::LineSwitch { .. }), "{err}");
    // The same line, lower than what runs (the line's own record says 1.4.0): the OS record
    // holds it.
    let err = check_release(&f.root, &on("ecu-main", "1.5.0"), &car, None).unwrap_err();
    assert!(matches!(err, Error::Downgrade { .. }), "{err}");
    // The root may allow exactly a switch.
    let ok = check_release(
        &f.root,
        &on("ecu-beta", "0.1.0"),
        &car,
        Some(&allow("ecu-beta", "0.1.0")),
    );
    assert!(ok.is_ok(), "{ok:?}");
    // A release without an OS bundle is not held against the OS.
    let mut workloads = manifest("0.1.0");
    workloads.line = "ecu-beta".into();
    workloads.artifacts[0].kind = ArtifactKind::OciLayer;
    assert!(check_release(&f.root, &f.release(&workloads), &car, None).is_ok());
}

#[test]
fn release_lines_have_one_canonical_form() {
    let f = fleet();
    for bad in [
        "ECU-MAIN",
        "ecu-main.",
        "ecu_main",
        "-ecu",
        "ecu-",
        "ecu main",
        "",
    ] {
        let mut m = manifest("1.5.0");
        m.line = bad.into();
        let err = check_release(&f.root, &f.release(&m), &car_in(&f.root), None).unwrap_err();
        assert!(matches!(err, Error::LineName { .. }), "{bad:?}: {err}");
    }
    assert!(check_line("ecu-main-2").is_ok());
}

#[test]
fn build_metadata_does_not_make_a_version_older_or_newer() {
    let f = fleet();
    let mut car = car_in(&f.root);
    car.installed
        .insert("ecu-main".into(), "2.0.0+build9".parse().unwrap());
    assert!(check_release(&f.root, &f.release(&manifest("2.0.0+build10")), &car, None).is_ok());
    car.installed
        .insert("ecu-main".into(), "2.0.0+build10".parse().unwrap());
    assert!(check_release(&f.root, &f.release(&manifest("2.0.0+build9")), &car, None).is_ok());
    let err = check_release(&f.root, &f.release(&manifest("1.9.9+build99")), &car, None);
    assert!(matches!(err, Err(Error::Downgrade { .. })), "{err:?}");
    assert!(!older(
        &"2.0.0+a".parse().unwrap(),
        &"2.0.0+b".parse().unwrap()
    ));
}

#[test]
fn signed_documents_are_json_objects_with_every_key_once() {
    let f = fleet();
    let car = car_in(&f.root);
    let refused = |payload: serde_json::Value| {
        let env = sign(
            RELEASE_TYPE,
            &serde_json::to_vec(&payload).unwrap(),
            &[&f.k[1]],
        );
        check_release(&f.root, &env, &car, None).unwrap_err()
    };
    let artifact = serde_json::to_value(&manifest("1.5.0").artifacts[0]).unwrap();
    // The whole manifest as a positional array.
    let err = refused(serde_json::json!([
        "ecu-main",
        "1.5.0",
        "cardeploy-qemuarm64",
        NOW,
        [artifact.clone()],
        []
    ]));
    assert!(
        matches!(err, Error::Malformed(ref m) if m.contains("object")),
        "{err}"
    );
    // An artifact as a positional array inside an object.
    let err = refused(serde_json::json!({
        "line": "ecu-main", "version": "1.5.0", "compatible": "cardeploy-qemuarm64",
        "created": NOW,
        "artifacts": [["rauc-bundle", "rootfs", "ab".repeat(32), 1 << 20, "cd".repeat(32)]],
    }));
    assert!(
        matches!(err, Error::Malformed(ref m) if m.contains("array")),
        "{err}"
    );
    // A desired state as an array.
    let checked = check_release(&f.root, &f.release(&manifest("1.5.0")), &car, None).unwrap();
    let d = desired_for(&checked);
    let as_array = serde_json::json!([d.car_id, d.release, d.counter, d.issued, d.expires]);
    let env = sign(
        DESIRED_TYPE,
        &serde_json::to_vec(&as_array).unwrap(),
        &[&f.k[2]],
    );
    let err = check_desired(&f.root, &env, &car, &checked).unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err}");
    // A root listing one key id twice.
    let doc = root_doc(1, &[&f.k[0]], 1, &f.k[1], &f.k[2]);
    let text = String::from_utf8(serde_json::to_vec(&doc).unwrap()).unwrap();
    let id = f.k[1].public().id();
    let key = serde_json::to_string(&f.k[1].public()).unwrap();
    let twice = text.replacen(
        &format!("\"{id}\":{key}"),
        &format!("\"{id}\":{key},\"{id}\":{key}"),
        1,
    );
    assert_ne!(twice, text);
    let env = sign(ROOT_TYPE, twice.as_bytes(), &[&f.k[0]]);
    let err = TrustedRoot::pinned(&env.to_json()).unwrap_err();
    assert!(
        matches!(err, Error::Malformed(ref m) if m.contains("twice")),
        "{err}"
    );
}

#[test]
fn a_desired_state_is_issued_before_now_and_valid_for_a_bounded_time() {
    let f = fleet();
    let car = car_in(&f.root);
    let checked = check_release(&f.root, &f.release(&manifest("1.5.0")), &car, None).unwrap();
    type Change = fn(&mut Desired);
    let cases: [(&str, Change); 3] = [
        ("issued in the future", |d| {
            d.issued = NOW + MAX_CLOCK_SKEW_SECS + 1;
            d.expires = d.issued + 60;
        }),
        ("expires before it was issued", |d| d.expires = d.issued - 1),
        ("valid for ever", |d| d.expires = u64::MAX),
    ];
    for (what, change) in cases {
        let mut d = desired_for(&checked);
        change(&mut d);
        let err = check_desired(&f.root, &f.desired(&d), &car, &checked).unwrap_err();
        assert!(matches!(err, Error::Time { .. }), "{what}: {err}");
    }
    // Within the clock skew is fine: the twin's clock may be a little ahead.
    let mut d = desired_for(&checked);
    d.issued = NOW + MAX_CLOCK_SKEW_SECS;
    d.expires = d.issued + 60;
    assert!(check_desired(&f.root, &f.desired(&d), &car, &checked).is_ok());
}

#[test]
fn the_highest_root_version_cannot_be_rotated_past() {
    let k = keys(3);
    let top = root_doc(u64::MAX, &[&k[0]], 1, &k[1], &k[2]);
    let root = TrustedRoot::pinned(&signed_root(&top, &[&k[0]])).unwrap();
    let mut next = top.clone();
    next.version = 0;
    let err = root.rotate(&signed_root(&next, &[&k[0]])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RootVersion {
                have: u64::MAX,
                got: 0
            }
        ),
        "{err}"
    );
}

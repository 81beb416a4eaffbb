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
    let trusted = TrustedRoot::pinned(&signed_root(&root, &[&k[0], &k[2]]), NOW).unwrap();
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
    let trusted = TrustedRoot::pinned(&signed_root(&v1, &[&k[0], &k[1]]), NOW).unwrap();
    // v2 replaces root key 2 with key 5 and the release key with key 6.
    let v2 = root_doc(2, &[&k[0], &k[1], &k[5]], 2, &k[6], &k[4]);

    // Signed by the new threshold only (one old key + the new key is not the old threshold).
    let err = trusted
        .rotate(&signed_root(&v2, &[&k[0], &k[5]]), NOW)
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
    let rotated = trusted
        .rotate(&signed_root(&v2, &[&k[0], &k[1]]), NOW)
        .unwrap();
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
    let trusted = TrustedRoot::pinned(&signed_root(&v1, &[&k[0]]), NOW).unwrap();
    for version in [1, 3] {
        let next = root_doc(version, &[&k[0]], 1, &k[3], &k[4]);
        let err = trusted
            .rotate(&signed_root(&next, &[&k[0]]), NOW)
            .unwrap_err();
        assert!(matches!(err, Error::RootVersion { have: 1, .. }), "{err}");
    }
}

#[test]
fn an_expired_root_is_refused() {
    let k = keys(3);
    let mut v1 = root_doc(1, &[&k[0]], 1, &k[1], &k[2]);
    v1.expires = NOW - 1;
    let err = TrustedRoot::pinned(&signed_root(&v1, &[&k[0]]), NOW).unwrap_err();
    assert!(matches!(err, Error::Expired { .. }), "{err}");
}

#[test]
fn a_root_with_a_key_under_a_foreign_id_or_an_unmeetable_role_is_refused() {
    let k = keys(3);
    let mut v1 = root_doc(1, &[&k[0]], 1, &k[1], &k[2]);
    let release_id = k[1].public().id();
    v1.keys.insert(release_id, k[2].public());
    let err = TrustedRoot::pinned(&signed_root(&v1, &[&k[0]]), NOW).unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err}");

    let mut v1 = root_doc(1, &[&k[0]], 1, &k[1], &k[2]);
    v1.roles.director.threshold = 2;
    let err = TrustedRoot::pinned(&signed_root(&v1, &[&k[0]]), NOW).unwrap_err();
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

//! Release manifests and desired states, as payloads that passed the signature check (the
//! fuzzer's bytes are signed with the fleet's own keys first): the checks after verification
//! never panic and never accept a document that breaks a rule.
#![no_main]

use std::sync::OnceLock;

use cardeploy_release::{
    CarContext, CheckedRelease, CounterMark, DESIRED_TYPE, MAX_CLOCK_SKEW_SECS, MAX_COUNTER_STEP,
    MAX_DESIRED_LIFETIME_SECS, RELEASE_TYPE, ROOT_TYPE, Role, Roles, Root, SigningKey, TrustedRoot,
    check_desired, check_release, sign,
};
use libfuzzer_sys::fuzz_target;

struct Fleet {
    keys: Vec<SigningKey>,
    root: TrustedRoot,
}

fn fleet() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| {
        let keys: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate().unwrap()).collect();
        let role = |k: &SigningKey| Role {
            keyids: vec![k.public().id()],
            threshold: 1,
        };
        let root = Root {
            version: 1,
            expires: u64::MAX,
            keys: keys.iter().map(|k| (k.public().id(), k.public())).collect(),
            roles: Roles {
                root: role(&keys[0]),
                release: role(&keys[1]),
                director: role(&keys[2]),
            },
        };
        let env = sign(ROOT_TYPE, &serde_json::to_vec(&root).unwrap(), &[&keys[0]]);
        let root = TrustedRoot::pinned(&env.to_json()).unwrap();
        Fleet { keys, root }
    })
}

fn car() -> CarContext {
    CarContext {
        car_id: "VIN1".into(),
        compatible: "board".into(),
        now: 1_800_000_000,
        counter: Some(CounterMark {
            scope: fleet().root.counter_scope(),
            last: 3,
        }),
        installed: [("ecu".to_owned(), semver::Version::new(1, 0, 0))].into(),
        os: None,
        max_artifact_bytes: 1 << 30,
    }
}

/// A release every car check accepts: the desired-state half of the input is checked against it.
fn good_release() -> &'static (cardeploy_release::Envelope, CheckedRelease) {
    static GOOD: OnceLock<(cardeploy_release::Envelope, CheckedRelease)> = OnceLock::new();
    GOOD.get_or_init(|| {
        let f = fleet();
        let payload = br#"{"line":"ecu","version":"1.2.0","compatible":"board","created":1,"artifacts":[]}"#;
        let env = sign(RELEASE_TYPE, payload, &[&f.keys[1]]);
        let checked = check_release(&f.root, &env, &car(), None).unwrap();
        (env, checked)
    })
}

// The first byte picks the document: even → the bytes are a release manifest, odd → a desired
// state for a fixed valid release (so the desired-state checks are reached on every run, not
// only when the fuzzer happens to build a valid manifest first).
fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    let f = fleet();
    let car = car();
    if selector & 1 == 1 {
        let (_, checked) = good_release();
        let desired = sign(DESIRED_TYPE, data, &[&f.keys[2]]);
        if let Ok(d) = check_desired(&f.root, &desired, &car, checked) {
            assert_eq!(d.car_id, "VIN1");
            assert!(d.counter > 3 && d.counter - 3 <= MAX_COUNTER_STEP);
            assert!(d.expires > car.now);
            assert!(d.issued <= car.now + MAX_CLOCK_SKEW_SECS);
            assert!(d.expires > d.issued && d.expires - d.issued <= MAX_DESIRED_LIFETIME_SECS);
            assert_eq!(d.release, checked.digest);
        }
        return;
    }
    let release = sign(RELEASE_TYPE, data, &[&f.keys[1]]);
    if let Ok(checked) = check_release(&f.root, &release, &car, None) {
        assert_eq!(checked.release.compatible, "board");
        assert!(
            checked.release.line != "ecu"
                || checked.version.cmp_precedence(&semver::Version::new(1, 0, 0)).is_ge()
        );
        assert!(cardeploy_release::check_line(&checked.release.line).is_ok());
        assert!(
            checked
                .release
                .artifacts
                .iter()
                .all(|a| !a.name.contains('/'))
        );
    }
});

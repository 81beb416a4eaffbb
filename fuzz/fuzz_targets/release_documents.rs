//! Release manifests and desired states, as payloads that passed the signature check (the
//! fuzzer's bytes are signed with the fleet's own keys first): the checks after verification
//! never panic and never accept a document that breaks a rule.
#![no_main]

use std::sync::OnceLock;

use cardeploy_release::{
    CarContext, DESIRED_TYPE, RELEASE_TYPE, ROOT_TYPE, Role, Roles, Root, SigningKey, TrustedRoot,
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

fuzz_target!(|data: &[u8]| {
    let f = fleet();
    let car = CarContext {
        car_id: "VIN1".into(),
        compatible: "board".into(),
        now: 1_800_000_000,
        last_counter: Some(3),
        installed: [("ecu".to_owned(), semver::Version::new(1, 0, 0))].into(),
        max_artifact_bytes: 1 << 30,
    };
    let release = sign(RELEASE_TYPE, data, &[&f.keys[1]]);
    if let Ok(checked) = check_release(&f.root, &release, &car, None) {
        assert_eq!(checked.release.compatible, "board");
        assert!(checked.release.line != "ecu" || checked.version >= semver::Version::new(1, 0, 0));
        assert!(
            checked
                .release
                .artifacts
                .iter()
                .all(|a| !a.name.contains('/'))
        );
        let desired = sign(DESIRED_TYPE, data, &[&f.keys[2]]);
        if let Ok(d) = check_desired(&f.root, &desired, &car, &checked) {
            assert_eq!(d.car_id, "VIN1");
            assert!(d.counter > 3);
        }
    }
});

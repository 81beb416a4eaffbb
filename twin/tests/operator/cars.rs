//! Revocation, re-provisioning and what registration takes.

use super::*;

#[tokio::test]
async fn a_revoked_car_is_closed_within_a_second_and_refused_at_its_next_handshake() {
    let env = Env::new();
    let twin = env.start_with(env.config()).await;
    let files = register(&env, &twin, "VIN-R1").await;
    let link = connected(&env, &twin, &files, "VIN-R1").await;
    let (_, view) = api(&twin, "GET", "/api/v1/cars/VIN-R1", None).await;
    assert_eq!(view["certificate"], "active", "{view}");

    let (status, view) = api(&twin, "DELETE", "/api/v1/cars/VIN-R1", None).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["certificate"], "revoked", "{view}");
    assert!(view["revoked_at"].is_i64(), "{view}");
    tokio::time::timeout(Duration::from_secs(1), link.closed())
        .await
        .expect("the revoked car's connection is still open after a second");

    refused_at_handshake(&env, &twin, &files, "VIN-R1").await;
    // Revoking again changes nothing; the car, its history and its view stay.
    let (status, again) = api(&twin, "DELETE", "/api/v1/cars/VIN-R1", None).await;
    assert_eq!((status, &again["revoked_at"]), (200, &view["revoked_at"]));
    let (_, list) = api(&twin, "GET", "/api/v1/cars", None).await;
    assert_eq!(list[0]["certificate"], "revoked", "{list}");
    assert_eq!(events_of_kind(&twin, "VIN-R1", "revoked").await.len(), 1);
    let (status, body) = api(&twin, "DELETE", "/api/v1/cars/NOBODY", None).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn a_revocation_survives_a_restart_and_a_revoked_certificate_is_never_registered_again() {
    let env = Env::new();
    let twin = env.start_with(env.config()).await;
    let files = register(&env, &twin, "VIN-R2").await;
    let (status, _) = api(&twin, "DELETE", "/api/v1/cars/VIN-R2", None).await;
    assert_eq!(status, 200);
    twin.stop().await.unwrap();

    let twin = env.start_with(env.config()).await;
    refused_at_handshake(&env, &twin, &files, "VIN-R2").await;
    for car in ["VIN-R2", "VIN-OTHER"] {
        let (status, body) = add_car(&twin, car, &files.cert_pem).await;
        assert_eq!(status, 409, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("revoked") && error.contains("never"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn a_revoked_car_is_re_provisioned_with_a_new_certificate_and_its_counter_carries_on() {
    let env = Env::new();
    let twin = env.start_with(env.config()).await;
    let old = register(&env, &twin, "VIN-R3").await;
    let release = env.signer().manifest("app", "1.0.0", vec![]);
    let desired = env
        .signer()
        .desire(twin.api_addr, &twin.operator_token, "VIN-R3", &release)
        .await;
    assert_eq!(desired["counter"], 1);

    // An active car keeps its certificate: a second one is refused.
    let new = env.pki.car("VIN-R3-new");
    let (status, body) = add_car(&twin, "VIN-R3", &new.cert_pem).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("car revoke"),
        "{body}"
    );

    api(&twin, "DELETE", "/api/v1/cars/VIN-R3", None).await;
    let (status, view) = add_car(&twin, "VIN-R3", &new.cert_pem).await;
    assert_eq!(status, 201, "{view}");
    assert_eq!(view["certificate"], "active");
    assert_eq!(view["revoked_at"], Value::Null);
    assert_eq!(
        view["desired"]["counter"], 1,
        "the desired state stays: {view}"
    );

    // The new certificate connects and gets the stored desired state; the old one stays out.
    let link = car_link(&env, &twin, &new, "VIN-R3").await.unwrap();
    let reply = hello(&link).await.unwrap();
    assert!(reply.desired.is_some());
    refused_at_handshake(&env, &twin, &old, "VIN-R3").await;
    let next = env.signer().manifest("app", "2.0.0", vec![]);
    let desired = env
        .signer()
        .desire(twin.api_addr, &twin.operator_token, "VIN-R3", &next)
        .await;
    assert_eq!(
        desired["counter"], 2,
        "a re-provisioned car continues its counter"
    );
    let kinds: Vec<Value> = all_events(&twin, "VIN-R3")
        .await
        .into_iter()
        .map(|e| e["kind"].clone())
        .collect();
    for kind in ["registered", "desired", "revoked"] {
        assert!(kinds.contains(&json!(kind)), "no {kind} in {kinds:?}");
    }
}

#[tokio::test]
async fn registration_takes_only_client_certificates_issued_by_the_fleet_ca() {
    let env = Env::new();
    let twin = env.start_with(env.config()).await;
    let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned();
    let cases = [
        ("not PEM", "hello".to_owned(), "no certificate"),
        ("garbage DER", garbage, "X.509"),
        (
            "another CA",
            env.pki.foreign_car("VIN-C1").cert_pem,
            "fleet's CA",
        ),
        (
            "server auth only",
            env.pki.server_auth_car("VIN-C2").cert_pem,
            "clientAuth",
        ),
        ("expired", env.pki.expired_car("VIN-C3").cert_pem, "expired"),
        (
            "the CA itself",
            env.pki.pki.ca.cert_pem().to_owned(),
            "a CA certificate",
        ),
    ];
    for (what, pem, reason) in cases {
        let (status, body) = add_car(&twin, "VIN-C", &pem).await;
        assert_eq!(status, 422, "{what}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(reason), "{what}: {error}");
    }
    let (_, list) = api(&twin, "GET", "/api/v1/cars", None).await;
    assert_eq!(list, json!([]), "nothing was registered");
    register(&env, &twin, "VIN-C").await;
}

use super::*;

#[test]
fn car_ids_that_are_safe_in_paths_and_urls_are_accepted() {
    for id in ["WVW1234567890", "car-1", "fleet.a_7"] {
        assert_eq!(
            CarId::new(id).map(|c| c.to_string()).ok(),
            Some(id.to_owned())
        );
    }
}

#[test]
fn car_ids_that_could_escape_a_path_are_refused() {
    for id in [
        "",
        "../etc",
        "a/b",
        ".hidden",
        "-flag",
        "späti",
        &"x".repeat(65),
    ] {
        assert!(
            matches!(CarId::new(id), Err(Error::InvalidCarId { .. })),
            "{id:?} must be refused"
        );
    }
}

#[test]
fn a_car_id_in_json_is_validated_when_decoded() {
    let err = decode::<SetupData>("setup", br#"{"car_id":"../x","agent_version":"1"}"#);
    assert!(matches!(err, Err(Error::Malformed { what: "setup", .. })));
}

#[test]
fn unknown_fields_are_refused_not_ignored() {
    let err = decode::<Heartbeat>("heartbeat", br#"{"extra":1}"#);
    assert!(matches!(err, Err(Error::Malformed { .. })));
}

#[test]
fn reports_round_trip_through_json() {
    let report = Report {
        epoch: 3,
        seq: 9,
        at: 1_700_000_000,
        body: ReportBody::State {
            state: ReportedState {
                phase: Phase::Applied,
                desired_counter: Some(4),
                counter_scope: Some("ab".repeat(32)),
                release: Some("infotainment@1.2.0".into()),
                last_error: None,
                os: None,
                workloads: vec![WorkloadReport {
                    name: "Deployment/nav".into(),
                    release: "infotainment@1.2.0".into(),
                    phase: WorkloadPhase::Canary,
                    ready_replicas: 1,
                    replicas: 2,
                    last_error: None,
                }],
            },
        },
    };
    let bytes = encode(&report);
    assert_eq!(decode::<Report>("report", &bytes).ok(), Some(report));
    let text = String::from_utf8(bytes).unwrap_or_default();
    assert!(text.contains(r#""type":"state""#), "{text}");
    assert!(text.contains(r#""phase":"applied""#), "{text}");
    assert!(text.contains(r#""phase":"canary""#), "{text}");
}

#[test]
fn a_reported_state_is_bounded() {
    let workload = |n: usize| WorkloadReport {
        name: format!("Deployment/w{n}"),
        release: "a@1.0.0".into(),
        phase: WorkloadPhase::Ready,
        ready_replicas: 1,
        replicas: 1,
        last_error: None,
    };
    let mut state = ReportedState::idle();
    state.workloads = (0..MAX_WORKLOADS).map(workload).collect();
    assert!(state.check().is_ok());
    state.workloads.push(workload(MAX_WORKLOADS));
    assert!(state.check().unwrap_err().contains("workloads"));
    let mut state = ReportedState::idle();
    state.workloads = vec![workload(0)];
    state.workloads[0].last_error = Some("x".repeat(MAX_REPORT_TEXT + 1));
    assert!(state.check().is_err());
    state.workloads[0].last_error = None;
    state.last_error = Some("x".repeat(MAX_REPORT_TEXT + 1));
    assert!(state.check().is_err());
}

#[test]
fn attributes_follow_label_rules() {
    assert!(validate_attribute("model", "tx-7").is_ok());
    assert!(validate_attribute("region", "").is_ok());
    assert!(validate_attribute("", "x").is_err());
    assert!(validate_attribute("bad key", "x").is_err());
    assert!(validate_attribute("k", "-x").is_err());
}

#[test]
fn byte_counts_read_like_people_write_them() {
    assert_eq!(crate::human_bytes(812), "812 B");
    assert_eq!(crate::human_bytes(64 << 10), "64 KiB");
    assert_eq!(crate::human_bytes(41_165), "40.2 KiB");
    assert_eq!(crate::human_bytes(4_100_000), "3.91 MiB");
    assert_eq!(crate::human_bytes(1 << 20), "1 MiB");
    assert_eq!(crate::human_bytes(16 << 30), "16 GiB");
}

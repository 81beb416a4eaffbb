//! One test per row of the deployment table in docs/state-machines.md.

use super::*;
use crate::os::RollbackReason;

fn rel(n: u8) -> ReleaseRef {
    ReleaseRef {
        digest: cardeploy_chunks::Digest([n; 32]),
        line: "ecu-main".into(),
        version: semver::Version::new(u64::from(n), 0, 0),
    }
}

fn accepted(n: u8, missing: bool, parts: bool, failed: bool) -> Event {
    Event::Accepted {
        release: rel(n),
        missing,
        parts,
        failed,
    }
}

fn fetching(n: u8) -> Deployment {
    Deployment::Fetching {
        release: rel(n),
        stalled: None,
    }
}

#[test]
fn a_release_whose_artifacts_are_missing_is_fetched() {
    for from in [
        Deployment::Idle,
        Deployment::Done { release: rel(1) },
        fetching(1),
    ] {
        assert_eq!(decide(&from, accepted(2, true, true, false)), fetching(2));
    }
}

#[test]
fn a_release_on_the_car_goes_to_its_parts_or_is_done() {
    assert_eq!(
        decide(&Deployment::Idle, accepted(2, false, true, false)),
        Deployment::Applying { release: rel(2) }
    );
    assert_eq!(
        decide(&Deployment::Idle, accepted(2, false, false, false)),
        Deployment::Done { release: rel(2) }
    );
}

#[test]
fn the_same_release_signed_again_changes_nothing() {
    for current in [
        fetching(1),
        Deployment::Applying { release: rel(1) },
        Deployment::Done { release: rel(1) },
    ] {
        assert_eq!(decide(&current, accepted(1, false, true, false)), current);
    }
}

#[test]
fn the_same_release_signed_again_after_a_failure_tries_again() {
    let failed = Deployment::Failed {
        release: rel(1),
        error: "network".into(),
    };
    assert_eq!(decide(&failed, accepted(1, true, true, true)), fetching(1));
    // A part failed it (the deployment is done, the car reports failed).
    let done = Deployment::Done { release: rel(1) };
    assert_eq!(
        decide(&done, accepted(1, false, true, true)),
        Deployment::Applying { release: rel(1) }
    );
}

#[test]
fn a_finished_fetch_hands_the_release_to_its_parts_or_is_done() {
    assert_eq!(
        decide(&fetching(1), Event::Fetched { parts: true }),
        Deployment::Applying { release: rel(1) }
    );
    assert_eq!(
        decide(&fetching(1), Event::Fetched { parts: false }),
        Deployment::Done { release: rel(1) }
    );
}

#[test]
fn a_stalled_fetch_keeps_fetching_and_says_why() {
    let next = decide(&fetching(1), Event::FetchStalled("disk full".into()));
    assert_eq!(
        next,
        Deployment::Fetching {
            release: rel(1),
            stalled: Some("disk full".into())
        }
    );
    assert_eq!(
        phase(&next, None, None),
        (Phase::Fetching, Some("disk full".into()))
    );
    // Once it finishes, the stall is forgotten.
    assert_eq!(
        decide(&next, Event::Fetched { parts: false }),
        Deployment::Done { release: rel(1) }
    );
}

#[test]
fn a_failed_fetch_fails_the_deployment() {
    let next = decide(&fetching(1), Event::FetchFailed("index refused".into()));
    assert_eq!(
        next,
        Deployment::Failed {
            release: rel(1),
            error: "index refused".into()
        }
    );
    assert_eq!(
        phase(&next, None, None),
        (Phase::Failed, Some("index refused".into()))
    );
}

#[test]
fn settled_parts_finish_the_deployment() {
    assert_eq!(
        decide(
            &Deployment::Applying { release: rel(1) },
            Event::PartsSettled
        ),
        Deployment::Done { release: rel(1) }
    );
}

#[test]
fn outcomes_that_do_not_concern_the_current_state_change_nothing() {
    let states = [
        Deployment::Idle,
        Deployment::Applying { release: rel(1) },
        Deployment::Done { release: rel(1) },
        Deployment::Failed {
            release: rel(1),
            error: "x".into(),
        },
    ];
    for current in &states {
        for event in [
            Event::Fetched { parts: true },
            Event::FetchStalled("x".into()),
            Event::FetchFailed("x".into()),
        ] {
            assert_eq!(&decide(current, event), current);
        }
    }
    assert_eq!(decide(&fetching(1), Event::PartsSettled), fetching(1));
}

#[test]
fn the_phase_is_the_os_updates_while_the_os_holds_the_release() {
    let installing = OsUpdate::Installing {
        release: rel(1),
        attempt: 1,
    };
    let applying = Deployment::Applying { release: rel(1) };
    assert_eq!(
        phase(&applying, Some(&installing), None).0,
        Phase::Installing
    );
    // Not yet taken up by the OS machine (it works on an older release, or none).
    assert_eq!(
        phase(&applying, Some(&OsUpdate::Idle), None).0,
        Phase::Verifying
    );
    // The OS machine's own fetching state belongs to the deployment.
    let os_fetching = OsUpdate::Fetching { release: rel(1) };
    assert_eq!(
        phase(&fetching(1), Some(&os_fetching), None).0,
        Phase::Fetching
    );
    let rolled_back = OsUpdate::RolledBack {
        release: rel(1),
        slot: "A".into(),
        reason: RollbackReason::HealthFailure {
            detail: "unit down".into(),
        },
    };
    let done = Deployment::Done { release: rel(1) };
    let (phase_now, error) = phase(&done, Some(&rolled_back), None);
    assert_eq!(phase_now, Phase::RolledBack);
    assert!(error.unwrap().contains("unit down"));
    // Without an OS part the release is simply applied.
    assert_eq!(phase(&done, None, None), (Phase::Applied, None));
    assert_eq!(phase(&Deployment::Idle, None, None), (Phase::Idle, None));
}

#[test]
fn after_the_os_commits_the_workloads_rollout_gives_the_phase() {
    use crate::containers::rollout::Rollout;
    let committed = OsUpdate::Committed {
        release: rel(1),
        slot: "B".into(),
    };
    let applying = Deployment::Applying { release: rel(1) };
    let starting = Rollout::Starting {
        release: rel(1),
        deadline: 9,
    };
    assert_eq!(
        phase(&applying, Some(&committed), Some(&starting)).0,
        Phase::Trial
    );
    // The OS still installing holds the phase whatever the workloads say.
    let installing = OsUpdate::Installing {
        release: rel(1),
        attempt: 1,
    };
    assert_eq!(
        phase(&applying, Some(&installing), Some(&starting)).0,
        Phase::Installing
    );
    let done = Deployment::Done { release: rel(1) };
    let ready = Rollout::Ready { release: rel(1) };
    assert_eq!(phase(&done, None, Some(&ready)), (Phase::Committed, None));
    let back = Rollout::RolledBack {
        release: rel(1),
        error: "crash loop".into(),
    };
    assert_eq!(
        phase(&done, None, Some(&back)),
        (Phase::RolledBack, Some("crash loop".into()))
    );
    // A rollout of another release does not speak for this one.
    assert_eq!(
        phase(&applying, None, Some(&Rollout::Ready { release: rel(2) })).0,
        Phase::Verifying
    );
}

#[test]
fn the_os_settles_on_commit_rollback_and_final_failure_only() {
    let committed = OsUpdate::Committed {
        release: rel(1),
        slot: "B".into(),
    };
    assert!(os_settled(&committed, &rel(1), 3));
    assert!(!os_settled(&committed, &rel(2), 3), "another release");
    let retry = |counter| OsUpdate::Failed {
        release: rel(1),
        error: "bundle damaged".into(),
        retry: true,
        counter,
    };
    assert!(os_settled(&retry(3), &rel(1), 3));
    assert!(
        !os_settled(&retry(2), &rel(1), 3),
        "a newer desired state makes the OS try again"
    );
    let installing = OsUpdate::Installing {
        release: rel(1),
        attempt: 1,
    };
    assert!(!os_settled(&installing, &rel(1), 3));
}

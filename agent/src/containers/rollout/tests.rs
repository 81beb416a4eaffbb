//! One test per row of the table in docs/state-machines.md ("Workloads").

use super::*;

fn release(v: u64) -> ReleaseRef {
    ReleaseRef {
        digest: cardeploy_chunks::Digest::of(&v.to_le_bytes()),
        line: "app".into(),
        version: semver::Version::new(v, 0, 0),
    }
}

fn start(v: u64) -> Event {
    Event::Start {
        release: release(v),
        now: 100,
        ready_secs: 60,
    }
}

fn observed(ready: bool, problem: Option<&str>, crash: bool, now: u64, canary: bool) -> Event {
    Event::Observed {
        ready,
        problem: problem.map(str::to_owned),
        crash,
        now,
        canary_secs: 30,
        canary,
    }
}

fn starting(v: u64) -> Rollout {
    Rollout::Starting {
        release: release(v),
        deadline: 160,
    }
}

#[test]
fn a_new_release_starts_with_a_deadline() {
    assert_eq!(decide(&Rollout::Idle, start(1)), starting(1));
    let ready = Rollout::Ready {
        release: release(1),
    };
    assert_eq!(decide(&ready, start(2)), starting(2));
}

#[test]
fn the_same_release_again_changes_nothing() {
    let canary = Rollout::Canary {
        release: release(1),
        until: 200,
    };
    assert_eq!(decide(&canary, start(1)), canary);
}

#[test]
fn an_apply_that_fails_rolls_back() {
    assert_eq!(
        decide(&starting(1), Event::ApplyFailed("forbidden".into())),
        Rollout::RolledBack {
            release: release(1),
            error: "forbidden".into()
        }
    );
}

#[test]
fn ready_with_a_previous_version_is_a_canary_without_one_ready() {
    assert_eq!(
        decide(&starting(1), observed(true, None, false, 120, true)),
        Rollout::Canary {
            release: release(1),
            until: 150
        }
    );
    assert_eq!(
        decide(&starting(1), observed(true, None, false, 120, false)),
        Rollout::Ready {
            release: release(1)
        }
    );
}

#[test]
fn a_crash_loop_rolls_back_at_once() {
    let next = decide(
        &starting(1),
        observed(false, Some("crash-loops"), true, 101, true),
    );
    assert!(
        matches!(next, Rollout::RolledBack { ref error, .. } if error == "crash-loops"),
        "{next:?}"
    );
}

#[test]
fn not_ready_waits_until_the_deadline_then_rolls_back() {
    let waiting = observed(false, Some("0 of 1 replicas ready"), false, 159, true);
    assert_eq!(decide(&starting(1), waiting), starting(1));
    let late = observed(false, Some("0 of 1 replicas ready"), false, 160, true);
    let next = decide(&starting(1), late);
    assert!(
        matches!(next, Rollout::RolledBack { ref error, .. } if error.contains("not ready in time") && error.contains("0 of 1")),
        "{next:?}"
    );
}

#[test]
fn a_healthy_canary_is_promoted_when_its_time_is_up() {
    let canary = Rollout::Canary {
        release: release(1),
        until: 150,
    };
    assert_eq!(
        decide(&canary, observed(true, None, false, 149, true)),
        canary
    );
    assert_eq!(
        decide(&canary, observed(true, None, false, 150, true)),
        Rollout::Ready {
            release: release(1)
        }
    );
}

#[test]
fn a_canary_that_falters_rolls_back() {
    let canary = Rollout::Canary {
        release: release(1),
        until: 150,
    };
    let next = decide(
        &canary,
        observed(false, Some("1 restart"), false, 120, true),
    );
    assert!(
        matches!(next, Rollout::RolledBack { ref error, .. } if error.contains("during the canary")),
        "{next:?}"
    );
}

#[test]
fn settled_states_ignore_observations() {
    for settled in [
        Rollout::Ready {
            release: release(1),
        },
        Rollout::RolledBack {
            release: release(1),
            error: "x".into(),
        },
        Rollout::Idle,
    ] {
        assert_eq!(
            decide(&settled, observed(false, Some("x"), true, 999, true)),
            settled
        );
        assert_eq!(decide(&settled, Event::ApplyFailed("x".into())), settled);
    }
}

#[test]
fn a_rollout_superseded_before_its_end_rolls_back() {
    let canary = Rollout::Canary {
        release: release(1),
        until: 150,
    };
    for current in [starting(1), canary] {
        let next = decide(&current, Event::Superseded("app@2.0.0".into()));
        assert!(
            matches!(next, Rollout::RolledBack { ref error, .. } if error.contains("superseded by app@2.0.0")),
            "{next:?}"
        );
    }
    let ready = Rollout::Ready {
        release: release(1),
    };
    assert_eq!(decide(&ready, Event::Superseded("x".into())), ready);
}

#[test]
fn workloads_go_back_with_the_slot_their_release_came_with() {
    let canary = Rollout::Canary {
        release: release(1),
        until: 150,
    };
    for current in [starting(1), canary] {
        let next = decide(
            &current,
            Event::OsGaveUp("health failure: unit k3s.service is failed".into()),
        );
        assert!(
            matches!(next, Rollout::RolledBack { ref error, .. }
                if error.contains("OS update of the release went back: health failure")),
            "{next:?}"
        );
    }
    let ready = Rollout::Ready {
        release: release(1),
    };
    assert_eq!(decide(&ready, Event::OsGaveUp("x".into())), ready);
}

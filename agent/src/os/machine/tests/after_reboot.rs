//! The rows from the first boot of the new slot on: trial, commit, rollbacks, loops bounded; and
//! the persisted form.

use super::*;

#[test]
fn booting_the_new_slot_starts_the_trial() {
    let s = decide_now(&pending("b1"), Some(&wanted(2, true)), &facts("b2", "B"));
    assert_eq!(s.next, trial("b2", 1));
    assert_eq!(s.action, Action::CheckHealth { deadline: 1300 });
}

#[test]
fn coming_back_on_the_old_slot_after_the_reboot_is_a_boot_failure() {
    let s = decide_now(&pending("b1"), Some(&wanted(2, true)), &facts("b2", "A"));
    let OsUpdate::RolledBack { slot, reason, .. } = &s.next else {
        panic!("{s:?}");
    };
    assert_eq!(slot, "A");
    assert!(matches!(reason, RollbackReason::BootFailure { .. }));
    assert_eq!(s.action, Action::MarkOtherBad);
    assert!(refuses(&s.next));
    // Never installed again on its own, not even by a newer desired state for it.
    let again = decide(
        &OsUpdate::Committed {
            release: rel(1),
            slot: "A".into(),
        },
        Some(&wanted(2, true)),
        &[rel(2).digest],
        &facts("b2", "A"),
        &LIMITS,
    );
    assert!(matches!(again.next, OsUpdate::Failed { retry: false, .. }));
    assert_eq!(
        decide_now(&s.next, Some(&wanted(2, true)), &facts("b2", "A")).action,
        Action::Wait
    );
}

#[test]
fn the_health_gate_commits_a_healthy_slot() {
    let t = trial("b2", 1);
    let mut f = facts("b2", "B");
    assert_eq!(
        decide_now(&t, Some(&wanted(2, true)), &f).action,
        Action::CheckHealth { deadline: 1300 }
    );
    f.health = Health::Pass;
    assert_eq!(
        decide_now(&t, Some(&wanted(2, true)), &f),
        step(t.clone(), Action::MarkGood)
    );
    assert_eq!(
        apply(&t, Outcome::MarkedGood, 7),
        OsUpdate::Committed {
            release: rel(2),
            slot: "B".into()
        }
    );
    // A failed mark keeps the trial.
    assert_eq!(apply(&t, Outcome::EffectFailed("dbus".into()), 7), t);
}

#[test]
fn a_failed_or_late_health_gate_marks_the_slot_bad() {
    let t = trial("b2", 1);
    let mut f = facts("b2", "B");
    f.health = Health::Fail("unit k3s.service is failed".into());
    let s = decide_now(&t, Some(&wanted(2, true)), &f);
    assert_eq!(s, step(marked_bad("b2", false), Action::MarkBad));
    assert!(refuses(&s.next));
    f.health = Health::Pending("unit k3s.service is activating".into());
    f.now = 1300;
    let s = decide_now(&t, Some(&wanted(2, true)), &f);
    assert_eq!(s.action, Action::MarkBad);
    assert!(s.next.problem().is_some_and(|p| p.contains("within 300 s")));
    // Healthy but never marked good in twice the deadline: give up too.
    f.health = Health::Pass;
    f.now = 1600;
    assert_eq!(
        decide_now(&t, Some(&wanted(2, true)), &f).action,
        Action::MarkBad
    );
}

#[test]
fn a_slot_marked_bad_is_left_through_a_reboot_when_the_policy_allows() {
    let m = marked_bad("b2", false);
    assert_eq!(apply(&m, Outcome::MarkedBad, 7), marked_bad("b2", true));
    let done = marked_bad("b2", true);
    let mut f = facts("b2", "B");
    assert_eq!(decide_now(&done, None, &f).action, Action::Reboot);
    f.reboot = RebootGate::NotYet("not parked".into());
    assert_eq!(
        decide_now(&done, None, &f).action,
        Action::WaitReboot("not parked".into())
    );
    // An agent killed before the mark marks again (idempotent).
    assert_eq!(
        decide_now(&m, None, &facts("b2", "B")).action,
        Action::MarkBad
    );
}

#[test]
fn back_on_the_old_slot_after_a_health_failure_is_a_health_rollback() {
    let s = decide_now(
        &marked_bad("b2", true),
        Some(&wanted(2, true)),
        &facts("b3", "A"),
    );
    let OsUpdate::RolledBack { reason, slot, .. } = &s.next else {
        panic!("{s:?}");
    };
    assert_eq!(slot, "A");
    assert_eq!(
        reason,
        &RollbackReason::HealthFailure {
            detail: "unit k3s.service is failed".into()
        }
    );
    assert_eq!(s.action, Action::Report);
}

#[test]
fn a_bad_slot_booted_again_stops_instead_of_looping() {
    let s = decide_now(&marked_bad("b2", true), None, &facts("b3", "B"));
    assert!(
        matches!(s.next, OsUpdate::Failed { retry: false, .. }),
        "{s:?}"
    );
    assert!(s.next.problem().is_some_and(|p| p.contains("bootloader")));
}

#[test]
fn reboots_during_the_trial_are_counted_and_bounded() {
    let s = decide_now(&trial("b2", 1), Some(&wanted(2, true)), &facts("b3", "B"));
    assert_eq!(
        s.next,
        OsUpdate::Trial {
            release: rel(2),
            from: "A".into(),
            to: "B".into(),
            boot_id: "b3".into(),
            deadline: 1300,
            boots: 2,
            gate: TrialGate::Os,
        }
    );
    let s = decide_now(&s.next, Some(&wanted(2, true)), &facts("b4", "B"));
    assert_eq!(s.action, Action::MarkBad);
    assert!(
        s.next
            .problem()
            .is_some_and(|p| p.contains("restarted 3 times"))
    );
}

#[test]
fn the_bootloader_giving_up_during_the_trial_is_a_boot_failure() {
    let s = decide_now(&trial("b2", 1), Some(&wanted(2, true)), &facts("b3", "A"));
    assert!(matches!(
        s.next,
        OsUpdate::RolledBack {
            reason: RollbackReason::BootFailure { .. },
            ..
        }
    ));
    assert_eq!(s.action, Action::MarkOtherBad);
}

#[test]
fn an_unknown_booted_slot_fails_instead_of_guessing() {
    let s = decide_now(&pending("b1"), Some(&wanted(2, true)), &facts("b2", "C"));
    assert!(matches!(s.next, OsUpdate::Failed { retry: false, .. }));
}

#[test]
fn a_new_release_waits_for_a_trial_to_end_then_starts() {
    let t = trial("b2", 1);
    let s = decide_now(&t, Some(&wanted(3, true)), &facts("b2", "B"));
    assert_eq!(s.action, Action::CheckHealth { deadline: 1300 });
    let committed = OsUpdate::Committed {
        release: rel(2),
        slot: "B".into(),
    };
    let s = decide_now(&committed, Some(&wanted(3, false)), &facts("b2", "B"));
    assert_eq!(s.next, OsUpdate::Fetching { release: rel(3) });
    // The committed release itself asks for nothing more.
    assert_eq!(
        decide_now(&committed, Some(&wanted(2, true)), &facts("b2", "B")).action,
        Action::Wait
    );
}

#[test]
fn a_desired_state_without_an_os_bundle_stops_a_fetch_but_not_a_trial() {
    let f = facts("b1", "A");
    assert_eq!(
        decide_now(&OsUpdate::Fetching { release: rel(2) }, None, &f).next,
        OsUpdate::Idle
    );
    assert_eq!(decide_now(&pending("b1"), None, &f).action, Action::Abandon);
    let t = trial("b2", 1);
    assert_eq!(
        decide_now(&t, None, &facts("b2", "B")).action,
        Action::CheckHealth { deadline: 1300 }
    );
}

#[test]
fn the_refused_list_is_bounded_and_without_duplicates() {
    let mut record = OsRecord::default();
    record.refuse(&Digest([0xaa; 32]));
    record.refuse(&Digest([0xaa; 32]));
    assert_eq!(record.refused.as_slice(), [Digest([0xaa; 32])]);
    for i in 0..100 {
        record.refuse(&Digest([i; 32]));
    }
    assert_eq!(record.refused.len(), REFUSED_KEPT);
    assert_eq!(
        record.refused.first(),
        Some(&Digest([36; 32])),
        "the oldest went"
    );
    assert_eq!(record.refused.last(), Some(&Digest([99; 32])));
}

#[test]
fn every_state_survives_serialization() {
    for state in [
        OsUpdate::Idle,
        OsUpdate::Fetching { release: rel(2) },
        pending("b1"),
        trial("b2", 1),
        OsUpdate::Trial {
            release: rel(2),
            from: "A".into(),
            to: "B".into(),
            boot_id: "b2".into(),
            deadline: 1500,
            boots: 1,
            gate: TrialGate::Workloads,
        },
        marked_bad("b2", true),
        OsUpdate::RolledBack {
            release: rel(2),
            slot: "A".into(),
            reason: RollbackReason::HealthFailure { detail: "x".into() },
        },
    ] {
        let json = serde_json::to_string(&state).unwrap();
        assert!(
            json.contains(&format!("\"state\":\"{}\"", state.name())),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<OsUpdate>(&json).unwrap(), state);
    }
}

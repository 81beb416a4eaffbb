//! The trial of a release that also carries workloads: the slot commits only when both the OS
//! checks and the workloads are healthy; workloads rolled back take the slot back with them.

use super::*;

fn gated(gate: TrialGate, deadline: u64) -> OsUpdate {
    OsUpdate::Trial {
        release: rel(2),
        from: "A".into(),
        to: "B".into(),
        boot_id: "b2".into(),
        deadline,
        boots: 1,
        gate,
    }
}

fn with(health: Health, workloads: WorkloadsGate, now: u64) -> Facts {
    let mut f = facts("b2", "B");
    f.health = health;
    f.workloads = workloads;
    f.now = now;
    f
}

fn decide_with(t: &OsUpdate, f: &Facts) -> Step {
    decide_now(t, Some(&wanted(2, true)), f)
}

#[test]
fn a_healthy_os_hands_the_trial_to_the_workloads_with_a_fresh_deadline() {
    let t = trial("b2", 1);
    // The OS checks pending: the workloads are not asked yet.
    let s = decide_with(
        &t,
        &with(
            Health::Pending("k3s".into()),
            WorkloadsGate::NotStarted,
            1100,
        ),
    );
    assert_eq!(s, step(t.clone(), Action::CheckHealth { deadline: 1300 }));
    // Passed: the workloads' turn, with the full deadline to start.
    let s = decide_with(&t, &with(Health::Pass, WorkloadsGate::NotStarted, 1200));
    assert_eq!(
        s,
        step(
            gated(TrialGate::Workloads, 1500),
            Action::CheckHealth { deadline: 1500 }
        )
    );
}

#[test]
fn the_slot_is_marked_good_only_once_the_workloads_are_promoted() {
    let t = gated(TrialGate::Workloads, 1500);
    for running in [WorkloadsGate::NotStarted, WorkloadsGate::Running] {
        let s = decide_with(&t, &with(Health::Pass, running, 1400));
        assert_eq!(s, step(t.clone(), Action::CheckHealth { deadline: 1500 }));
    }
    // A long canary: started workloads are bounded by their own rollout, not this deadline.
    let s = decide_with(&t, &with(Health::Pass, WorkloadsGate::Running, 5000));
    assert_eq!(s, step(t.clone(), Action::CheckHealth { deadline: 1500 }));
    // Promoted: commit, with a deadline for RAUC to take the mark.
    let s = decide_with(&t, &with(Health::Pass, WorkloadsGate::Ready, 5000));
    assert_eq!(s, step(gated(TrialGate::Commit, 5300), Action::MarkGood));
    let c = gated(TrialGate::Commit, 5300);
    assert_eq!(
        decide_with(&c, &with(Health::Pass, WorkloadsGate::Ready, 5100)),
        step(c.clone(), Action::MarkGood)
    );
    assert_eq!(
        apply(&c, Outcome::MarkedGood, 7),
        OsUpdate::Committed {
            release: rel(2),
            slot: "B".into()
        }
    );
    // RAUC refusing the mark for the whole deadline: give up.
    let s = decide_with(&c, &with(Health::Pass, WorkloadsGate::Ready, 5300));
    assert_eq!(s.action, Action::MarkBad);
}

#[test]
fn workloads_rolled_back_take_the_slot_back() {
    for gate in [TrialGate::Os, TrialGate::Workloads, TrialGate::Commit] {
        let t = gated(gate, 1500);
        let s = decide_with(
            &t,
            &with(
                Health::Pass,
                WorkloadsGate::RolledBack("crash loop: app".into()),
                1400,
            ),
        );
        assert_eq!(s.action, Action::MarkBad, "{gate:?}");
        assert!(
            s.next
                .problem()
                .is_some_and(|p| p.contains("workloads were rolled back: crash loop: app")),
            "{s:?}"
        );
    }
}

#[test]
fn workloads_that_never_start_fail_the_trial_at_the_deadline() {
    let t = gated(TrialGate::Workloads, 1500);
    let s = decide_with(&t, &with(Health::Pass, WorkloadsGate::NotStarted, 1500));
    assert_eq!(s.action, Action::MarkBad);
    assert!(
        s.next
            .problem()
            .is_some_and(|p| p.contains("did not start within 300 s")),
        "{s:?}"
    );
}

#[test]
fn an_os_check_failing_while_the_workloads_run_fails_the_trial() {
    let t = gated(TrialGate::Workloads, 1500);
    let s = decide_with(
        &t,
        &with(
            Health::Fail("unit k3s.service is failed".into()),
            WorkloadsGate::Running,
            1400,
        ),
    );
    assert_eq!(s.action, Action::MarkBad);
    // Promoted while an OS check is not passing: commit waits for it, until its deadline.
    let s = decide_with(
        &t,
        &with(Health::Pending("k3s".into()), WorkloadsGate::Ready, 1400),
    );
    assert_eq!(
        s,
        step(
            gated(TrialGate::Commit, 1700),
            Action::CheckHealth { deadline: 1700 }
        )
    );
    let c = gated(TrialGate::Commit, 1700);
    let s = decide_with(
        &c,
        &with(Health::Pending("k3s".into()), WorkloadsGate::Ready, 1700),
    );
    assert_eq!(s.action, Action::MarkBad);
    assert!(
        s.next
            .problem()
            .is_some_and(|p| p.contains("passed, then did not pass again")),
        "{s:?}"
    );
}

#[test]
fn a_new_boot_checks_the_os_again() {
    let t = gated(TrialGate::Workloads, 1500);
    let s = decide_now(&t, Some(&wanted(2, true)), &facts("b3", "B"));
    assert!(
        matches!(
            s.next,
            OsUpdate::Trial {
                gate: TrialGate::Os,
                boots: 2,
                ..
            }
        ),
        "{s:?}"
    );
}

#[test]
fn a_trial_without_workloads_decides_as_before() {
    let t = trial("b2", 1);
    let s = decide_with(&t, &with(Health::Pass, WorkloadsGate::NotPart, 1200));
    assert_eq!(s, step(t, Action::MarkGood));
}

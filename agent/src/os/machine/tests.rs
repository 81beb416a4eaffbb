//! One test per row of the transition table in docs/state-machines.md.

use super::*;

const LIMITS: Limits = Limits {
    max_installs: 3,
    max_trial_boots: 2,
    health_deadline_secs: 300,
};

fn rel(n: u8) -> ReleaseRef {
    ReleaseRef {
        digest: Digest([n; 32]),
        line: "os".into(),
        version: semver::Version::new(u64::from(n), 0, 0),
    }
}

fn wanted(n: u8, ready: bool) -> Wanted {
    Wanted {
        release: rel(n),
        counter: 7,
        ready,
    }
}

fn facts(boot: &str, booted: &str) -> Facts {
    Facts {
        boot_id: boot.into(),
        booted: booted.into(),
        rauc_idle: true,
        now: 1000,
        reboot: RebootGate::Allowed,
        health: Health::Pending("not checked yet".into()),
        boot_confirmed: true,
        workloads: WorkloadsGate::NotPart,
    }
}

fn decide_now(current: &OsUpdate, w: Option<&Wanted>, f: &Facts) -> Step {
    decide(current, w, &[], f, &LIMITS)
}

fn pending(boot: &str) -> OsUpdate {
    OsUpdate::PendingReboot {
        release: rel(2),
        from: "A".into(),
        to: "B".into(),
        boot_id: boot.into(),
    }
}

fn trial(boot: &str, boots: u32) -> OsUpdate {
    OsUpdate::Trial {
        release: rel(2),
        from: "A".into(),
        to: "B".into(),
        boot_id: boot.into(),
        deadline: 1300,
        boots,
        gate: TrialGate::Os,
    }
}

fn marked_bad(boot: &str, marked: bool) -> OsUpdate {
    OsUpdate::MarkedBad {
        release: rel(2),
        from: "A".into(),
        to: "B".into(),
        boot_id: boot.into(),
        why: "unit k3s.service is failed".into(),
        marked,
    }
}

#[test]
fn idle_without_an_os_release_waits() {
    let s = decide_now(&OsUpdate::Idle, None, &facts("b1", "A"));
    assert_eq!(s, step(OsUpdate::Idle, Action::Wait));
}

#[test]
fn a_release_not_yet_on_the_car_is_fetched_first() {
    let s = decide_now(&OsUpdate::Idle, Some(&wanted(2, false)), &facts("b1", "A"));
    assert_eq!(s.next, OsUpdate::Fetching { release: rel(2) });
    assert_eq!(s.action, Action::Report);
}

#[test]
fn every_boot_of_a_settled_slot_is_confirmed_once_healthy() {
    let mut f = facts("b1", "A");
    f.boot_confirmed = false;
    let committed = OsUpdate::Committed {
        release: rel(1),
        slot: "A".into(),
    };
    for state in [OsUpdate::Idle, committed.clone()] {
        assert_eq!(
            decide_now(&state, None, &f).action,
            Action::CheckHealth { deadline: u64::MAX }
        );
    }
    f.health = Health::Pass;
    assert_eq!(
        decide_now(&committed, None, &f),
        step(committed.clone(), Action::ConfirmBoot)
    );
    f.boot_confirmed = true;
    assert_eq!(decide_now(&committed, None, &f).action, Action::Wait);
}

#[test]
fn a_fetched_bundle_is_verified_before_install() {
    let s = decide_now(
        &OsUpdate::Fetching { release: rel(2) },
        Some(&wanted(2, true)),
        &facts("b1", "A"),
    );
    assert_eq!(
        s,
        step(OsUpdate::Verifying { release: rel(2) }, Action::Verify)
    );
    let s = decide_now(&OsUpdate::Idle, Some(&wanted(2, true)), &facts("b1", "A"));
    assert_eq!(s.action, Action::Verify);
}

#[test]
fn verification_leads_to_the_first_install_and_a_bad_digest_fails_retryably() {
    let v = OsUpdate::Verifying { release: rel(2) };
    assert_eq!(
        apply(&v, Outcome::Verified, 7),
        OsUpdate::Installing {
            release: rel(2),
            attempt: 1
        }
    );
    let failed = apply(&v, Outcome::VerifyFailed("digest differs".into()), 7);
    assert!(matches!(
        failed,
        OsUpdate::Failed {
            retry: true,
            counter: 7,
            ..
        }
    ));
    assert!(!refuses(&failed));
    // The same desired state does not retry; a newer one (higher counter) does.
    let same = decide_now(&failed, Some(&wanted(2, true)), &facts("b1", "A"));
    assert_eq!(same.action, Action::Wait);
    let newer = Wanted {
        counter: 8,
        ..wanted(2, true)
    };
    assert_eq!(
        decide_now(&failed, Some(&newer), &facts("b1", "A")).action,
        Action::Verify
    );
}

#[test]
fn an_interrupted_install_is_started_again_up_to_the_limit() {
    let i = OsUpdate::Installing {
        release: rel(2),
        attempt: 1,
    };
    assert_eq!(
        apply(&i, Outcome::InstallInterrupted("rauc vanished".into()), 7),
        i
    );
    let s = decide_now(&i, Some(&wanted(2, true)), &facts("b1", "A"));
    assert_eq!(
        s,
        step(
            OsUpdate::Installing {
                release: rel(2),
                attempt: 2
            },
            Action::Install
        )
    );
    let last = OsUpdate::Installing {
        release: rel(2),
        attempt: 3,
    };
    let s = decide_now(&last, Some(&wanted(2, true)), &facts("b1", "A"));
    assert!(
        matches!(s.next, OsUpdate::Failed { retry: false, .. }),
        "{s:?}"
    );
    assert!(refuses(&s.next));
}

#[test]
fn an_install_rauc_still_runs_is_waited_for() {
    let i = OsUpdate::Installing {
        release: rel(2),
        attempt: 1,
    };
    let mut f = facts("b1", "A");
    f.rauc_idle = false;
    assert_eq!(
        decide_now(&i, Some(&wanted(2, true)), &f).action,
        Action::WaitRaucIdle
    );
}

#[test]
fn a_bundle_rauc_refuses_fails_for_good() {
    let i = OsUpdate::Installing {
        release: rel(2),
        attempt: 1,
    };
    let s = apply(&i, Outcome::InstallRefused("signature".into()), 7);
    assert!(matches!(s, OsUpdate::Failed { retry: false, .. }));
    assert!(refuses(&s));
}

#[test]
fn an_installed_slot_waits_for_the_reboot_policy() {
    let i = OsUpdate::Installing {
        release: rel(2),
        attempt: 1,
    };
    let p = apply(
        &i,
        Outcome::Installed {
            from: "A".into(),
            to: "B".into(),
            boot_id: "b1".into(),
        },
        7,
    );
    assert_eq!(p, pending("b1"));
    let w = wanted(2, true);
    assert_eq!(
        decide_now(&p, Some(&w), &facts("b1", "A")).action,
        Action::Reboot
    );
    let mut f = facts("b1", "A");
    f.reboot = RebootGate::NotYet("outside 02:00-04:00 UTC".into());
    assert_eq!(
        decide_now(&p, Some(&w), &f).action,
        Action::WaitReboot("outside 02:00-04:00 UTC".into())
    );
}

#[test]
fn a_newer_release_abandons_a_slot_not_yet_booted() {
    let p = pending("b1");
    let s = decide_now(&p, Some(&wanted(3, true)), &facts("b1", "A"));
    assert_eq!(s, step(p.clone(), Action::Abandon));
    assert_eq!(apply(&p, Outcome::Abandoned, 7), OsUpdate::Idle);
    let s = decide_now(&OsUpdate::Idle, Some(&wanted(3, true)), &facts("b1", "A"));
    assert_eq!(s.next, OsUpdate::Verifying { release: rel(3) });
}

mod after_reboot;
mod with_workloads;

//! The rows of docs/state-machines.md ("Fleet deployments"), then the invariants on random fleets.

use super::*;

fn plan(phases: &[(Size, u64)], fail: f64, succeed: f64) -> Plan {
    Plan {
        phases: phases
            .iter()
            .map(|(size, soak_secs)| PhaseSpec {
                size: *size,
                soak_secs: *soak_secs,
            })
            .collect(),
        max_starts_per_minute: None,
        failure_threshold: fail,
        success_threshold: succeed,
        expires_at: 1_000_000,
    }
}

/// A fleet the tests steer: ids, online, outcomes.
struct Fleet {
    ids: Vec<String>,
    online: Vec<bool>,
    outcome: Vec<Outcome>,
}

impl Fleet {
    fn new(n: usize) -> Self {
        Self {
            ids: (0..n).map(|i| format!("car-{i:05}")).collect(),
            online: vec![true; n],
            outcome: vec![Outcome::Pending; n],
        }
    }

    fn cars(&self) -> Vec<Car<'_>> {
        self.ids
            .iter()
            .zip(&self.online)
            .zip(&self.outcome)
            .map(|((id, online), outcome)| Car {
                id,
                online: *online,
                outcome: *outcome,
            })
            .collect()
    }

    fn set(&mut self, ids: &[String], outcome: Outcome) {
        for id in ids {
            let i = self.ids.iter().position(|x| x == id).unwrap();
            self.outcome[i] = outcome;
        }
    }
}

fn canary_and_waves() -> Plan {
    plan(
        &[
            (Size::Cars(5), 60),
            (Size::Percent(10.0), 60),
            (Size::Percent(50.0), 60),
            (Size::Percent(100.0), 0),
        ],
        0.1,
        0.9,
    )
}

#[test]
fn a_canary_then_waves_run_to_completion() {
    let plan = canary_and_waves();
    plan.check().unwrap();
    let mut fleet = Fleet::new(100);
    let mut p = Progress::default();
    let mut t = 0;
    let mut phases_started = vec![];
    while p.state != State::Completed {
        let s = step(&plan, &p, &fleet.cars(), t);
        if !s.start.is_empty() {
            phases_started.push((s.progress.phase, s.start.len()));
        }
        fleet.set(&s.start, Outcome::Succeeded);
        p = s.progress;
        t += 10;
        assert!(t < 10_000, "never completed: {p:?}");
    }
    assert_eq!(phases_started, vec![(0, 5), (1, 5), (2, 40), (3, 50)]);
    assert_eq!(p.started.len(), 100);
}

#[test]
fn the_next_phase_waits_for_the_soak() {
    let plan = canary_and_waves();
    let mut fleet = Fleet::new(100);
    let s = step(&plan, &Progress::default(), &fleet.cars(), 0);
    fleet.set(&s.start, Outcome::Succeeded);
    let s = step(&plan, &s.progress, &fleet.cars(), 100);
    assert_eq!(s.progress.phase_over_at, Some(100));
    assert!(s.start.is_empty(), "soaking");
    let s = step(&plan, &s.progress, &fleet.cars(), 159);
    assert!(s.start.is_empty(), "still soaking");
    let s = step(&plan, &s.progress, &fleet.cars(), 160);
    assert_eq!(s.progress.phase, 1);
    assert_eq!(s.start.len(), 5);
    assert!(s.event.unwrap().contains("phase 1 over (5 of 5 succeeded)"));
}

#[test]
fn a_phase_is_not_over_until_enough_succeeded() {
    let plan = canary_and_waves();
    let mut fleet = Fleet::new(100);
    let s = step(&plan, &Progress::default(), &fleet.cars(), 0);
    // 4 of 5: below 90 %, and 1 failure is below 10 % of 5 rounded up... it is exactly one car:
    // the threshold halts.
    fleet.set(&s.start[..4], Outcome::Succeeded);
    let s2 = step(&plan, &s.progress, &fleet.cars(), 1000);
    assert_eq!(s2.progress.phase, 0, "4 of 5 is not 90 %");
    assert!(s2.start.is_empty());
    fleet.set(&s.start[4..], Outcome::Failed);
    let s3 = step(&plan, &s2.progress, &fleet.cars(), 1001);
    assert!(matches!(s3.progress.state, State::Halted { .. }), "{s3:?}");
}

#[test]
fn failures_over_the_threshold_in_a_wave_halt_and_start_no_further_car() {
    let plan = canary_and_waves();
    let mut fleet = Fleet::new(1000);
    let mut p = Progress::default();
    let mut t = 0;
    // Through the canary and the first wave (10 % = 100 cars), all good, until the second wave
    // (up to 50 %: a group of 400) starts.
    let s = loop {
        let s = step(&plan, &p, &fleet.cars(), t);
        if s.progress.phase == 2 {
            break s;
        }
        fleet.set(&s.start, Outcome::Succeeded);
        p = s.progress;
        t += 60;
    };
    assert_eq!(s.start.len(), 400);
    // 40 of its cars fail: 10 %.
    fleet.set(&s.start[..39], Outcome::Failed);
    let s2 = step(&plan, &s.progress, &fleet.cars(), t + 1);
    assert_eq!(
        s2.progress.state,
        State::Running,
        "39 is below the threshold"
    );
    fleet.set(&s.start[39..40], Outcome::Failed);
    let halted = step(&plan, &s2.progress, &fleet.cars(), t + 2);
    let State::Halted { reason } = &halted.progress.state else {
        panic!("{halted:?}")
    };
    assert!(
        reason.contains("40 cars failed") && reason.contains("10 %"),
        "{reason}"
    );
    assert_eq!(halted.event.as_deref(), Some(reason.as_str()));
    // Not one car beyond the wave's budget: 500 started, the rest wait.
    assert_eq!(halted.progress.started.len(), 500);
    // Halted stays halted, however the cars fare.
    fleet.set(&s.start[40..], Outcome::Succeeded);
    let again = step(&plan, &halted.progress, &fleet.cars(), t + 10_000);
    assert!(again.start.is_empty());
    assert_eq!(again.progress, halted.progress);
    // Resumed: the failures so far are forgiven, the wave goes on.
    let resumed = resume(&halted.progress, &fleet.cars()).unwrap();
    assert_eq!(resumed.forgiven, 40);
    let s = step(&plan, &resumed, &fleet.cars(), t + 10_001);
    assert_eq!(s.progress.state, State::Running);
    assert_eq!(
        s.progress.phase_over_at,
        Some(t + 10_001),
        "360 of 400 is 90 %"
    );
}

#[test]
fn pause_resume_and_abort() {
    let plan = canary_and_waves();
    let fleet = Fleet::new(50);
    let s = step(&plan, &Progress::default(), &fleet.cars(), 0);
    let paused = pause(&s.progress).unwrap();
    assert!(step(&plan, &paused, &fleet.cars(), 1).start.is_empty());
    assert!(pause(&paused).is_err());
    let resumed = resume(&paused, &fleet.cars()).unwrap();
    assert_eq!(resumed.state, State::Running);
    let aborted = abort(&resumed).unwrap();
    let s = step(&plan, &aborted, &fleet.cars(), 2);
    assert!(s.start.is_empty());
    assert_eq!(s.progress.state, State::Aborted);
    assert!(resume(&aborted, &fleet.cars()).is_err());
    assert!(abort(&aborted).is_err());
}

#[test]
fn the_time_to_live_ends_it_with_the_cars_never_reached() {
    let mut plan = plan(&[(Size::Percent(100.0), 0)], 0.5, 0.5);
    plan.expires_at = 500;
    let mut fleet = Fleet::new(10);
    for i in 6..10 {
        fleet.online[i] = false;
    }
    let s = step(&plan, &Progress::default(), &fleet.cars(), 0);
    assert_eq!(s.start.len(), 6, "offline cars do not start");
    fleet.set(&s.start, Outcome::Succeeded);
    let s = step(&plan, &s.progress, &fleet.cars(), 499);
    assert_eq!(
        s.progress.state,
        State::Running,
        "four cars are still to come"
    );
    let s = step(&plan, &s.progress, &fleet.cars(), 500);
    assert_eq!(s.progress.state, State::Expired { never_reached: 4 });
    assert!(
        s.event
            .unwrap()
            .contains("4 selected cars were never started")
    );
    // A car that comes online after the end does not start.
    fleet.online[6] = true;
    assert!(
        step(&plan, &s.progress, &fleet.cars(), 501)
            .start
            .is_empty()
    );
}

#[test]
fn a_car_that_starts_to_match_joins_the_current_phase() {
    let plan = plan(
        &[(Size::Percent(50.0), 0), (Size::Percent(100.0), 0)],
        0.5,
        0.5,
    );
    let mut fleet = Fleet::new(4);
    let s = step(&plan, &Progress::default(), &fleet.cars(), 0);
    assert_eq!(s.start.len(), 2);
    // Two more cars match now (one drove into the geofence...): 50 % of 6 is 3.
    fleet
        .ids
        .extend(["car-99998".to_owned(), "car-99999".to_owned()]);
    fleet.online.extend([true, true]);
    fleet.outcome.extend([Outcome::Pending, Outcome::Pending]);
    let s = step(&plan, &s.progress, &fleet.cars(), 1);
    assert_eq!(s.start, vec!["car-00002".to_owned()]);
}

#[test]
fn the_rate_limit_spreads_the_starts() {
    let mut plan = plan(&[(Size::Percent(100.0), 0)], 0.5, 0.5);
    plan.max_starts_per_minute = Some(3);
    let fleet = Fleet::new(10);
    let s = step(&plan, &Progress::default(), &fleet.cars(), 0);
    assert_eq!(s.start.len(), 3);
    let s = step(&plan, &s.progress, &fleet.cars(), 59);
    assert!(s.start.is_empty());
    let s = step(&plan, &s.progress, &fleet.cars(), 60);
    assert_eq!(s.start.len(), 3);
}

#[test]
fn plans_that_cannot_run_are_refused() {
    let ok = canary_and_waves();
    for (change, why) in [
        (
            Box::new(|p: &mut Plan| p.phases.clear()) as Box<dyn Fn(&mut Plan)>,
            "0 phases",
        ),
        (
            Box::new(|p: &mut Plan| p.failure_threshold = 1.5),
            "failure_threshold",
        ),
        (
            Box::new(|p: &mut Plan| p.success_threshold = -0.1),
            "success_threshold",
        ),
        (
            Box::new(|p: &mut Plan| p.max_starts_per_minute = Some(0)),
            "would start no car",
        ),
        (
            Box::new(|p: &mut Plan| p.phases[1].size = Size::Percent(0.0)),
            "more than 0",
        ),
        (
            Box::new(|p: &mut Plan| p.phases[0].size = Size::Cars(0)),
            "0 cars",
        ),
        (
            Box::new(|p: &mut Plan| p.phases[2].size = Size::Percent(5.0)),
            "fewer cars than the one before",
        ),
    ] {
        let mut p = ok.clone();
        change(&mut p);
        let e = p.check().unwrap_err();
        assert!(e.0.contains(why), "{e}");
    }
}

/// Random fleets, plans and outcomes: the invariants hold at every step.
#[test]
fn invariants_hold_on_random_fleets() {
    // What the random runs reached, so that the invariants were tested where they matter.
    let mut reached = std::collections::BTreeMap::<&str, u32>::new();
    for seed in 0..300 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let n = rng.usize(1..300);
        let mut fleet = Fleet::new(n);
        let mut phases = vec![(Size::Cars(rng.u64(1..10)), rng.u64(0..120))];
        let mut pct = 0.0;
        for _ in 0..rng.usize(0..4) {
            pct = (pct + rng.f64() * 60.0 + 1.0_f64).min(100.0);
            phases.push((Size::Percent(pct), rng.u64(0..120)));
        }
        let mut plan = plan(&phases, rng.f64(), rng.f64());
        plan.max_starts_per_minute = rng.bool().then(|| rng.u32(1..50));
        plan.expires_at = rng.u64(100..5000);
        if plan.check().is_err() {
            continue;
        }
        let mut p = Progress::default();
        let mut t = 0;
        let mut starts: Vec<u64> = Vec::new();
        while t < 6000 {
            for i in 0..fleet.ids.len() {
                if rng.u8(..) < 20 {
                    fleet.online[i] = !fleet.online[i];
                }
                if p.started.contains_key(&fleet.ids[i]) && fleet.outcome[i] == Outcome::Pending {
                    match rng.u8(..) {
                        0..40 => fleet.outcome[i] = Outcome::Succeeded,
                        40..44 => fleet.outcome[i] = Outcome::Failed,
                        _ => {}
                    }
                }
            }
            if rng.u8(..) < 10 {
                let i = fleet.ids.len();
                fleet.ids.push(format!("joiner-{i}"));
                fleet.online.push(true);
                fleet.outcome.push(Outcome::Pending);
            }
            let cars = fleet.cars();
            let s = step(&plan, &p, &cars, t);
            let context = format!("seed {seed}, t {t}: {s:?}");
            // No car gets the release twice, nor a car twice in one step.
            let mut seen = std::collections::BTreeSet::new();
            for id in &s.start {
                assert!(!p.started.contains_key(id), "started twice: {context}");
                assert!(seen.insert(id), "twice in one step: {context}");
            }
            // Never more cars than the current phase allows.
            let target = targets(&plan, cars.len() as u64)[s.progress.phase];
            assert!(
                s.progress.started.len() as u64 <= target,
                "over budget: {context}"
            );
            // A halted, paused or ended deployment starts nobody and stays as it is.
            if matches!(p.state, State::Halted { .. } | State::Paused) || p.state.is_over() {
                assert!(s.start.is_empty(), "{context}");
                if t < plan.expires_at {
                    assert_eq!(s.progress.state, p.state, "{context}");
                }
            }
            // The time-to-live is honoured.
            if t >= plan.expires_at {
                assert!(s.start.is_empty(), "{context}");
                assert!(
                    matches!(
                        s.progress.state,
                        State::Expired { .. } | State::Completed | State::Aborted
                    ),
                    "{context}"
                );
            }
            // The rate limit holds over any minute.
            starts.extend(std::iter::repeat_n(t, s.start.len()));
            if let Some(max) = plan.max_starts_per_minute {
                let recent = starts.iter().filter(|&&at| at + 60 > t).count();
                assert!(recent <= max as usize, "rate: {context}");
            }
            // Only connected cars start.
            for id in &s.start {
                let c = cars.iter().find(|c| c.id == id).unwrap();
                assert!(c.online, "{context}");
            }
            *reached.entry(name(&s.progress.state)).or_default() += 1;
            if s.progress.phase > 0 {
                *reached.entry("a later phase").or_default() += 1;
            }
            p = s.progress;
            // Now and then an operator resumes a halted one.
            if matches!(p.state, State::Halted { .. }) && rng.u8(..) < 30 {
                p = resume(&p, &fleet.cars()).unwrap();
            }
            t += rng.u64(1..40);
        }
    }
    for state in ["running", "halted", "completed", "expired", "a later phase"] {
        assert!(
            reached.get(state).is_some_and(|&n| n > 10),
            "the random runs rarely reached {state}: {reached:?}"
        );
    }
}

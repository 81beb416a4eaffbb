//! The rollout of one deployment: a pure function of the plan, the progress so far, the cars the
//! deployment selects and the time — which cars start now, and which phase, halt or end follows.
//! No I/O: the twin's driver gathers the cars' outcomes, calls [`step`], persists the progress,
//! then sets the started cars' desired states. docs/state-machines.md ("Fleet deployments") is
//! the table; the tests below walk its rows and check its invariants on random fleets.
//!
//! Phases are cumulative: a canary of 10 cars, then waves of 10 %, 50 % and 100 % of the cars the
//! deployment selects. A phase's **group** is what it adds to the one before. A phase is **over**
//! when every car of its group started and enough of them succeeded
//! (`success_threshold` × group); then it soaks for its `soak_secs`, and the next phase starts.
//! When the failures among the cars it started reach `failure_threshold` × the current phase's
//! group (at least one car), the deployment **halts**: no car starts until an operator resumes (which forgives the failures
//! so far) or aborts it. At `expires_at` (the time-to-live), cars that have not started never
//! will, and the deployment ends with how many it never reached.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How far a phase reaches: a number of cars or a share of the cars the deployment selects.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Size {
    Cars(u64),
    Percent(f64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseSpec {
    pub size: Size,
    /// Seconds the phase must stay good once over before the next one starts.
    pub soak_secs: u64,
}

/// What an operator asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub phases: Vec<PhaseSpec>,
    /// Cars started per minute at most (none: no limit).
    pub max_starts_per_minute: Option<u32>,
    /// Share of a phase's group that failed (or rolled back) at which the deployment halts.
    pub failure_threshold: f64,
    /// Share of a phase's group that must succeed before the next phase starts.
    pub success_threshold: f64,
    /// Unix seconds: the time-to-live ends.
    pub expires_at: u64,
}

/// Why a plan was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("deployment plan: {0}")]
pub struct PlanError(pub String);

impl Plan {
    /// Refuse what cannot run: no phase, shares out of range, sizes that shrink.
    pub fn check(&self) -> Result<(), PlanError> {
        let bad = |why: String| Err(PlanError(why));
        if self.phases.is_empty() || self.phases.len() > 32 {
            return bad(format!("{} phases: give 1 to 32", self.phases.len()));
        }
        for (name, t) in [
            ("failure_threshold", self.failure_threshold),
            ("success_threshold", self.success_threshold),
        ] {
            if !(0.0..=1.0).contains(&t) {
                return bad(format!("{name} = {t}: give a share from 0 to 1"));
            }
        }
        if self.max_starts_per_minute == Some(0) {
            return bad("max_starts_per_minute = 0 would start no car".into());
        }
        // Sizes grow: compared on a large fleet, where both kinds are exact enough.
        let mut last = 0;
        for (i, p) in self.phases.iter().enumerate() {
            if let Size::Percent(x) = p.size
                && !(x > 0.0 && x <= 100.0)
            {
                return bad(format!(
                    "phase {}: {x} % — give more than 0 and at most 100",
                    i + 1
                ));
            }
            if let Size::Cars(0) = p.size {
                return bad(format!("phase {}: 0 cars", i + 1));
            }
            let reach = target(p.size, 1_000_000_000);
            if reach < last {
                return bad(format!(
                    "phase {} reaches fewer cars than the one before: phases are cumulative",
                    i + 1
                ));
            }
            last = reach;
        }
        Ok(())
    }
}

/// What the twin knows of a car the deployment selects (or started).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Car<'a> {
    pub id: &'a str,
    /// Connected now: only connected cars start (an offline car would hold its phase open).
    pub online: bool,
    pub outcome: Outcome,
}

/// A car's outcome for the deployment's release, from what it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not asked yet, or asked and still working on it.
    Pending,
    /// Runs the release (committed, or applied for a release no part applies).
    Succeeded,
    /// Failed it or rolled it back.
    Failed,
}

/// Where the deployment stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum State {
    Running,
    Paused,
    Halted {
        reason: String,
    },
    Completed,
    Aborted,
    /// The time-to-live ended: `never_reached` cars it selected never started.
    Expired {
        never_reached: u64,
    },
}

impl State {
    /// Whether it can start cars again (with an operator's help or without).
    pub fn is_over(&self) -> bool {
        matches!(self, Self::Completed | Self::Aborted | Self::Expired { .. })
    }
}

/// A car the deployment started: in which phase (0-based) and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub phase: usize,
    pub at: u64,
}

/// The deployment's progress: persisted after every step, before its effects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub state: State,
    /// The current phase, 0-based.
    pub phase: usize,
    /// The cars started (kept beside the progress, a row each, not in its document).
    #[serde(skip)]
    pub started: BTreeMap<String, Started>,
    /// When the current phase was over (its soak runs from then).
    pub phase_over_at: Option<u64>,
    /// Failures that an operator's resume forgave (they no longer count towards a halt).
    pub forgiven: u64,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            state: State::Running,
            phase: 0,
            started: BTreeMap::new(),
            phase_over_at: None,
            forgiven: 0,
        }
    }
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Cars to start (their desired state is set to the release), in this order.
    pub start: Vec<String>,
    pub progress: Progress,
    /// What happened, for the deployment's log (a phase over, a halt, the end).
    pub event: Option<String>,
}

/// The cars phase `size` reaches among `total`, cumulative. A share rounds up, so a phase of a
/// small fleet still reaches a car.
pub fn target(size: Size, total: u64) -> u64 {
    match size {
        Size::Cars(n) => n.min(total),
        Size::Percent(p) => ((p / 100.0 * total as f64).ceil() as u64).min(total),
    }
}

/// The cumulative target of each phase among `total` cars (never decreasing).
pub fn targets(plan: &Plan, total: u64) -> Vec<u64> {
    let mut last = 0;
    plan.phases
        .iter()
        .map(|p| {
            last = target(p.size, total).max(last);
            last
        })
        .collect()
}

/// How many of `group` cars `share` asks for: at least one.
fn threshold(share: f64, group: u64) -> u64 {
    ((share * group as f64).ceil() as u64).max(1)
}

/// Counts of one phase's cars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseCounts {
    pub group: u64,
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
}

/// The counts of `phase` among `cars`.
pub fn phase_counts(
    plan: &Plan,
    progress: &Progress,
    cars: &[Car<'_>],
    phase: usize,
) -> PhaseCounts {
    let targets = targets(plan, cars.len() as u64);
    let group =
        targets.get(phase).copied().unwrap_or(0) - phase.checked_sub(1).map_or(0, |p| targets[p]);
    let mut counts = PhaseCounts {
        group,
        ..PhaseCounts::default()
    };
    for car in cars {
        if progress
            .started
            .get(car.id)
            .is_some_and(|s| s.phase == phase)
        {
            counts.started += 1;
            match car.outcome {
                Outcome::Succeeded => counts.succeeded += 1,
                Outcome::Failed => counts.failed += 1,
                Outcome::Pending => {}
            }
        }
    }
    counts
}

/// The next step of the deployment. `cars` are the cars it selects now and those it started
/// (whether they still match or not), each once.
pub fn step(plan: &Plan, progress: &Progress, cars: &[Car<'_>], now: u64) -> Step {
    let mut next = progress.clone();
    let unchanged = |next: Progress| Step {
        start: Vec::new(),
        progress: next,
        event: None,
    };
    if next.state.is_over() {
        return unchanged(next);
    }
    if now >= plan.expires_at {
        let never_reached = cars
            .iter()
            .filter(|c| !next.started.contains_key(c.id))
            .count() as u64;
        next.state = State::Expired { never_reached };
        return Step {
            start: Vec::new(),
            progress: next,
            event: Some(format!(
                "time-to-live over: {never_reached} selected cars were never started"
            )),
        };
    }
    if !matches!(next.state, State::Running) {
        return unchanged(next);
    }
    let last_phase = plan.phases.len() - 1;
    let mut event = None;
    // A phase may end and the next start in one step (a soak of zero); each pass looks at one.
    loop {
        let counts = phase_counts(plan, &next, cars, next.phase);
        // A late failure of an earlier phase's car counts too: a failure is a failure.
        let failures = failed(&next, cars).saturating_sub(next.forgiven);
        if counts.group > 0 && failures >= threshold(plan.failure_threshold, counts.group) {
            let reason = format!(
                "halted in phase {}: {failures} cars failed, the threshold is {:.0} % of its {} cars",
                next.phase + 1,
                plan.failure_threshold * 100.0,
                counts.group,
            );
            next.state = State::Halted {
                reason: reason.clone(),
            };
            return Step {
                start: Vec::new(),
                progress: next,
                event: Some(reason),
            };
        }
        let over = counts.started >= counts.group
            && counts.succeeded
                >= threshold(plan.success_threshold, counts.group).min(counts.group);
        if !over {
            next.phase_over_at = None;
            break;
        }
        if next.phase == last_phase {
            let everyone = cars
                .iter()
                .all(|c| next.started.contains_key(c.id) && c.outcome != Outcome::Pending);
            if everyone {
                next.state = State::Completed;
                return Step {
                    start: Vec::new(),
                    progress: next,
                    event: Some(format!("completed: {} cars", cars.len())),
                };
            }
            break;
        }
        let since = *next.phase_over_at.get_or_insert(now);
        if now < since.saturating_add(plan.phases[next.phase].soak_secs) {
            break;
        }
        event = Some(format!(
            "phase {} over ({} of {} succeeded); phase {} starts",
            next.phase + 1,
            counts.succeeded,
            counts.group,
            next.phase + 2
        ));
        next.phase += 1;
        next.phase_over_at = None;
    }
    // Starts: up to the phase's cumulative target, within the rate limit, connected cars only.
    let target = targets(plan, cars.len() as u64)[next.phase];
    let budget = target.saturating_sub(next.started.len() as u64);
    let allowed = plan.max_starts_per_minute.map_or(u64::MAX, |max| {
        let recent = next.started.values().filter(|s| s.at + 60 > now).count() as u64;
        u64::from(max).saturating_sub(recent)
    });
    let mut candidates: Vec<&str> = cars
        .iter()
        .filter(|c| c.online && !next.started.contains_key(c.id))
        .map(|c| c.id)
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    let start: Vec<String> = candidates
        .into_iter()
        .take(budget.min(allowed) as usize)
        .map(str::to_owned)
        .collect();
    for id in &start {
        next.started.insert(
            id.clone(),
            Started {
                phase: next.phase,
                at: now,
            },
        );
    }
    Step {
        start,
        progress: next,
        event,
    }
}

/// An operator's pause: nothing starts until resumed.
pub fn pause(progress: &Progress) -> Result<Progress, String> {
    match progress.state {
        State::Running => Ok(Progress {
            state: State::Paused,
            ..progress.clone()
        }),
        ref s => Err(format!("a {} deployment cannot be paused", name(s))),
    }
}

/// Cars the deployment started that failed.
fn failed(progress: &Progress, cars: &[Car<'_>]) -> u64 {
    cars.iter()
        .filter(|c| c.outcome == Outcome::Failed && progress.started.contains_key(c.id))
        .count() as u64
}

/// An operator's resume of a paused or halted deployment: the failures so far are forgiven
/// (the operator looked at them), new ones count again.
pub fn resume(progress: &Progress, cars: &[Car<'_>]) -> Result<Progress, String> {
    match progress.state {
        State::Paused | State::Halted { .. } => Ok(Progress {
            state: State::Running,
            forgiven: failed(progress, cars),
            ..progress.clone()
        }),
        ref s => Err(format!("a {} deployment cannot be resumed", name(s))),
    }
}

/// An operator's abort: no car starts any more (cars already started keep their release).
pub fn abort(progress: &Progress) -> Result<Progress, String> {
    if progress.state.is_over() {
        return Err(format!(
            "a {} deployment cannot be aborted",
            name(&progress.state)
        ));
    }
    Ok(Progress {
        state: State::Aborted,
        ..progress.clone()
    })
}

/// The state's name, as the API writes it.
pub fn name(state: &State) -> &'static str {
    match state {
        State::Running => "running",
        State::Paused => "paused",
        State::Halted { .. } => "halted",
        State::Completed => "completed",
        State::Aborted => "aborted",
        State::Expired { .. } => "expired",
    }
}

#[cfg(test)]
mod tests;

use std::time::Duration;

/// Exponential backoff with full jitter: the n-th wait is uniform in [0, min(cap, base·2ⁿ)].
/// Full jitter spreads a fleet that lost its twin at the same moment over the whole window, so a
/// twin restart is not followed by every car reconnecting in the same second.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            rng: fastrand::Rng::new(),
        }
    }

    /// Deterministic jitter for tests.
    pub fn with_seed(base: Duration, cap: Duration, seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            ..Self::new(base, cap)
        }
    }

    /// The upper bound of the next wait.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// After a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let mut b = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(2), 1);
        let mut ceilings = Vec::new();
        for _ in 0..7 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay();
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        let mut fleet: Vec<Duration> = (0..1000)
            .map(|seed| {
                let mut b =
                    Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(60), seed);
                for _ in 0..6 {
                    b.next_delay();
                }
                b.next_delay()
            })
            .collect();
        fleet.sort();
        // 1000 cars in their 7th attempt wait uniformly in [0, 60 s]: no clump.
        assert!(fleet[0] < Duration::from_secs(2), "{:?}", fleet[0]);
        assert!(fleet[999] > Duration::from_secs(58), "{:?}", fleet[999]);
        let median = fleet[500].as_secs_f64();
        assert!((25.0..35.0).contains(&median), "median {median}");
        let in_any_second = fleet
            .chunk_by(|a, b| a.as_secs() == b.as_secs())
            .map(<[Duration]>::len)
            .max()
            .unwrap_or(0);
        assert!(
            in_any_second < 50,
            "{in_any_second} cars in the same second"
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(30), 7);
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }
}

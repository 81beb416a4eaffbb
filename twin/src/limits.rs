//! The rate at which one car may make the twin work. `car.report` is fire-and-forget: a car can
//! send reports as fast as its link carries them, and each costs the twin a decode, database
//! writes and possibly a log line. Each car gets a token bucket in its live record; a report
//! over the rate is dropped (the car is told nothing: fire-and-forget has no answer) and
//! counted, and the twin says so in its log at most once a minute per car.

use std::time::{Duration, Instant};

use cardeploy_protocol::CarId;

use crate::Twin;

/// `burst` tokens, refilled at `rate` per second; one token per report.
#[derive(Debug, Default)]
pub(crate) struct TokenBucket {
    tokens: f64,
    /// `None` until the first take: a bucket starts full.
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn take(&mut self, rate: f64, burst: u32, now: Instant) -> bool {
        let burst = f64::from(burst);
        let tokens = match self.last {
            None => burst,
            Some(last) => {
                let refill = now.saturating_duration_since(last).as_secs_f64() * rate;
                (self.tokens + refill).min(burst)
            }
        };
        self.last = Some(now);
        if tokens >= 1.0 {
            self.tokens = tokens - 1.0;
            true
        } else {
            self.tokens = tokens;
            false
        }
    }
}

/// How often, at most, the log hears about one car's dropped reports.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// One car's reports, as the twin limits them.
#[derive(Debug, Default)]
pub(crate) struct ReportGate {
    bucket: TokenBucket,
    /// Reports dropped over the limit since the twin started.
    pub dropped: u64,
    /// Dropped since the log last said so.
    unlogged: u64,
    logged: Option<Instant>,
}

/// What to do with one report.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Admit,
    /// Drop it; `Some(n)`: say in the log that `n` reports were dropped since it last did.
    Drop(Option<u64>),
}

impl ReportGate {
    pub fn admit(&mut self, rate: f64, burst: u32, now: Instant) -> Verdict {
        if self.bucket.take(rate, burst, now) {
            return Verdict::Admit;
        }
        self.dropped += 1;
        self.unlogged += 1;
        let due = self
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
        if !due {
            return Verdict::Drop(None);
        }
        self.logged = Some(now);
        Verdict::Drop(Some(std::mem::take(&mut self.unlogged)))
    }
}

/// Whether the twin handles this fire-and-forget message from `car` at all.
pub(crate) fn admit_report(twin: &Twin, car: &CarId) -> bool {
    let (rate, burst) = (twin.config.report_rate_per_sec, twin.config.report_burst);
    let verdict = twin
        .fleet
        .with_car(car, |live| live.reports.admit(rate, burst, Instant::now()));
    match verdict {
        Verdict::Admit => true,
        Verdict::Drop(None) => false,
        Verdict::Drop(Some(dropped)) => {
            tracing::warn!(%car, dropped, rate, burst,
                "car sends reports faster than the rate limit; dropped the excess (logged at most once a minute)");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_at_once_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::default();
        for _ in 0..3 {
            assert!(bucket.take(2.0, 3, start));
        }
        assert!(!bucket.take(2.0, 3, start));
        // Half a second at 2 per second is one token.
        let later = start + Duration::from_millis(500);
        assert!(bucket.take(2.0, 3, later));
        assert!(!bucket.take(2.0, 3, later));
        // A long pause refills to the burst, never beyond.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(bucket.take(2.0, 3, much_later));
        }
        assert!(!bucket.take(2.0, 3, much_later));
    }

    #[test]
    fn dropped_reports_are_counted_and_logged_at_most_once_a_minute() {
        let start = Instant::now();
        let mut gate = ReportGate::default();
        assert_eq!(gate.admit(0.001, 1, start), Verdict::Admit);
        assert_eq!(gate.admit(0.001, 1, start), Verdict::Drop(Some(1)));
        for _ in 0..10 {
            assert_eq!(gate.admit(0.001, 1, start), Verdict::Drop(None));
        }
        let minute = start + Duration::from_secs(60);
        // 0.06 tokens have come back: still dropped, and now the ten since are logged.
        assert_eq!(gate.admit(0.001, 1, minute), Verdict::Drop(Some(11)));
        assert_eq!(gate.dropped, 12);
    }
}

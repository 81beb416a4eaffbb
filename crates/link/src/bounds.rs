//! What bounds one connection: the streams a peer may hold open ([`crate::guard`]), the answer
//! bytes we queue for it, and the fire-and-forget requests read but not yet handled.
//!
//! Left alone, a connection would queue without bound: answers for a peer that stops reading
//! (each answer queued whole, however slowly the peer takes it), and fire-and-forget requests from
//! a peer that floods them. Both are bounded here: the engine (`socket.rs`) reserves each answer's
//! bytes in [`Budget`] before it queues the answer for the writer, and the writer
//! releases them as it writes; the reader takes a permit before it passes on a fire-and-forget
//! request and the engine returns it when the responder is done. A peer that takes nothing for
//! [`crate::Limits::send_stall`] is dropped by the writer.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

use crate::Limits;
use crate::conn::CloseSignal;
use crate::guard::Streams;

/// Answer bytes queued for the writer but not yet written to the socket.
#[derive(Debug)]
pub(crate) struct Budget {
    queued: Mutex<usize>,
    limit: usize,
    changed: Notify,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Self {
            queued: Mutex::new(0),
            limit,
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wait until `n` more bytes fit (an answer larger than the whole budget goes alone once the
    /// queue is empty). False if the connection closed first.
    pub async fn reserve(&self, n: usize, close: &CloseSignal) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut queued = self.lock();
                if *queued == 0 || *queued + n <= self.limit {
                    *queued += n;
                    return true;
                }
            }
            if close.is_closed() {
                return false;
            }
            tokio::select! {
                () = notified => {}
                () = close.closed() => return false,
            }
        }
    }

    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        {
            let mut queued = self.lock();
            *queued = queued.saturating_sub(n);
        }
        self.changed.notify_waiters();
    }

    #[cfg(test)]
    pub fn queued(&self) -> usize {
        *self.lock()
    }
}

/// The shared bounds of one connection, held by its reader, its writer and its router.
#[derive(Debug)]
pub(crate) struct Bounds {
    pub close: CloseSignal,
    pub streams: Mutex<Streams>,
    pub outbound: Budget,
    /// Permits for fire-and-forget requests between the reader and the responder.
    pub fire_and_forget: Arc<Semaphore>,
    pub send_stall: Duration,
}

impl Bounds {
    pub fn new(close: CloseSignal, limits: &Limits, we_open_odd: bool, expect_setup: bool) -> Self {
        Self {
            close,
            streams: Mutex::new(Streams::new(
                we_open_odd,
                expect_setup,
                limits.max_streams,
                limits.max_frame.max(limits.max_payload) + 1024,
            )),
            outbound: Budget::new(limits.max_queued),
            fire_and_forget: Arc::new(Semaphore::new(limits.max_pending_fnf.max(1))),
            send_stall: limits.send_stall,
        }
    }

    pub fn streams(&self) -> MutexGuard<'_, Streams> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The responder finished one fire-and-forget request.
    pub fn fire_and_forget_done(&self) {
        self.fire_and_forget.add_permits(1);
    }
}

/// Warnings about misbehaving peers, at most [`LOG_BURST`] per [`LOG_WINDOW`] for the whole
/// process: a flood of bad connections must not become a flood of log lines.
pub(crate) struct LogLimiter {
    state: Mutex<(Option<Instant>, u32, u64)>,
}

const LOG_WINDOW: Duration = Duration::from_secs(60);
const LOG_BURST: u32 = 20;

impl LogLimiter {
    pub const fn new() -> Self {
        Self {
            state: Mutex::new((None, 0, 0)),
        }
    }

    /// Whether to log now; when it says yes after suppressing, also how many were suppressed.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, logged, suppressed) = &mut *state;
        if start.is_none_or(|s| now.duration_since(s) >= LOG_WINDOW) {
            *start = Some(now);
            *logged = 0;
        }
        if *logged < LOG_BURST {
            *logged += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reservation_waits_for_room_and_wakes_on_release() {
        let budget = Arc::new(Budget::new(100));
        let close = CloseSignal::new();
        assert!(budget.reserve(80, &close).await);
        let waiter = {
            let (budget, close) = (budget.clone(), close.clone());
            tokio::spawn(async move { budget.reserve(50, &close).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        budget.release(80);
        assert!(waiter.await.unwrap());
        assert_eq!(budget.queued(), 50);
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_budget_goes_alone() {
        let budget = Budget::new(100);
        let close = CloseSignal::new();
        assert!(budget.reserve(500, &close).await);
        assert_eq!(budget.queued(), 500);
    }

    #[tokio::test]
    async fn a_closed_connection_ends_the_wait() {
        let budget = Arc::new(Budget::new(100));
        let close = CloseSignal::new();
        assert!(budget.reserve(100, &close).await);
        let waiter = {
            let (budget, close) = (budget.clone(), close.clone());
            tokio::spawn(async move { budget.reserve(1, &close).await })
        };
        close.close();
        assert!(!waiter.await.unwrap());
    }

    #[test]
    fn the_log_limiter_lets_a_burst_through_then_counts() {
        let limiter = LogLimiter::new();
        let now = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(limiter.allow(now), Some(0));
        }
        assert_eq!(limiter.allow(now), None);
        assert_eq!(limiter.allow(now), None);
        assert_eq!(limiter.allow(now + LOG_WINDOW), Some(2));
    }
}

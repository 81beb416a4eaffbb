//! The reporter: everything the agent tells the twin goes through it. It numbers reports
//! (`epoch`, `seq`), sends them on the session's link when there is one, and keeps events that
//! happen offline in a bounded backlog for the next session. Progress offline is dropped: the
//! next hello carries the reported state anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use cardeploy_link::Requester;
use cardeploy_protocol::{self as protocol, Report, ReportBody, ReportedState, route};

/// Events kept while offline; the oldest goes first when a new one finds it full.
pub(crate) const BACKLOG_KEPT: usize = 256;

/// An event: what kind, and a message for people.
type Event = (String, String);

pub(crate) struct Reporter {
    epoch: u64,
    seq: AtomicU64,
    /// The link of the current session, if any.
    link: Mutex<Option<Requester>>,
    /// Fixed capacity: a car offline for weeks holds the same memory as one offline a minute.
    backlog: Mutex<heapless::Deque<Event, BACKLOG_KEPT>>,
    /// The last position reported: sent again at each new session.
    position: Mutex<Option<cardeploy_protocol::Position>>,
    /// Counts state reports: a state sent again later is sent only if none followed it.
    states: AtomicU64,
}

/// A state report is sent again this long after the last one of a burst: the twin drops
/// reports over its rate limit, and the last state of a burst must not be the one it missed.
const STATE_AGAIN: std::time::Duration = std::time::Duration::from_secs(15);

impl Reporter {
    /// Reports of this run carry `epoch` (it grows with every start of the agent).
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            seq: AtomicU64::new(0),
            link: Mutex::new(None),
            backlog: Mutex::new(heapless::Deque::new()),
            position: Mutex::new(None),
            states: AtomicU64::new(0),
        }
    }

    fn link(&self) -> Option<Requester> {
        self.link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A session reached the twin: reports go on `link`, starting with what waited offline.
    pub async fn attach(&self, link: &Requester) {
        *self.link.lock().unwrap_or_else(PoisonError::into_inner) = Some(link.clone());
        let waiting: Vec<Event> = {
            let mut backlog = self.backlog.lock().unwrap_or_else(PoisonError::into_inner);
            std::iter::from_fn(|| backlog.pop_front()).collect()
        };
        for (kind, message) in waiting {
            self.send_on(link, ReportBody::Event { kind, message })
                .await;
        }
        let position = *self.position.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(position) = position {
            self.send_on(link, ReportBody::Position { position }).await;
        }
    }

    /// Where the car is now (rounded): sent now if connected, and at each new session.
    pub async fn position(&self, position: cardeploy_protocol::Position) {
        *self.position.lock().unwrap_or_else(PoisonError::into_inner) = Some(position);
        self.send(ReportBody::Position { position }).await;
    }

    /// The session ended: events wait for the next one.
    pub fn detach(&self) {
        *self.link.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Send a report on the current session, if any.
    pub async fn send(&self, body: ReportBody) {
        match (self.link(), body) {
            (Some(link), body) => self.send_on(&link, body).await,
            (None, ReportBody::Event { kind, message }) => self.keep((kind, message)),
            (None, _) => {}
        }
    }

    /// Send without waiting (from synchronous callbacks such as progress).
    pub fn send_soon(self: &std::sync::Arc<Self>, body: ReportBody) {
        let reporter = self.clone();
        tokio::spawn(async move { reporter.send(body).await });
    }

    pub async fn event(&self, kind: &str, message: String) {
        self.send(ReportBody::Event {
            kind: kind.to_owned(),
            message,
        })
        .await;
    }

    pub async fn state(self: &std::sync::Arc<Self>, state: ReportedState) {
        let n = self.states.fetch_add(1, Ordering::SeqCst) + 1;
        self.send(ReportBody::State {
            state: state.clone(),
        })
        .await;
        // Once more after the burst is over (the rate limit has refilled by then).
        let reporter = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STATE_AGAIN).await;
            if reporter.states.load(Ordering::SeqCst) == n {
                reporter.send(ReportBody::State { state }).await;
            }
        });
    }

    /// Keep an event for the next session (also used at start for what happened before any).
    pub fn keep(&self, event: Event) {
        let mut backlog = self.backlog.lock().unwrap_or_else(PoisonError::into_inner);
        if backlog.is_full() {
            backlog.pop_front();
        }
        // Room was made above.
        let _ = backlog.push_back(event);
    }

    async fn send_on(&self, link: &Requester, body: ReportBody) {
        let report = Report {
            epoch: self.epoch,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            at: crate::now_secs(),
            body,
        };
        if let Err(e) = link
            .fire_and_forget(route::CAR_REPORT, Bytes::from(protocol::encode(&report)))
            .await
        {
            // The next hello carries the reported state anyway.
            tracing::debug!("report not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offline_backlog_keeps_the_newest_events() {
        let reporter = Reporter::new(1);
        for n in 0..BACKLOG_KEPT + 10 {
            reporter.keep(("kind".into(), n.to_string()));
        }
        let backlog = reporter.backlog.lock().unwrap();
        assert_eq!(backlog.len(), BACKLOG_KEPT);
        assert_eq!(backlog.front().unwrap().1, "10", "the oldest went first");
        assert_eq!(
            backlog.back().unwrap().1,
            (BACKLOG_KEPT + 9).to_string(),
            "the newest is kept"
        );
    }
}

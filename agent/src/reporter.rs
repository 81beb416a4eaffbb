//! The reporter: everything the agent tells the twin goes through it. It numbers reports
//! (`epoch`, `seq`), sends them on the session's link when there is one, and keeps events that
//! happen offline in a bounded backlog for the next session. Progress offline is dropped: the
//! next hello carries the reported state anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use cardeploy_link::Requester;
use cardeploy_protocol::{self as protocol, Report, ReportBody, ReportMark, ReportedState, route};

/// Events kept while offline; the oldest goes first when a new one finds it full.
pub(crate) const BACKLOG_KEPT: usize = 256;

/// An event: what kind, and a message for people.
type Event = (String, String);

/// Events sent in this run kept until the twin says (at the next hello) that it stored them:
/// reports are fire-and-forget, and a twin instance that dies takes what it had not stored yet.
pub(crate) const UNCONFIRMED_KEPT: usize = 64;

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
    /// Events sent, with their seq, not yet confirmed stored (the newest [`UNCONFIRMED_KEPT`]).
    unconfirmed: Mutex<heapless::Deque<(u64, Event), UNCONFIRMED_KEPT>>,
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
            unconfirmed: Mutex::new(heapless::Deque::new()),
        }
    }

    fn link(&self) -> Option<Requester> {
        self.link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A session reached the twin, which has stored this car's reports `through` (its hello
    /// answer): events sent after that are sent again with their numbers (the twin drops what it
    /// has), then reports go on `link`, starting with what waited offline.
    pub async fn attach(&self, link: &Requester, through: Option<ReportMark>) {
        let again = {
            let mut kept = self
                .unconfirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            unconfirmed_after(&mut kept, self.epoch, through)
        };
        // Before the link is shared: a new report must not overtake these (the twin keeps only
        // what is newer than the newest it stored).
        for (seq, (kind, message)) in again {
            self.send_numbered(link, seq, ReportBody::Event { kind, message })
                .await;
        }
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
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        if let ReportBody::Event { kind, message } = &body {
            let mut kept = self
                .unconfirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if kept.is_full() {
                kept.pop_front();
            }
            // Room was made above.
            let _ = kept.push_back((seq, (kind.clone(), message.clone())));
        }
        self.send_numbered(link, seq, body).await;
    }

    async fn send_numbered(&self, link: &Requester, seq: u64, body: ReportBody) {
        let report = Report {
            epoch: self.epoch,
            seq,
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

/// The events of `kept` (sent in `epoch`) that the twin has not stored by `through`, in order;
/// `kept` holds only those from now on (a later hello confirms them).
fn unconfirmed_after(
    kept: &mut heapless::Deque<(u64, Event), UNCONFIRMED_KEPT>,
    epoch: u64,
    through: Option<ReportMark>,
) -> Vec<(u64, Event)> {
    let all: Vec<(u64, Event)> = std::iter::from_fn(|| kept.pop_front()).collect();
    let again: Vec<(u64, Event)> = all
        .into_iter()
        .filter(|(seq, _)| through.is_none_or(|mark| ReportMark { epoch, seq: *seq } > mark))
        .collect();
    for entry in &again {
        // They came out of it: there is room.
        let _ = kept.push_back(entry.clone());
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_the_twin_has_not_stored_are_sent_again_and_the_stored_ones_forgotten() {
        let mut kept = heapless::Deque::new();
        for seq in 3..8 {
            kept.push_back((seq, ("k".to_owned(), seq.to_string())))
                .unwrap();
        }
        let seqs = |v: &[(u64, Event)]| v.iter().map(|(s, _)| *s).collect::<Vec<_>>();
        let again = unconfirmed_after(&mut kept, 2, Some(ReportMark { epoch: 2, seq: 4 }));
        assert_eq!(seqs(&again), [5, 6, 7]);
        assert_eq!(kept.len(), 3, "confirmed ones are forgotten");
        // A twin that stored nothing from this car, or only from an earlier run: everything.
        assert_eq!(seqs(&unconfirmed_after(&mut kept, 2, None)), [5, 6, 7]);
        let earlier_run = Some(ReportMark { epoch: 1, seq: 99 });
        assert_eq!(
            seqs(&unconfirmed_after(&mut kept, 2, earlier_run)),
            [5, 6, 7]
        );
        // A later run already stored: nothing (the twin would drop them anyway).
        let later_run = Some(ReportMark { epoch: 3, seq: 0 });
        assert!(unconfirmed_after(&mut kept, 2, later_run).is_empty());
        assert!(kept.is_empty());
    }

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

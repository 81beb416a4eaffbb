//! The state cell: the only writer of the agent's persistent state. Every change is a
//! read-modify-persist under one lock: the new state is made durable first and only then
//! becomes what the rest of the agent reads, so no effect ever runs on a state a power cut
//! could take back. What the twin is told is derived from the new state here, in one place.

use std::sync::{Mutex, MutexGuard, PoisonError};

use cardeploy_protocol::ReportedState;

use crate::Error;
use crate::state::{Managed, State};
use crate::store::Store;

pub(crate) struct Cell {
    store: Store,
    state: Mutex<State>,
    /// Serialises read-modify-persist between the session, the fetch job and the parts.
    writer: tokio::sync::Mutex<()>,
    /// The parts the agent runs (`[os]`, `[containers] kubeconfig`): what a release with a
    /// bundle or workloads waits for.
    managed: Managed,
}

/// The result of an update.
pub(crate) struct Updated<R> {
    pub value: R,
    /// What the twin sees, when the update changed it.
    pub reported: Option<ReportedState>,
}

impl Cell {
    /// Open the state for a new run of the agent: a new epoch (reports of this run sort after
    /// the last run's), a counter from before scopes adopting the scope of the root in force,
    /// and persisted before anything else happens. The warning tells of a corrupt state file
    /// that was moved aside.
    pub fn open(
        store: Store,
        managed: Managed,
        scope: &str,
    ) -> Result<(Self, Option<Error>), Error> {
        let (mut state, warning) = store.load()?;
        state.epoch += 1;
        state.adopt_scope(scope);
        state.derive(managed);
        store.save(&state)?;
        let cell = Self {
            store,
            state: Mutex::new(state),
            writer: tokio::sync::Mutex::new(()),
            managed,
        };
        Ok((cell, warning))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The parts the agent runs.
    pub fn managed(&self) -> Managed {
        self.managed
    }

    /// Look at the state as it is durably now.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    pub fn snapshot(&self) -> State {
        self.lock().clone()
    }

    pub fn reported(&self) -> ReportedState {
        self.lock().reported.clone()
    }

    /// Change the state: `f` edits a copy; what follows from it is derived; if anything
    /// changed, the copy is persisted and only then replaces the state. On an error nothing
    /// changed.
    pub async fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<Updated<R>, Error> {
        let _writer = self.writer.lock().await;
        let current = self.snapshot();
        let mut next = current.clone();
        let value = f(&mut next);
        next.derive(self.managed);
        if next == current {
            return Ok(Updated {
                value,
                reported: None,
            });
        }
        self.persist(&next).await?;
        let reported = (next.reported != current.reported).then(|| next.reported.clone());
        *self.lock() = next;
        Ok(Updated { value, reported })
    }

    async fn persist(&self, next: &State) -> Result<(), Error> {
        let store = self.store.clone();
        let next = next.clone();
        let path = store.path();
        tokio::task::spawn_blocking(move || store.save(&next))
            .await
            .map_err(|e| Error::Io {
                path,
                source: std::io::Error::other(format!("the state writer stopped: {e}")),
            })?
    }
}

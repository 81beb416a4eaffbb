//! cardeploy-agent: the car-side daemon. Keeps one RSocket connection to the twin, takes each new
//! desired state, persists it atomically before acting, reports what it did, and keeps going when
//! the twin is away (reconnecting with exponential backoff and full jitter).
//!
//! [`run`] is the whole daemon; `main` only parses arguments and wires SIGTERM. Tests run the real
//! binary against a real twin: `cargo test -p cardeploy-agent`.

mod config;
mod error;
mod fetch;
pub mod notify;
pub mod os;
mod state;
pub mod verify;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cardeploy_link::tls::{TlsFiles, client_config};
use cardeploy_link::{
    Backoff, ClientOptions, ClientSecurity, Limits, Refusal, Requester, Responder,
};
use std::collections::BTreeMap;

use cardeploy_protocol::{
    self as protocol, DesiredState, FetchProgress, Heartbeat, Hello, HelloReply, Inspection, Phase,
    Report, ReportBody, ReportedState, SetupData, route,
};
use cardeploy_release::CarContext;
use futures::StreamExt;
use futures::stream::BoxStream;

pub use config::Config;
pub use error::Error;
pub use state::{SCHEMA as STATE_SCHEMA, State, Store, Target};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

struct Agent {
    config: Config,
    store: Store,
    state: Mutex<State>,
    seq: AtomicU64,
    started: Instant,
    /// Events that happened while offline, sent after the next hello.
    backlog: Mutex<Vec<(String, String)>>,
    fetcher: fetch::Fetcher,
    roots: verify::Roots,
    /// The root in force: the pinned one or the newest rotation accepted.
    trusted: Mutex<cardeploy_release::TrustedRoot>,
    /// This hardware's RAUC `compatible` (from RAUC when the agent manages the OS).
    compatible: String,
    /// The OS driver's shared part, when `[os]` is configured.
    os: Option<Arc<os::driver::OsRuntime>>,
    /// The connection of the current session, for reports from tasks outside it.
    link: Mutex<Option<Requester>>,
    /// Serialises read-modify-persist of the state between the session and the OS driver.
    writer: tokio::sync::Mutex<()>,
    /// The twin answered a hello since the agent started (the health gate asks).
    reached: AtomicBool,
    /// systemd, when it started the agent with `Type=notify`.
    notify: notify::Notifier,
}

/// Events kept while offline, oldest dropped first.
const BACKLOG_KEPT: usize = 256;
/// How often a fetch stopped by a full disk checks for room again.
const DISK_RECHECK: Duration = Duration::from_secs(5);

/// The work a desired state asks for, run alongside the session's other duties.
type Job = std::pin::Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Agent {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Read-modify-persist under the writer lock; `f` says whether it changed anything (nothing
    /// is written otherwise). The in-memory state changes only once the file is durable.
    async fn update<R>(&self, f: impl FnOnce(&mut State) -> (bool, R)) -> Result<R, String> {
        let _writer = self.writer.lock().await;
        let mut next = self.state().clone();
        let (changed, result) = f(&mut next);
        if changed {
            self.persist(&next).await?;
            *self.state() = next;
        }
        Ok(result)
    }

    /// Report from anywhere: sent on the current session, if any. Offline, events wait for the
    /// next hello (which carries the reported state anyway); progress is dropped.
    async fn emit(&self, body: ReportBody) {
        let link = self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match (link, body) {
            (Some(link), body) => self.report(&link, body).await,
            (None, ReportBody::Event { kind, message }) => {
                let mut backlog = self
                    .backlog
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if backlog.len() >= BACKLOG_KEPT {
                    backlog.remove(0);
                }
                backlog.push((kind, message));
            }
            (None, _) => {}
        }
    }

    async fn notice(&self, kind: &str, message: String) {
        self.emit(ReportBody::Event {
            kind: kind.to_owned(),
            message,
        })
        .await;
    }

    /// A session ended: reports from other tasks wait for the next one.
    fn after_session<T>(&self, result: T) -> T {
        *self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        result
    }

    fn twin_reached(&self) -> bool {
        self.reached.load(Ordering::SeqCst)
    }

    fn wake_os(&self) {
        if let Some(os) = &self.os {
            os.wake.notify_one();
        }
    }

    /// The OS release the target names, when the agent manages the OS.
    fn wanted(&self, state: &State) -> Option<os::machine::Wanted> {
        self.os.as_ref()?;
        os::driver::wanted(self, state)
    }

    /// The target's OS bundle on disk and its declaration.
    fn target_bundle(&self) -> Option<(std::path::PathBuf, cardeploy_release::Artifact)> {
        let state = self.state();
        let artifact = state
            .target
            .as_ref()?
            .artifacts
            .iter()
            .find(|a| a.kind == cardeploy_release::ArtifactKind::RaucBundle)?
            .clone();
        let id = artifact.index.parse().ok()?;
        Some((self.fetcher.artifact_path(&artifact.name, &id), artifact))
    }

    /// Drop an artifact from what the car holds (found damaged): the next plan fetches it.
    async fn forget_artifact(&self, name: &str) {
        let forgotten = self
            .update(|s| (s.artifacts.remove(name).is_some(), ()))
            .await;
        if let Err(why) = forgotten {
            tracing::error!("could not persist forgetting {name}: {why}");
        }
    }

    /// Remember that the booted slot was marked good in boot `boot_id`.
    async fn confirm_boot(&self, boot_id: &str) {
        let saved = self
            .update(|s| {
                let changed = s.os.confirmed_boot.as_deref() != Some(boot_id);
                s.os.confirmed_boot = Some(boot_id.to_owned());
                (changed, ())
            })
            .await;
        if let Err(why) = saved {
            tracing::error!("could not persist the boot confirmation: {why}");
        }
    }

    /// Persist a new OS state (and the slots RAUC reports), then report it if anything the twin
    /// sees changed.
    /// Returns false when the state could not be persisted: the effect must not run then.
    async fn os_transition(&self, next: os::OsUpdate, slots: Option<protocol::OsReport>) -> bool {
        let updated = self
            .update(|s| {
                let before = s.clone();
                let moved = s.os.update != next;
                if moved {
                    if os::machine::refuses(&next)
                        && let Some(release) = next.release()
                    {
                        s.os.refuse(&release.digest);
                    }
                    if let os::OsUpdate::Committed { release, .. } = &next
                        && let Some((line, version)) = release.label.split_once('@')
                    {
                        record_version(s, line, version, true);
                    }
                }
                s.os.update = next.clone();
                match slots {
                    Some(report) => s.reported.os = Some(report),
                    None => {
                        if let Some(report) = &mut s.reported.os {
                            report.update = next.name().to_owned();
                            report.release = next.release().map(|r| r.label.clone());
                        }
                    }
                }
                sync_phase(s, self.os.is_some());
                let changed = *s != before;
                (changed, (moved, s.reported != before.reported))
            })
            .await;
        match updated {
            Ok((moved, reported)) => {
                if moved {
                    tracing::info!(state = next.name(), release = ?next.release().map(|r| &r.label),
                        problem = ?next.problem(), "OS update");
                    os::driver::failpoint(&next);
                }
                if reported {
                    let state = self.state().reported.clone();
                    self.emit(ReportBody::State { state }).await;
                }
            }
            Err(why) => {
                tracing::error!("could not persist the OS state {}: {why}", next.name());
                return false;
            }
        }
        true
    }

    async fn report(&self, link: &Requester, body: ReportBody) {
        let report = Report {
            epoch: self.state().epoch,
            seq: self.seq.fetch_add(1, Ordering::SeqCst),
            at: now_secs(),
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

    async fn event(&self, link: &Requester, kind: &str, message: String) {
        self.report(
            link,
            ReportBody::Event {
                kind: kind.to_owned(),
                message,
            },
        )
        .await;
    }

    /// Does the target name artifacts the car does not hold yet?
    fn needs_fetch(&self, target: &Target, held: &BTreeMap<String, String>) -> bool {
        target.artifacts.iter().any(|a| {
            held.get(&a.name) != Some(&a.index)
                || a.index.parse().map_or(true, |id| {
                    !self.fetcher.artifact_path(&a.name, &id).is_file()
                })
        })
    }

    /// What the car knows about itself for the checks of docs/release-format.md.
    fn car_context(&self, state: &State) -> CarContext {
        CarContext {
            car_id: self.config.car_id.to_string(),
            compatible: self.compatible.clone(),
            now: now_secs(),
            counter: state
                .last_counter
                .zip(state.counter_scope.clone())
                .map(|(last, scope)| cardeploy_release::CounterMark { scope, last }),
            installed: state
                .installed
                .iter()
                .filter_map(|(line, v)| Some((line.clone(), v.parse().ok()?)))
                .collect(),
            os: state.installed_os.as_ref().and_then(|os| {
                Some(cardeploy_release::InstalledOs {
                    line: os.line.clone(),
                    version: os.version.parse().ok()?,
                })
            }),
            max_artifact_bytes: self.config.max_artifact_bytes,
        }
    }

    async fn persist(&self, next: &State) -> Result<(), String> {
        let saved = tokio::task::spawn_blocking({
            let next = next.clone();
            let store = self.store.clone();
            move || store.save(&next)
        })
        .await;
        match saved {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("state writer failed: {e}")),
        }
    }

    /// Fetch every artifact of the accepted desired state the car lacks, one after the other;
    /// each finished artifact is recorded at once, so an interruption never repeats it.
    async fn fetch_all(self: Arc<Self>, link: Requester) -> Result<(), Error> {
        let Some(target) = self.state().target.clone() else {
            return Ok(());
        };
        // Names were checked with the release (M3): safe file names, unique.
        for artifact in &target.artifacts {
            let (have, base) = {
                let state = self.state();
                let have = state.artifacts.get(&artifact.name) == Some(&artifact.index);
                let base = state
                    .artifacts
                    .get(&artifact.name)
                    .and_then(|h| h.parse().ok());
                (have, base)
            };
            let id: cardeploy_chunks::Digest = artifact.index.parse()?;
            if have && self.fetcher.artifact_path(&artifact.name, &id).is_file() {
                continue;
            }
            let reporter = |p: &FetchProgress| {
                let (agent, link, progress) = (self.clone(), link.clone(), p.clone());
                tokio::spawn(async move {
                    agent.report(&link, ReportBody::Progress { progress }).await;
                });
            };
            // A seed that changed under the reader (someone wrote to the slot) is read again
            // once: the new plan sees what is really there now.
            let path = match self.fetcher.fetch(&link, artifact, base, reporter).await {
                Err(Error::Chunks(e @ cardeploy_chunks::Error::SeedChanged { .. })) => {
                    tracing::warn!("{e}; planning again");
                    self.fetcher.fetch(&link, artifact, base, reporter).await?
                }
                other => other?,
            };
            let previous = self
                .update(|s| {
                    let previous = s
                        .artifacts
                        .insert(artifact.name.clone(), artifact.index.clone());
                    (true, previous)
                })
                .await
                .map_err(Error::Fetch)?;
            // The previous version was the base of this download; the new one is the base of
            // the next.
            if let Some(old) = previous.and_then(|h| h.parse().ok())
                && old != id
            {
                let old_path = self.fetcher.artifact_path(&artifact.name, &old);
                if let Err(e) = std::fs::remove_file(&old_path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!("could not remove {}: {e}", old_path.display());
                }
            }
            tracing::info!(artifact = %artifact.name, path = %path.display(), "artifact ready");
        }
        Ok(())
    }

    /// A fetch job ended: record the outcome. Link errors end the session instead (the next
    /// session resumes the fetch). A full disk leaves the fetch pending with the reason
    /// reported; the returned byte count is the room to wait for before it goes on.
    async fn fetched(
        &self,
        link: &Requester,
        result: Result<(), Error>,
    ) -> Result<Option<u64>, Error> {
        let outcome = match result {
            Ok(()) => None,
            Err(e @ Error::Link(_)) => return Err(e),
            Err(e @ Error::DiskFull { needed, .. }) => {
                let why = e.to_string();
                tracing::error!("{why}");
                let updated = self
                    .update(|next| {
                        next.reported.phase = Phase::Fetching;
                        next.reported.last_error = Some(why.clone());
                        (true, next.reported.clone())
                    })
                    .await;
                // The state file may live on the full disk too: the twin hears it either way.
                let reported = match updated {
                    Ok(reported) => reported,
                    Err(persist) => {
                        tracing::warn!("could not persist the fetch outcome: {persist}");
                        ReportedState {
                            last_error: Some(why),
                            ..self.state().reported.clone()
                        }
                    }
                };
                self.report(link, ReportBody::State { state: reported })
                    .await;
                return Ok(Some(needed));
            }
            Err(e) => Some(e.to_string()),
        };
        let os = self.os.is_some();
        let updated = self
            .update(|next| {
                match &outcome {
                    // An OS release goes on to the OS driver: installed means committed there.
                    None if os && self.wanted(next).is_some() => {
                        next.reported.phase = Phase::Verifying;
                        next.reported.last_error = None;
                    }
                    None => {
                        next.reported.phase = Phase::Applied;
                        next.reported.last_error = None;
                        record_installed(next);
                    }
                    Some(why) => {
                        tracing::error!("fetch failed: {why}");
                        next.reported.phase = Phase::Failed;
                        next.reported.last_error = Some(why.clone());
                    }
                }
                (true, next.reported.clone())
            })
            .await;
        match updated {
            Ok(reported) => {
                self.report(link, ReportBody::State { state: reported })
                    .await;
            }
            Err(why) => tracing::error!("could not persist the fetch outcome: {why}"),
        }
        self.wake_os();
        Ok(None)
    }

    /// Take a desired state: verify, persist, then report. Returns true when artifacts must be
    /// fetched for it.
    async fn consider(&self, link: &Requester, message: DesiredState) -> bool {
        // The twin repeats the current desired state on every hello: nothing new.
        if self.state().desired.as_ref() == Some(&message) {
            tracing::debug!("desired state already accepted");
            return false;
        }
        let root = self
            .trusted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let context = self.car_context(&self.state());
        let (trusted, new_roots, accepted) = match verify::check(&root, &message, &context) {
            Ok(ok) => ok,
            Err(e) => {
                let message = format!("desired state refused: {e}");
                tracing::warn!("{message}");
                self.event(link, "refused", message).await;
                return false;
            }
        };
        // New roots are kept before anything signed under them is acted on.
        if let Err(e) = self.roots.store(&new_roots) {
            let message = format!("could not store the new root: {e}");
            tracing::error!("{message}");
            self.event(link, "refused", message).await;
            return false;
        }
        // D4a: the scope the counter is accepted in (a rotation to another director starts one).
        let trusted_scope = trusted.counter_scope();
        if !new_roots.is_empty() {
            tracing::info!(version = trusted.root().version, "root rotated");
        }
        *self
            .trusted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = trusted;

        let counter = accepted.desired.counter;
        let scope = trusted_scope;
        let checked = accepted.release;
        let managed_os = self.os.is_some();
        // Persist before anything else happens: after a crash the agent knows what it accepted,
        // and a replay of an older counter stays refused.
        let updated = self
            .update(|next| {
                next.desired = Some(message);
                next.last_counter = Some(counter);
                next.counter_scope = Some(scope.clone());
                next.accepted = next.accepted.saturating_add(1);
                let same = next
                    .target
                    .as_ref()
                    .is_some_and(|t| t.release == checked.digest)
                    && next.reported.phase != Phase::Failed;
                if same {
                    // The same release signed again (a refresh before expiry): only the counter
                    // moves.
                    next.reported.desired_counter = Some(counter);
                    next.reported.counter_scope = Some(scope.clone());
                    return (true, false);
                }
                let target = Target {
                    release: checked.digest.clone(),
                    line: checked.release.line.clone(),
                    version: checked.release.version.clone(),
                    artifacts: checked.release.artifacts.clone(),
                };
                let fetch = self.needs_fetch(&target, &next.artifacts);
                let os_release = managed_os
                    && target
                        .artifacts
                        .iter()
                        .any(|a| a.kind == cardeploy_release::ArtifactKind::RaucBundle);
                let phase = match (fetch, os_release) {
                    (true, _) => Phase::Fetching,
                    // The OS driver takes it from here (and corrects the phase when its own
                    // state says more, e.g. a release rolled back before).
                    (false, true) => Phase::Verifying,
                    (false, false) => Phase::Applied,
                };
                next.reported = ReportedState {
                    phase,
                    desired_counter: Some(counter),
                    counter_scope: Some(scope.clone()),
                    release: Some(target.label()),
                    last_error: None,
                    os: next.reported.os.take(),
                };
                next.target = Some(target);
                if phase == Phase::Applied {
                    record_installed(next);
                }
                sync_phase(next, managed_os);
                (true, fetch)
            })
            .await;
        let fetch = match updated {
            Ok(fetch) => fetch,
            Err(why) => {
                tracing::error!(counter, "could not persist desired state: {why}");
                let reported = {
                    let mut state = self.state();
                    state.reported.phase = Phase::Failed;
                    state.reported.last_error =
                        Some(format!("could not persist desired #{counter}: {why}"));
                    state.reported.clone()
                };
                self.report(link, ReportBody::State { state: reported })
                    .await;
                return false;
            }
        };
        // Downloads of a replaced desired state are never finished: their partial files go.
        if let Some(target) = self.state().target.clone() {
            self.fetcher.prune_partials(&target.artifacts);
        }
        let reported = self.state().reported.clone();
        tracing::info!(counter, release = %checked.digest, line = %checked.release.line,
            version = %checked.release.version, phase = ?reported.phase, "desired state verified and accepted");
        self.report(link, ReportBody::State { state: reported })
            .await;
        self.wake_os();
        fetch
    }

    fn options(self: &Arc<Self>, security: &ClientSecurity, heartbeat: Duration) -> ClientOptions {
        ClientOptions {
            addr: self.config.twin.clone(),
            security: security.clone(),
            heartbeat,
            request_deadline: Duration::from_secs(self.config.request_deadline_secs),
            connect_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            setup_data: Bytes::from(protocol::encode(&SetupData {
                car_id: self.config.car_id.clone(),
                agent_version: AGENT_VERSION.to_owned(),
            })),
            responder: Some(Arc::new(Inspect(self.clone()))),
        }
    }

    /// One connection, from connect to loss. Returns the heartbeat interval the twin asked for
    /// once the hello succeeded.
    async fn session(
        self: &Arc<Self>,
        options: ClientOptions,
        hello_ok: &mut bool,
    ) -> Result<Duration, Error> {
        let link = cardeploy_link::connect(&options).await?;
        let hello = Hello {
            agent_version: AGENT_VERSION.to_owned(),
            reported: self.state().reported.clone(),
        };
        let answer = link
            .request_response(route::CAR_HELLO, Bytes::from(protocol::encode(&hello)))
            .await?;
        let reply: HelloReply =
            protocol::decode("car.hello answer", &answer).map_err(|source| Error::Protocol {
                what: "car.hello",
                source,
            })?;
        *hello_ok = true;
        self.reached.store(true, Ordering::SeqCst);
        *self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(link.clone());
        // The health gate may be waiting for the twin.
        self.wake_os();
        if reply.car_id != self.config.car_id {
            tracing::warn!(configured = %self.config.car_id, certificate = %reply.car_id,
                "the twin knows this car by another id: check car_id in the configuration");
        }
        let heartbeat = Duration::from_secs(reply.heartbeat_secs.clamp(1, 3600));
        tracing::info!(twin = %self.config.twin, car = %reply.car_id, "connected to the twin");
        self.notify
            .status(&format!("connected to the twin {}", self.config.twin));
        let backlog = std::mem::take(
            &mut *self
                .backlog
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (kind, message) in backlog {
            self.event(&link, &kind, message).await;
        }
        let mut job: Option<Job> = None;
        if let Some(desired) = reply.desired
            && self.consider(&link, desired).await
        {
            job = Some(Box::pin(self.clone().fetch_all(link.clone())));
        }
        // A fetch an earlier session (or an earlier run of the agent) did not finish.
        if job.is_none() && self.state().reported.phase == Phase::Fetching {
            job = Some(Box::pin(self.clone().fetch_all(link.clone())));
        }
        let mut desired = link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
        let heartbeats = async {
            loop {
                tokio::time::sleep(heartbeat).await;
                let beat = Bytes::from(protocol::encode(&Heartbeat {}));
                match link
                    .request_response_within(route::CAR_HEARTBEAT, beat, heartbeat)
                    .await
                {
                    Ok(_) => {}
                    Err(cardeploy_link::Error::Closed { .. }) => return,
                    // A late heartbeat alone is no reason to reconnect: the link drops a peer
                    // that is silent for three intervals.
                    Err(e) => tracing::warn!("heartbeat: {e}"),
                }
            }
        };
        tokio::pin!(heartbeats);
        loop {
            tokio::select! {
                item = desired.next() => match item {
                    Some(Ok(bytes)) => match fetch::desired_item(&link, &bytes).await {
                        // A newer desired state replaces a fetch in progress; what that fetch
                        // already stored stays in the chunk store and counts for the next plan.
                        Ok(state) => if self.consider(&link, state).await {
                            job = Some(Box::pin(self.clone().fetch_all(link.clone())));
                        },
                        Err(e) => {
                            tracing::warn!("ignored a desired state: {e}");
                            self.event(&link, "refused", format!("unreadable desired state: {e}")).await;
                        }
                    },
                    Some(Err(e)) => {
                        link.close();
                        return Err(e.into());
                    }
                    None => {
                        link.close();
                        return Ok(heartbeat);
                    }
                },
                () = &mut heartbeats => return Ok(heartbeat),
                result = async {
                    match job.as_mut() {
                        Some(j) => j.await,
                        None => std::future::pending().await,
                    }
                }, if job.is_some() => {
                    job = None;
                    match self.fetched(&link, result).await {
                        Ok(None) => {}
                        // The disk is full: the fetch goes on once there is room for it.
                        Ok(Some(needed)) => {
                            let agent = self.clone();
                            let link = link.clone();
                            job = Some(Box::pin(async move {
                                agent.fetcher.room_for(needed, DISK_RECHECK).await;
                                tracing::info!("there is room again; the fetch goes on");
                                agent.fetch_all(link).await
                            }));
                        }
                        Err(e) => {
                            link.close();
                            return Err(e);
                        }
                    }
                }
            }
        }
    }
}

/// `twin.inspect`: the twin asks, the agent answers with its live view.
struct Inspect(Arc<Agent>);

#[async_trait]
impl Responder for Inspect {
    async fn request_response(&self, route: &str, _data: Bytes) -> Result<Bytes, Refusal> {
        if route != route::TWIN_INSPECT {
            return Err(Refusal::unknown_route(route, &[route::TWIN_INSPECT]));
        }
        let state = self.0.state().clone();
        Ok(Bytes::from(protocol::encode(&Inspection {
            agent_version: AGENT_VERSION.to_owned(),
            reported: state.reported,
            desired: state.desired,
            uptime_secs: self.0.started.elapsed().as_secs(),
        })))
    }

    async fn fire_and_forget(&self, route: &str, _data: Bytes) {
        tracing::warn!(%route, "the twin sent a fire-and-forget request the agent does not serve");
    }

    fn request_stream(
        &self,
        route: &str,
        _data: Bytes,
    ) -> BoxStream<'static, Result<Bytes, Refusal>> {
        let refusal = Refusal::unknown_route(route, &[route::TWIN_INSPECT]);
        futures::stream::once(async move { Err(refusal) }).boxed()
    }
}

/// Run the agent until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let notify = notify::Notifier::from_env();
    let store = Store::new(&config.state_dir)?;
    let (mut state, warning) = store.load()?;
    let mut backlog = Vec::new();
    if let Some(warning) = warning {
        tracing::error!("{warning}");
        backlog.push(("state-corrupt".to_owned(), warning.to_string()));
    }
    state.epoch += 1;
    store.save(&state)?;
    tracing::info!(car = %config.car_id, epoch = state.epoch, phase = ?state.reported.phase, "agent started");

    let security = if config.insecure_plaintext {
        tracing::warn!("insecure_plaintext: no TLS; development only");
        ClientSecurity::InsecurePlaintext
    } else {
        ClientSecurity::MutualTls(client_config(&TlsFiles {
            ca: &config.ca,
            cert: &config.cert,
            key: &config.key,
        })?)
    };
    let mut backoff = Backoff::new(
        Duration::from_millis(config.reconnect_base_ms),
        Duration::from_secs(config.reconnect_cap_secs),
    );
    let mut heartbeat = Duration::from_secs(config.heartbeat_secs);
    let fetcher = fetch::Fetcher::new(&config)?;
    let roots = verify::Roots::new(&config.state_dir)?;
    let trusted = roots.load(&config.root)?;
    tracing::info!(root = trusted.root().version, "root of trust loaded");
    if state.adopt_scope(&trusted.counter_scope()) {
        store.save(&state)?;
    }
    // Whichever wait the signal interrupts, systemd hears at once that the exit is wanted.
    let shutdown = {
        let notify = notify.clone();
        async move {
            shutdown.await;
            notify.stopping();
        }
    };
    tokio::pin!(shutdown);
    // With [os], RAUC is the authority on what this hardware is.
    let (rauc, compatible) = match &config.os {
        Some(os_config) => {
            notify.status("waiting for RAUC");
            let rauc = tokio::select! {
                () = &mut shutdown => return Ok(()),
                rauc = os::driver::connect(os_config) => rauc,
            };
            let from_rauc = rauc.compatible().await?;
            if let Some(configured) = &config.compatible
                && *configured != from_rauc
            {
                return Err(Error::Compatible {
                    configured: configured.clone(),
                    rauc: from_rauc,
                });
            }
            tracing::info!(compatible = %from_rauc, booted = ?rauc.boot_slot().await.ok(), "RAUC found");
            (Some(rauc), from_rauc)
        }
        None => (None, config.compatible.clone().unwrap_or_default()),
    };
    let os_runtime = config.os.clone().map(|os_config| {
        Arc::new(os::driver::OsRuntime {
            config: os_config,
            wake: tokio::sync::Notify::new(),
        })
    });
    let agent = Arc::new(Agent {
        compatible,
        os: os_runtime.clone(),
        link: Mutex::new(None),
        writer: tokio::sync::Mutex::new(()),
        reached: AtomicBool::new(false),
        notify: notify.clone(),
        roots,
        trusted: Mutex::new(trusted),
        fetcher,
        config,
        store,
        state: Mutex::new(state),
        seq: AtomicU64::new(0),
        started: Instant::now(),
        backlog: Mutex::new(backlog),
    });
    let driver = match (os_runtime, rauc) {
        (Some(runtime), Some(rauc)) => Some(tokio::spawn(os::driver::drive(
            agent.clone(),
            runtime,
            rauc,
        ))),
        _ => None,
    };
    // Started: state loaded, OS driver running. The twin may be out of reach for hours and the
    // car works offline, so readiness does not wait for it.
    notify.ready(&format!(
        "started, connecting to the twin {}",
        agent.config.twin
    ));
    let watchdog = notify.start_watchdog();
    // Said once per stretch offline, not at every attempt.
    let mut said_offline = false;
    loop {
        let mut hello_ok = false;
        let options = agent.options(&security, heartbeat);
        tokio::select! {
            () = &mut shutdown => break,
            result = agent.session(options, &mut hello_ok) => match agent.after_session(result) {
                Ok(hb) => {
                    heartbeat = hb;
                    tracing::warn!("connection to the twin lost");
                }
                Err(e) => tracing::warn!("{e}"),
            },
        }
        if hello_ok {
            backoff.reset();
            said_offline = false;
        }
        if !said_offline {
            notify.status("offline, reconnecting to the twin");
            said_offline = true;
        }
        let delay = backoff.next_delay();
        tracing::info!(?delay, "reconnecting");
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    if let Some(driver) = driver {
        driver.abort();
    }
    drop(watchdog);
    tracing::info!("agent stopped");
    Ok(())
}

/// The target release is on the car: its version becomes the line's installed version if it is
/// the highest (M5 compares against it), and, for an OS release, the OS this hardware runs (M5a).
fn record_installed(state: &mut State) {
    if let Some(target) = state.target.clone() {
        let os = target
            .artifacts
            .iter()
            .any(|a| a.kind == cardeploy_release::ArtifactKind::RaucBundle);
        record_version(state, &target.line, &target.version, os);
    }
}

/// Record `line@version` as installed: the line's highest version by SemVer precedence, and,
/// for an OS release (`os`), the OS of this hardware — on its line, at the highest version that
/// line reached here (an override that moved it to another line starts there).
fn record_version(state: &mut State, line: &str, version: &str, os: bool) {
    let above = |have: &str| match (
        have.parse::<semver::Version>(),
        version.parse::<semver::Version>(),
    ) {
        (Ok(have), Ok(new)) => cardeploy_release::older(&have, &new),
        _ => true,
    };
    if state.installed.get(line).is_none_or(|have| above(have)) {
        state.installed.insert(line.to_owned(), version.to_owned());
    }
    if os {
        let same_line_higher = state
            .installed_os
            .as_ref()
            .is_some_and(|running| running.line == line && !above(&running.version));
        if !same_line_higher {
            state.installed_os = Some(state::InstalledOs {
                line: line.to_owned(),
                version: version.to_owned(),
            });
        }
    }
}

/// When the OS machine works on the target release, its state is what the twin sees.
fn sync_phase(state: &mut State, managed_os: bool) {
    if !managed_os {
        return;
    }
    let Some(target) = &state.target else {
        return;
    };
    if state.os.update.release().map(|r| &r.digest) != Some(&target.release) {
        return;
    }
    // Fetching belongs to the fetch job (it knows about fetch errors).
    if matches!(state.os.update, os::OsUpdate::Fetching { .. }) {
        return;
    }
    state.reported.phase = state.os.update.phase();
    state.reported.last_error = state.os.update.problem();
}

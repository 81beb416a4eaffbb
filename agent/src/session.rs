//! The session with the twin: connect, hello, the desired-state stream, heartbeats, and the
//! twin's `twin.inspect` questions — and, around it, reconnecting with exponential backoff and
//! full jitter. What arrives goes to the deployer; what the agent says goes through the
//! reporter. Neither knows which workload parts exist.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use cardeploy_link::{
    Backoff, ClientOptions, ClientSecurity, Limits, Refusal, Requester, Responder,
};
use cardeploy_protocol::{
    self as protocol, Heartbeat, Hello, HelloReply, Inspection, SetupData, route,
};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::cell::Cell;
use crate::deploy::{Deployer, Job};
use crate::fetch::desired_item;
use crate::notify::Notifier;
use crate::reporter::Reporter;
use crate::{AGENT_VERSION, Config, Error};

/// What a session works with.
pub(crate) struct Agent {
    pub config: Config,
    pub cell: Arc<Cell>,
    pub reporter: Arc<Reporter>,
    pub deployer: Arc<Deployer>,
    /// The twin answered a hello since the agent started (the health gate asks).
    pub reached: Arc<AtomicBool>,
    pub notify: Notifier,
    pub started: Instant,
}

/// Keep a session with the twin until `shutdown` resolves.
pub(crate) async fn keep_connected(
    agent: Arc<Agent>,
    security: ClientSecurity,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let config = &agent.config;
    let mut backoff = Backoff::new(
        Duration::from_millis(config.reconnect_base_ms),
        Duration::from_secs(config.reconnect_cap_secs),
    );
    let mut heartbeat = Duration::from_secs(config.heartbeat_secs);
    // Said once per stretch offline, not at every attempt.
    let mut said_offline = false;
    loop {
        let mut hello_ok = false;
        let options = agent.options(&security, heartbeat);
        tokio::select! {
            () = &mut shutdown => return,
            result = agent.session(options, &mut hello_ok) => {
                agent.reporter.detach();
                match result {
                    Ok(hb) => {
                        heartbeat = hb;
                        tracing::warn!("connection to the twin lost");
                    }
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        if hello_ok {
            backoff.reset();
            said_offline = false;
        }
        if !said_offline {
            agent.notify.status("offline, reconnecting to the twin");
            said_offline = true;
        }
        let delay = backoff.next_delay();
        tracing::info!(?delay, "reconnecting");
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

impl Agent {
    fn options(self: &Arc<Self>, security: &ClientSecurity, heartbeat: Duration) -> ClientOptions {
        ClientOptions {
            bind: None,
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
            reported: self.cell.reported(),
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
        self.reporter.attach(&link, reply.reports_through).await;
        // A part may be waiting for the twin (the OS health gate).
        self.deployer.parts.wake();
        if reply.car_id != self.config.car_id {
            tracing::warn!(configured = %self.config.car_id, certificate = %reply.car_id,
                "the twin knows this car by another id: check car_id in the configuration");
        }
        let heartbeat = Duration::from_secs(reply.heartbeat_secs.clamp(1, 3600));
        tracing::info!(twin = %self.config.twin, car = %reply.car_id, "connected to the twin");
        self.notify
            .status(&format!("connected to the twin {}", self.config.twin));
        let deployer = &self.deployer;
        let mut job: Option<Job> = None;
        if let Some(desired) = reply.desired
            && deployer.accept(desired).await
        {
            job = Some(deployer.fetch(&link));
        }
        if job.is_none() && deployer.fetch_pending() {
            job = Some(deployer.fetch(&link));
        }
        let mut desired = link.request_stream(route::CAR_DESIRED, Bytes::from_static(b"{}"));
        let heartbeats = beat(&link, heartbeat);
        tokio::pin!(heartbeats);
        loop {
            tokio::select! {
                item = desired.next() => match item {
                    Some(Ok(bytes)) => match desired_item(&link, &bytes).await {
                        // A newer desired state replaces a fetch in progress; what that fetch
                        // already stored stays in the chunk store and counts for the next plan.
                        Ok(state) => if deployer.accept(state).await {
                            job = Some(deployer.fetch(&link));
                        },
                        Err(e) => {
                            tracing::warn!("ignored a desired state: {e}");
                            self.reporter.event("refused", format!("unreadable desired state: {e}")).await;
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
                    match deployer.fetched(result).await {
                        Ok(None) => {}
                        // The disk is full: the fetch goes on once there is room for it.
                        Ok(Some(needed)) => job = Some(deployer.fetch_when_room(&link, needed)),
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

/// Heartbeats every `interval`; ends when the link is closed.
async fn beat(link: &Requester, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let beat = Bytes::from(protocol::encode(&Heartbeat {}));
        match link
            .request_response_within(route::CAR_HEARTBEAT, beat, interval)
            .await
        {
            Ok(_) => {}
            Err(cardeploy_link::Error::Closed { .. }) => return,
            // A late heartbeat alone is no reason to reconnect: the link drops a peer that is
            // silent for three intervals.
            Err(e) => tracing::warn!("heartbeat: {e}"),
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
        let (reported, desired) = self
            .0
            .cell
            .read(|s| (s.reported.clone(), s.desired.clone()));
        Ok(Bytes::from(protocol::encode(&Inspection {
            agent_version: AGENT_VERSION.to_owned(),
            reported,
            desired,
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

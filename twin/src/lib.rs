//! cardeploy-twin: the digital twin. Cars connect over RSocket with mutual TLS (`crates/link`);
//! operators use the REST API (axum); records live in SQLite (sqlx).
//!
//! [`start`] runs the real server on the configured (or port-0) addresses and hands back its
//! addresses, so tests drive the same code as production. `cargo test -p cardeploy-twin`.
//!
//! Every car is a potential attacker (a key can be pulled out of an ECU), so nothing a car sends
//! may grow the twin without bound: event sizes, counts and ages are limited (`db/events.rs`),
//! reports are rate-limited per car (`limits.rs`), and a revoked certificate is refused at the
//! next handshake. The operator API bounds every body, time and upload (`api/`).

mod ahead;
mod api;
mod artifacts;
mod cars;
mod config;
mod db;
mod deployments;
mod error;
mod fetching;
pub mod fleet;
mod housekeeping;
mod instances;
mod limits;
mod private;
mod trust;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cardeploy_link::tls::{PeerRegistry, TlsFiles, server_config};
use cardeploy_link::{LinkServer, ServerOptions, ServerSecurity, ServerStats};
use cardeploy_protocol::{CarId, DesiredState};

pub use artifacts::ServedStats;
pub use config::{Config, ObjectStoreConfig};
pub use db::{CarRecord, StoredDesired};
pub use error::Error;

use crate::cars::{CarAcceptor, Fleet, now};
use crate::db::Db;

/// The twin's shared state.
pub struct Twin {
    config: Config,
    db: Db,
    fleet: Fleet,
    registry: PeerRegistry,
    known: Mutex<HashSet<CarId>>,
    operator_token: String,
    artifacts: artifacts::Artifacts,
    trust: trust::Trust,
    /// The chunk indexes of each release's artifacts, by release digest (what cars may read).
    release_indexes: Mutex<HashMap<String, Arc<Vec<cardeploy_chunks::Digest>>>>,
    /// Release envelopes by digest, as desired states carry them: registered releases never
    /// change, and a twin starting (or a fleet-wide push) composes one message per car.
    release_envelopes: Mutex<HashMap<String, cardeploy_protocol::Envelope>>,
    /// Permits of the delta pool (`delta_workers`).
    delta_pool: Arc<tokio::sync::Semaphore>,
    /// Pairs whose deltas are being made ahead of the cars.
    ahead: ahead::Jobs,
    /// One deployments' round (or operator action on a deployment) at a time on this instance;
    /// across instances, [`Twin::deployments_turn`] adds a lock in the database.
    deployments_lock: tokio::sync::Mutex<()>,
    /// This instance among others, on PostgreSQL; `None` on SQLite (one instance).
    cluster: Option<instances::Cluster>,
    /// Whether this instance drives the deployments now (always, alone).
    driving: std::sync::atomic::AtomicBool,
    /// Rung when an operator creates or changes a deployment: the driver looks at once.
    deployments_wake: tokio::sync::Notify,
    /// Chunk and index uploads in progress (`max_concurrent_uploads` permits).
    uploads: Arc<tokio::sync::Semaphore>,
    /// Held for reading by everything that relies on a stored chunk or index staying (uploads,
    /// release registration), for writing by the chunk store's gc.
    store_gc: Arc<tokio::sync::RwLock<()>>,
}

impl Twin {
    /// Let `car`'s certificate in (a revoked one stays out).
    fn register(&self, car: &CarRecord) {
        if car.revoked_at.is_some() {
            return;
        }
        self.registry
            .insert(car.fingerprint.clone(), car.id.to_string());
        if let Ok(mut known) = self.known.lock() {
            known.insert(car.id.clone());
        }
    }

    /// Keep `car`'s certificate out from the next handshake on, and end its session.
    fn unregister(&self, car: &CarId, fingerprint: &str) {
        self.registry.remove(fingerprint);
        if let Ok(mut known) = self.known.lock() {
            known.remove(car);
        }
        // After `known` changed: a session accepted concurrently either is seen here or sees
        // the car unknown and refuses itself (`CarAcceptor::accept`).
        if let Some(requester) = self.fleet.connected(car) {
            requester.close();
        }
    }

    /// Wait for the turn to read and change deployments: one round or operator action at a time,
    /// fleet-wide. Held until the returned guard drops.
    async fn deployments_turn(&self) -> Result<DeploymentsTurn<'_>, Error> {
        let local = self.deployments_lock.lock().await;
        let fleet = self.db.hold("cardeploy deployments").await?;
        Ok(DeploymentsTurn {
            _fleet: fleet,
            _local: local,
        })
    }

    /// Whether `car` is connected to this instance or, with several, to any live one — and, with
    /// several, to which.
    async fn connection(&self, car: &CarId) -> Result<(bool, Option<String>), Error> {
        let Some(cluster) = &self.cluster else {
            return Ok((self.fleet.connected(car).is_some(), None));
        };
        if self.fleet.connected(car).is_some() {
            return Ok((true, Some(cluster.me.id.clone())));
        }
        Ok(match self.connected_elsewhere(car).await? {
            Some(there) => (true, Some(there.instance)),
            None => (false, None),
        })
    }

    /// The live instance `car` is connected to, if it is another one.
    async fn connected_elsewhere(&self, car: &CarId) -> Result<Option<db::Presence>, Error> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        Ok(self
            .db
            .presence(car, now() - instances::ALIVE_WITHIN_SECS)
            .await?
            .filter(|p| p.instance != cluster.me.id))
    }

    fn is_registered(&self, car: &CarId) -> bool {
        self.known.lock().map(|k| k.contains(car)).unwrap_or(false)
    }

    /// The message a car receives for its stored desired state: the signed document, the
    /// release it names, every root rotation, and the override if any.
    async fn compose(&self, stored: &StoredDesired) -> Result<DesiredState, Error> {
        let known = self
            .release_envelopes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&stored.release)
            .cloned();
        let release = match known {
            Some(release) => release,
            None => {
                let (_, release) =
                    self.db
                        .release(&stored.release)
                        .await?
                        .ok_or_else(|| Error::Corrupt {
                            car: "(desired state)".into(),
                            what: "release",
                            source: serde::de::Error::custom(format!(
                                "release {} is not registered",
                                stored.release
                            )),
                        })?;
                self.release_envelopes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(stored.release.clone(), release.clone());
                release
            }
        };
        Ok(DesiredState {
            desired: stored.desired.clone(),
            release,
            roots: self.trust.rotations(),
            downgrade: stored.downgrade.clone(),
        })
    }

    /// `car`'s message for `stored`, handed to its desired-state streams if it is connected here
    /// ([`cars::Fleet::offer`]).
    async fn offer_stored(
        &self,
        car: &CarId,
        stored: &StoredDesired,
    ) -> Result<DesiredState, Error> {
        let message = self.compose(stored).await?;
        self.fleet.offer(car, &message);
        Ok(message)
    }

    /// The root chain changed without changing the director role: every desired state held here
    /// goes out again carrying the new rotations — from memory, nothing signed again or read.
    fn push_roots(&self) {
        let rotations = self.trust.rotations();
        self.fleet.each(|live| {
            live.desired.send_if_modified(|current| match current {
                Some(message) if message.roots != rotations => {
                    message.roots = rotations.clone();
                    true
                }
                _ => false,
            });
        });
    }

    /// Set `car`'s desired state to the release of `summary` (signed, stored, pushed) and log it,
    /// saying who asked (`by`: a deployment) when it was not the operator directly.
    async fn desire(
        &self,
        car: &CarId,
        summary: &cardeploy_protocol::api::ReleaseSummary,
        ttl_secs: u64,
        downgrade: Option<cardeploy_protocol::Envelope>,
        by: Option<&str>,
    ) -> Result<StoredDesired, Error> {
        let stored = self
            .issue_desired(car, &summary.digest, ttl_secs, downgrade)
            .await?;
        let by = by.map_or(String::new(), |by| format!(" by {by}"));
        self.db
            .event(
                car,
                cars::now(),
                "desired",
                &format!(
                    "desired #{} {}@{} ({}){by}",
                    stored.counter,
                    summary.line,
                    summary.version,
                    &summary.digest[..16]
                ),
            )
            .await?;
        tracing::info!(car = %car, counter = stored.counter, release = %summary.digest, "desired state signed and set{by}");
        Ok(stored)
    }

    /// Sign and store the next desired state for `car` naming `release`, and push it to every
    /// stream of that car. Persisted first: a push the car never gets is repeated at its next
    /// hello.
    async fn issue_desired(
        &self,
        car: &CarId,
        release: &str,
        ttl_secs: u64,
        downgrade: Option<cardeploy_protocol::Envelope>,
    ) -> Result<StoredDesired, Error> {
        let issued = u64::try_from(cars::now()).unwrap_or(0);
        let expires = issued.saturating_add(ttl_secs);
        // What the car says it accepted last in the scope in force: signed above, whatever this
        // twin remembers.
        let scope = self.trust.counter_scope();
        let floor = self.db.reported(car).await?.and_then(|r| {
            let counted_in = r.state.counter_scope;
            (counted_in.is_none() || counted_in == scope)
                .then_some(r.state.desired_counter)
                .flatten()
        });
        let stored = self
            .db
            .set_desired(car, scope.as_deref(), floor, |counter| {
                let doc = cardeploy_release::Desired {
                    car_id: car.to_string(),
                    release: release.to_owned(),
                    counter,
                    issued,
                    expires,
                };
                Ok(StoredDesired {
                    desired: self.trust.sign_desired(&doc)?,
                    release: release.to_owned(),
                    downgrade,
                    counter,
                    issued,
                    expires,
                    scope: scope.clone(),
                })
            })
            .await?;
        // The car may read this release's artifacts from now on (`set_desired` recorded it).
        self.forget_readable(car);
        self.offer_stored(car, &stored).await?;
        Ok(stored)
    }
}

/// See [`Twin::deployments_turn`]. Fields drop in order: the database's lock, then this
/// instance's.
struct DeploymentsTurn<'a> {
    _fleet: Option<sqlx::Transaction<'static, sqlx::Any>>,
    _local: tokio::sync::MutexGuard<'a, ()>,
}

/// A started twin.
pub struct Running {
    pub cars_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub operator_token: String,
    pub link_stats: Arc<ServerStats>,
    twin: Arc<Twin>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), Error>>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("cars_addr", &self.cars_addr)
            .field("api_addr", &self.api_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// What `artifact.chunks` has sent since start.
    pub fn served(&self) -> &ServedStats {
        &self.twin.artifacts.served
    }

    /// Bytes the delta cache holds.
    pub fn delta_cache_bytes(&self) -> u64 {
        self.twin.artifacts.cache_bytes()
    }

    /// (target, base) pairs whose deltas are being made ahead, waiting or running.
    pub fn deltas_ahead_pending(&self) -> usize {
        self.twin.ahead.pending()
    }

    /// Whether this instance drives the deployments now: with several instances on one
    /// database, exactly one does.
    pub fn drives(&self) -> bool {
        self.twin.driving.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Cars with an open connection right now.
    pub fn connected_cars(&self) -> usize {
        self.twin.fleet.connected_count()
    }

    /// Stop accepting, close every car connection, flush the database.
    pub async fn stop(self) -> Result<(), Error> {
        self.stop.send_replace(true);
        for task in self.tasks {
            match task.await {
                Ok(result) => result?,
                Err(e) => tracing::error!("twin task failed: {e}"),
            }
        }
        self.twin.db.close().await;
        Ok(())
    }

    /// Resolves if a server task ends on its own, which is always an error.
    pub async fn failed(&mut self) -> Error {
        let (result, _, _) = futures::future::select_all(self.tasks.iter_mut()).await;
        match result {
            Ok(Err(e)) => e,
            Ok(Ok(())) => Error::Config {
                path: self.twin.config.data_dir.clone(),
                why: "a server task ended unexpectedly".into(),
            },
            Err(e) => Error::Config {
                path: self.twin.config.data_dir.clone(),
                why: format!("a server task panicked: {e}"),
            },
        }
    }
}

fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The operator token: made once, kept in the data dir with mode 0600.
fn operator_token(config: &Config) -> Result<String, Error> {
    let path = config.token_path();
    private::check(&path)?;
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| {
        Error::Config {
            path: path.clone(),
            why: "no randomness for the operator token".into(),
        }
    })?;
    let token = cardeploy_release::hex::encode(&bytes);
    cardeploy_chunks::atomic::write(&path, token.as_bytes(), cardeploy_chunks::atomic::PRIVATE)?;
    Ok(token)
}

/// Start the twin: open the database, listen for cars and operators.
pub async fn start(config: Config) -> Result<Running, Error> {
    private::create_dir(&config.data_dir)?;
    private::check(&config.director_key_path())?;
    if !config.insecure_plaintext {
        private::check(&config.key_path())?;
    }
    // Written before any port answers (the director key's public half too): whoever waits for
    // the API may then read them.
    let operator_token = operator_token(&config)?;
    let trust = trust::Trust::open(&config.data_dir)?;
    let db = match &config.database_url {
        Some(url) => Db::connect(url, config.database_connections, config.event_limits()).await?,
        None => Db::open(&config.db_path(), config.event_limits()).await?,
    };
    // Bound first: the instance names its API address to the others.
    let api_listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.api_listen,
            source,
        })?;
    let api_addr = api_listener.local_addr().map_err(|source| Error::Listen {
        addr: config.api_listen,
        source,
    })?;
    trust.load(&db).await?;
    let (cluster, presence) = match db.backend() {
        db::Backend::Sqlite => (None, None),
        db::Backend::Postgres => {
            let director = trust.director_public().id().to_string();
            let (cluster, presence) = instances::Cluster::new(db.origin(), api_addr, director);
            (Some(cluster), Some(presence))
        }
    };
    let twin = Arc::new(Twin {
        operator_token,
        db,
        fleet: Fleet::default(),
        registry: PeerRegistry::default(),
        known: Mutex::new(HashSet::new()),
        artifacts: artifacts::Artifacts::open(&config)?,
        trust,
        release_indexes: Mutex::new(HashMap::new()),
        release_envelopes: Mutex::new(HashMap::new()),
        delta_pool: Arc::new(tokio::sync::Semaphore::new(config.delta_workers.max(1))),
        ahead: ahead::Jobs::default(),
        deployments_lock: tokio::sync::Mutex::new(()),
        cluster,
        driving: std::sync::atomic::AtomicBool::new(false),
        deployments_wake: tokio::sync::Notify::new(),
        uploads: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_uploads)),
        store_gc: Arc::new(tokio::sync::RwLock::new(())),
        config,
    });
    if let Some(cluster) = &twin.cluster {
        instances::check_director(&twin, &cluster.me).await?;
        twin.db.instance_alive(&cluster.me, now()).await?;
    }
    for car in twin.db.cars().await? {
        twin.register(&car);
    }
    // Desired states are read per car when it says hello: an instance holds the messages of the
    // cars connected to it, not the fleet's.

    let config = &twin.config;
    let security = if config.insecure_plaintext {
        tracing::warn!("--insecure-plaintext: cars are NOT authenticated; development only");
        ServerSecurity::InsecurePlaintext
    } else {
        let (ca, cert, key) = (config.ca_path(), config.cert_path(), config.key_path());
        let tls = server_config(
            &TlsFiles {
                ca: &ca,
                cert: &cert,
                key: &key,
            },
            twin.registry.clone(),
        )?;
        ServerSecurity::MutualTls {
            config: tls,
            registry: twin.registry.clone(),
        }
    };
    let link = LinkServer::bind(
        config.cars_listen,
        security,
        ServerOptions {
            heartbeat: Duration::from_secs(config.heartbeat_secs),
            limits: cardeploy_link::Limits {
                max_streams: config.max_streams_per_car,
                max_queued: config.max_queued_bytes_per_car,
                send_stall: Duration::from_secs(config.send_stall_secs),
                ..cardeploy_link::Limits::default()
            },
            ..ServerOptions::default()
        },
    )
    .await?;
    let cars_addr = link.local_addr();
    let link_stats = link.stats();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let acceptor = Arc::new(CarAcceptor { twin: twin.clone() });
    let link_task = tokio::spawn({
        let stopped = until_stopped(stopped.clone());
        async move { link.serve(acceptor, stopped).await.map_err(Error::from) }
    });
    let api_task = tokio::spawn(api::serve(
        api_listener,
        api::router(twin.clone()),
        Duration::from_secs(config.api_header_timeout_secs),
        until_stopped(stopped.clone()),
    ));
    let sweep_task = tokio::spawn(housekeeping::sweep_events(
        twin.clone(),
        until_stopped(stopped.clone()),
    ));
    let gc_task = tokio::spawn(housekeeping::collect_chunks(
        twin.clone(),
        until_stopped(stopped.clone()),
    ));
    let deployments_task = tokio::spawn({
        let (twin, stopped) = (twin.clone(), until_stopped(stopped.clone()));
        async move {
            deployments::drive(twin, stopped).await;
            Ok(())
        }
    });
    let mut tasks = vec![link_task, api_task, sweep_task, gc_task, deployments_task];
    if let (Some(cluster), Some(presence), Some(url)) =
        (&twin.cluster, presence, twin.db.url().map(str::to_owned))
    {
        // Ends when the twin (the last sender) is dropped.
        tokio::spawn(instances::write_presence(
            twin.db.clone(),
            cluster.me.id.clone(),
            presence,
        ));
        tasks.push(tokio::spawn({
            let (twin, me, stopped) = (
                twin.clone(),
                cluster.me.clone(),
                until_stopped(stopped.clone()),
            );
            async move {
                instances::heartbeat(twin, me, stopped).await;
                Ok(())
            }
        }));
        tasks.push(tokio::spawn(instances::follow(
            twin.clone(),
            url,
            until_stopped(stopped.clone()),
        )));
        tracing::info!(instance = %cluster.me.id, "one of several twin instances on this database");
    }
    let database = match twin.db.backend() {
        db::Backend::Sqlite => "SQLite",
        db::Backend::Postgres => "PostgreSQL",
    };
    tracing::info!(%cars_addr, %api_addr, database, "twin started");
    Ok(Running {
        cars_addr,
        api_addr,
        operator_token: twin.operator_token.clone(),
        link_stats,
        twin,
        stop,
        tasks,
    })
}

/// Run until `shutdown` resolves or a server task fails.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let mut running = start(config).await?;
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down");
            running.stop().await
        }
        e = running.failed() => Err(e),
    }
}

//! cardeploy-agent: the car-side daemon. Keeps one RSocket connection to the twin, takes each new
//! desired state, persists it atomically before acting, reports what it did, and keeps going when
//! the twin is away (reconnecting with exponential backoff and full jitter).
//!
//! One owner per concern (docs/architecture.md has the map): the state cell (`cell`) is the
//! only writer of the persisted [`state`]; the reporter (`reporter`) is the only way out to
//! the twin; the session (`session`) holds the connection; the deployer ([`deploy`]) takes a
//! desired state through its state machine, the fetcher (`fetch`) brings its artifacts, and
//! the workload parts apply it — the OS driver ([`os`]) through a narrow handle.
//!
//! [`run`] is the whole daemon; `main` only parses arguments and wires SIGTERM. Tests run the real
//! binary against a real twin: `cargo test -p cardeploy-agent`.

mod cell;
mod config;
pub mod containers;
pub mod deploy;
mod error;
mod fetch;
pub mod notify;
pub mod os;
mod position;
pub mod release;
mod reporter;
mod session;
pub mod state;
mod store;
pub mod verify;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cardeploy_link::ClientSecurity;
use cardeploy_link::tls::{TlsFiles, client_config};

pub use config::Config;
pub use error::Error;
pub use state::{SCHEMA as STATE_SCHEMA, State};
pub use store::Store;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Run the agent until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let notify = notify::Notifier::from_env();
    // The configuration's files first: a wrong path is the most common first-install mistake.
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
    let roots = verify::Roots::new(&config.state_dir)?;
    let trusted = roots.load(&config.root)?;
    tracing::info!(root = trusted.root().version, "root of trust loaded");
    let managed = state::Managed {
        os: config.os.is_some(),
        workloads: config
            .containers
            .as_ref()
            .is_some_and(|c| c.kubeconfig.is_some()),
    };
    let (cell, warning) = cell::Cell::open(
        Store::new(&config.state_dir)?,
        managed,
        &trusted.counter_scope(),
    )?;
    let cell = Arc::new(cell);
    let (epoch, phase) = cell.read(|s| (s.epoch, s.reported.phase));
    let reporter = Arc::new(reporter::Reporter::new(epoch));
    if let Some(warning) = warning {
        tracing::error!("{warning}");
        reporter.keep(("state-corrupt".to_owned(), warning.to_string()));
    }
    tracing::info!(car = %config.car_id, epoch, ?phase, "agent started");

    let fetcher = Arc::new(fetch::Fetcher::new(&config)?);
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
                rauc = os::connect(os_config) => rauc,
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
        // Without RAUC, the configuration says (releases for other hardware are refused by
        // their `compatible`; none configured matches no OS release).
        None => (None, config.compatible.clone().unwrap_or_default()),
    };
    let reached = Arc::new(AtomicBool::new(false));
    // The OS and the workloads drivers wake each other when their state moves: a release with
    // both starts its workloads once the new slot passed its checks, and commits the slot once
    // they are promoted.
    let os_wake = Arc::new(tokio::sync::Notify::new());
    let workloads_wake = Arc::new(tokio::sync::Notify::new());
    let os_host = config.os.clone().map(|os_config| {
        Arc::new(os::host::Host::new(
            os_config,
            cell.clone(),
            reporter.clone(),
            fetcher.clone(),
            reached.clone(),
            (os_wake.clone(), workloads_wake.clone()),
        ))
    });
    let (containers, registry, workloads) = match &config.containers {
        Some(c) => {
            let (containers, task) =
                containers::Containers::start(c, fetcher.clone(), cell.clone(), reporter.clone())
                    .await?;
            // What the car held when it stopped is served again at once (a rollback needs it).
            let (release, running) =
                cell.read(|s| (s.release.clone(), s.workloads.running_release().cloned()));
            if let Some(release) = release
                && release
                    .artifacts
                    .iter()
                    .all(|a| fetcher.on_disk(a.name(), &a.index))
                && let Err(e) = containers.serve(&release, running.as_ref())
            {
                tracing::error!("{e}");
            }
            let workloads = match &c.kubeconfig {
                Some(kubeconfig) => {
                    let part = Arc::new(containers::Workloads::new(
                        c.clone(),
                        managed.os,
                        cell.clone(),
                        reporter.clone(),
                        containers.clone(),
                        (workloads_wake.clone(), os_wake.clone()),
                    ));
                    let driver =
                        tokio::spawn(containers::driver::drive(part.clone(), kubeconfig.clone()));
                    Some((part, driver))
                }
                None => None,
            };
            (Some(containers), Some(task), workloads)
        }
        None => (None, None, None),
    };
    let deployer = Arc::new(deploy::Deployer {
        cell: cell.clone(),
        reporter: reporter.clone(),
        fetcher,
        parts: deploy::Parts {
            os: os_host.clone(),
            containers,
            workloads: workloads.as_ref().map(|(part, _)| part.clone()),
        },
        roots,
        trusted: Mutex::new(trusted),
        car: deploy::Car {
            id: config.car_id.to_string(),
            compatible,
            max_artifact_bytes: config.max_artifact_bytes,
        },
    });
    let driver = match (os_host, rauc) {
        (Some(host), Some(rauc)) => Some(tokio::spawn(os::driver::drive(host, rauc))),
        _ => None,
    };
    let position = config
        .position
        .clone()
        .map(|p| tokio::spawn(position::run(p, reporter.clone())));
    // Started: state loaded, OS driver running. The twin may be out of reach for hours and the
    // car works offline, so readiness does not wait for it.
    notify.ready(&format!("started, connecting to the twin {}", config.twin));
    let watchdog = notify.start_watchdog();
    let agent = Arc::new(session::Agent {
        config,
        cell,
        reporter,
        deployer,
        reached,
        notify,
        started: Instant::now(),
    });
    session::keep_connected(agent, security, shutdown).await;
    if let Some(driver) = driver {
        driver.abort();
    }
    if let Some(position) = position {
        position.abort();
    }
    if let Some(registry) = registry {
        registry.abort();
    }
    if let Some((_, driver)) = workloads {
        driver.abort();
    }
    drop(watchdog);
    tracing::info!("agent stopped");
    Ok(())
}

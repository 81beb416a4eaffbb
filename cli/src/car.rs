use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use cardeploy_pki::FleetCa;
use cardeploy_protocol::api::{CarView, DesiredView, EventView, EventsPage, NewCar, SetDesired};
use cardeploy_protocol::{CarId, Envelope, Inspection, validate_attribute};
use clap::Subcommand;

use crate::api::{Api, ApiArgs};
use crate::files;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Issue a car's certificate, write its agent configuration, register it with the twin.
    ///
    /// Writes OUT/ca.pem, OUT/car.pem, OUT/car.key (0600), OUT/root.json (the root of trust the
    /// car pins) and OUT/agent.toml: copy OUT to the car's /etc/cardeploy, or run
    /// `cardeploy-agent --config OUT/agent.toml` for a test.
    Add {
        /// The car id, e.g. its VIN: 1-64 characters of A-Z a-z 0-9 . _ -
        car_id: String,
        /// An attribute for selectors, key=value (repeat the flag).
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attrs: Vec<String>,
        /// The fleet PKI directory (from `cardeploy pki init`), holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        pki: PathBuf,
        /// Where to write the car's files [default: cars/<car-id>].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// The twin's car endpoint as the car will reach it, host:port; the host must be one of
        /// the twin certificate's names.
        #[arg(long, default_value = "localhost:7443")]
        twin: String,
        /// The root of trust the car pins (version 1, from `cardeploy root init`): the car
        /// verifies every release and desired state against it and the rotations that follow.
        #[arg(long, value_name = "ROOT.json")]
        root: PathBuf,
        /// The car's hardware, as RAUC's `compatible` names it: releases for other hardware
        /// are refused.
        #[arg(long)]
        compatible: String,
        /// Heartbeat interval written into agent.toml, seconds.
        #[arg(long, default_value_t = 10)]
        heartbeat_secs: u64,
        /// Only issue the files; register later.
        #[arg(long)]
        no_register: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List registered cars with their connection and reported state.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one car's twin: attributes, desired and reported state.
    Show {
        car_id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a car's event log, oldest first.
    Events {
        car_id: String,
        /// How many of the newest events; more than the twin sends in one page (1000) are
        /// fetched page by page. The twin keeps a limited number per car (its
        /// `events_per_car`, 1000 by default) for a limited time.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a car's certificate, e.g. when its ECU or key is lost or stolen.
    ///
    /// The twin refuses the certificate from the next TLS handshake on, closes the car's open
    /// connection at once, and never registers that certificate again. The car's record,
    /// history and desired-state counter stay: give the car a new certificate with
    /// `cardeploy car add CAR --out NEW-DIR ...` (same car id) and it carries on.
    Revoke {
        car_id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set what one car should run (by hand; a fleet gets `cardeploy deploy`): the twin signs a desired state
    /// naming a release it holds (`cardeploy release push`); a connected car gets it at once and
    /// verifies it before acting.
    SetDesired {
        car_id: String,
        /// The release: its digest (what `cardeploy release push` printed) or LINE@VERSION.
        #[arg(long)]
        release: String,
        /// How long the signed desired state stays valid, seconds [default: the twin's
        /// desired_ttl_secs]. A car refuses an expired one (freeze protection).
        #[arg(long)]
        ttl_secs: Option<u64>,
        /// A root-signed downgrade override (JSON envelope), when the release is older than what
        /// the car runs.
        #[arg(long, value_name = "FILE")]
        downgrade: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Ask a connected car for its live state.
    Inspect {
        car_id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// The most events the twin sends in one page.
const EVENTS_PAGE: u32 = 1000;

/// The newest `limit` events of `car`, oldest first, page by page back in time.
fn events(api: &Api, car: &CarId, limit: u32) -> anyhow::Result<Vec<EventView>> {
    let mut pages: Vec<Vec<EventView>> = Vec::new();
    let mut remaining = limit;
    let mut before: Option<i64> = None;
    while remaining > 0 {
        let ask = remaining.min(EVENTS_PAGE);
        let path = match before {
            None => format!("/api/v1/cars/{car}/events?limit={ask}"),
            Some(before) => format!("/api/v1/cars/{car}/events?limit={ask}&before={before}"),
        };
        let page: EventsPage = api.get("reading events", &path)?;
        remaining = remaining.saturating_sub(u32::try_from(page.events.len()).unwrap_or(u32::MAX));
        let done = page.events.is_empty();
        pages.push(page.events);
        match page.next_before {
            Some(next) if !done => before = Some(next),
            _ => break,
        }
    }
    Ok(pages.into_iter().rev().flatten().collect())
}

fn parse_attrs(attrs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for attr in attrs {
        let Some((key, value)) = attr.split_once('=') else {
            bail!("--attr {attr:?}: expected key=value, e.g. --attr model=tx7");
        };
        validate_attribute(key, value)?;
        if map.insert(key.to_owned(), value.to_owned()).is_some() {
            bail!("--attr {key} given twice");
        }
    }
    Ok(map)
}

fn pretty(value: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)?)
}

/// `-` for what is not there, in the table of `car list`.
fn or_dash(value: Option<impl std::fmt::Display>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Add {
            car_id,
            attrs,
            pki,
            out,
            twin,
            root,
            compatible,
            heartbeat_secs,
            no_register,
            api,
        } => {
            let car = CarId::new(car_id)?;
            let root_bytes = files::read(&root)?;
            // Checked here so that a car never ships with a root it cannot use.
            cardeploy_release::TrustedRoot::pinned(&root_bytes).with_context(|| {
                format!(
                    "{} is not a valid root (make one with `cardeploy root init`)",
                    root.display()
                )
            })?;
            if compatible.is_empty() || compatible.contains(['"', '\\', '\n']) {
                bail!(
                    "--compatible {compatible:?}: give RAUC's compatible string, e.g. cardeploy-qemuarm64"
                );
            }
            let attributes = parse_attrs(&attrs)?;
            let out = out.unwrap_or_else(|| PathBuf::from("cars").join(car.as_str()));
            if out.join("car.key").exists() {
                bail!(
                    "{} already holds a car key; refusing to overwrite it (remove it deliberately to re-issue)",
                    out.display()
                );
            }
            let ca = FleetCa::load(&pki.join("ca.pem"), &pki.join("ca.key"))
                .with_context(|| format!("loading the fleet CA from {}", pki.display()))?;
            let issued = ca.issue_car(car.as_str())?;
            // Register first: a car the twin refuses gets no files that look usable.
            if !no_register {
                let api = Api::new(&api)?;
                let _: CarView = api.post(
                    "registering the car",
                    "/api/v1/cars",
                    &NewCar {
                        id: car.to_string(),
                        attributes,
                        certificate_pem: issued.cert_pem.clone(),
                    },
                )?;
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            files::write(&out.join("ca.pem"), ca.cert_pem())?;
            files::write(&out.join("car.pem"), &issued.cert_pem)?;
            files::write_private(&out.join("car.key"), &issued.key_pem)?;
            files::write(&out.join("root.json"), &root_bytes)?;
            let config = format!(
                "# cardeploy-agent configuration for car {car}, written by `cardeploy car add`.\n\
                 # Relative paths are relative to this file.\n\
                 car_id = \"{car}\"\n\
                 twin = \"{twin}\"\n\
                 ca = \"ca.pem\"\n\
                 cert = \"car.pem\"\n\
                 key = \"car.key\"\n\
                 state_dir = \"state\"\n\
                 root = \"root.json\"\n\
                 compatible = \"{compatible}\"\n\
                 heartbeat_secs = {heartbeat_secs}\n"
            );
            files::write(&out.join("agent.toml"), &config)?;
            if no_register {
                println!(
                    "car {car}: files written to {} (not registered)",
                    out.display()
                );
            } else {
                println!("car {car} registered; files written to {}", out.display());
            }
            println!(
                "run it: cardeploy-agent --config {}",
                out.join("agent.toml").display()
            );
            Ok(())
        }
        Command::List { json, api } => {
            let cars: Vec<CarView> = Api::new(&api)?.get("listing cars", "/api/v1/cars")?;
            if json {
                println!("{}", pretty(&cars)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<11} {:<9} {:<8} {:<28} {:<8} ATTRIBUTES",
                "CAR", "CERTIFICATE", "CONNECTED", "PHASE", "RELEASE", "DESIRED"
            );
            for car in &cars {
                let attrs = car
                    .attributes
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                let state = car.state();
                println!(
                    "{:<20} {:<11} {:<9} {:<8} {:<28} {:<8} {}",
                    car.id,
                    car.certificate.as_str(),
                    if car.connected { "yes" } else { "no" },
                    or_dash(state.map(|s| s.phase.as_str())),
                    or_dash(state.and_then(|s| s.release.as_deref())),
                    or_dash(car.desired.as_ref().map(|d| d.counter)),
                    attrs
                );
            }
            Ok(())
        }
        Command::Show { car_id, api } => {
            let car = CarId::new(car_id)?;
            let view: CarView =
                Api::new(&api)?.get("reading the car", &format!("/api/v1/cars/{car}"))?;
            println!("{}", pretty(&view)?);
            Ok(())
        }
        Command::Events { car_id, limit, api } => {
            let car = CarId::new(car_id)?;
            for event in events(&Api::new(&api)?, &car, limit)? {
                println!("{}  {:<12} {}", event.at, event.kind, event.message);
            }
            Ok(())
        }
        Command::Revoke { car_id, api } => {
            let car = CarId::new(car_id)?;
            let view: CarView =
                Api::new(&api)?.delete("revoking the car", &format!("/api/v1/cars/{car}"))?;
            let fingerprint = &view.fingerprint;
            println!(
                "car {car}: certificate {}… {}; the twin refuses it from now on and closed the car's connection",
                fingerprint.get(..16).unwrap_or(fingerprint),
                view.certificate.as_str(),
            );
            println!(
                "the car keeps its record, history and counters: give it a new certificate with `cardeploy car add {car} --out <new dir> ...`"
            );
            Ok(())
        }
        Command::SetDesired {
            car_id,
            release,
            ttl_secs,
            downgrade,
            api,
        } => {
            let car = CarId::new(car_id)?;
            let downgrade = match downgrade {
                Some(file) => Some(
                    Envelope::from_json(&files::read(&file)?)
                        .with_context(|| format!("{} is not a signed envelope", file.display()))?,
                ),
                None => None,
            };
            let body = SetDesired {
                release,
                ttl_secs,
                downgrade,
            };
            let desired: DesiredView = Api::new(&api)?.put(
                "setting the desired state",
                &format!("/api/v1/cars/{car}/desired"),
                &body,
            )?;
            println!(
                "car {car}: desired #{} = {}@{} ({}), signed by the twin, valid until {}",
                desired.counter,
                or_dash(desired.line.as_deref()),
                or_dash(desired.version.as_deref()),
                desired.release,
                desired.expires
            );
            Ok(())
        }
        Command::Inspect { car_id, api } => {
            let car = CarId::new(car_id)?;
            let live: Inspection = Api::new(&api)?
                .get("inspecting the car", &format!("/api/v1/cars/{car}/inspect"))?;
            println!("{}", pretty(&live)?);
            Ok(())
        }
    }
}

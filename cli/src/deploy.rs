//! `cardeploy deploy`: fleet deployments — one release to the cars a selector (and a geofence)
//! picks, a canary then waves, halted by failures, bounded by a time-to-live.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use cardeploy_protocol::api::{
    DeploymentView, NewDeployment, PhaseRequest, PreviewRequest, PreviewView,
};
use clap::Subcommand;

use crate::api::{Api, ApiArgs};
use crate::files;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a deployment: RELEASE to the cars SELECTOR (and GEOFENCE) pick, a canary first,
    /// then waves.
    ///
    /// Example: `cardeploy deploy create nav-2 --release nav@2.0.0 --selector
    /// 'model=tx7,market in (eu,uk),!test-fleet' --canary 10 --wave 10% --wave 50% --wave 100%
    /// --soak 30m --failure-threshold 5% --ttl 14d`. Phases are cumulative: each reaches at least
    /// the cars of the one before. The twin refuses a deployment that selects a car of a running
    /// one (unless `--supersede`), and makes the deltas from what the cars run before the
    /// canary starts.
    Create(Box<CreateArgs>),
    /// The cars a selector and geofence pick now, before anything happens.
    Preview {
        #[arg(long, default_value = "")]
        selector: String,
        #[arg(long, value_name = "FILE")]
        geofence: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Every deployment, a line each.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One deployment: each phase's progress, the failures and why a halt happened.
    Status {
        name: String,
        /// Keep showing it, every 2 s, until it is over (Ctrl-C to stop watching).
        #[arg(long)]
        watch: bool,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start no more cars until resumed.
    Pause {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Resume a paused or halted deployment; the failures so far are forgiven.
    Resume {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop for good: no car starts any more (started cars keep the release).
    Abort {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `cardeploy deploy create` arguments.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// 1-64 characters of A-Z a-z 0-9 - _ .
    name: String,
    /// The release: its digest or LINE@VERSION.
    #[arg(long)]
    release: String,
    /// Label selector over car attributes, Kubernetes syntax: `k=v`, `k!=v`, `k in (a,b)`,
    /// `k notin (a,b)`, `k`, `!k`, comma-separated (all must hold). Empty: every car.
    #[arg(long, default_value = "")]
    selector: String,
    /// A GeoJSON file of Polygon/MultiPolygon areas (or Features of them): only cars whose
    /// last reported position is inside (a car that reported none is outside).
    #[arg(long, value_name = "FILE")]
    geofence: Option<PathBuf>,
    /// The canary: a number of cars (`10`) or a share (`1%`).
    #[arg(long, default_value = "1")]
    canary: String,
    /// A wave after the canary, cumulative: `10%`, `50%`, `100%`, or a number of cars
    /// (repeat the flag). Without one: a single wave of 100 %.
    #[arg(long = "wave", value_name = "SIZE")]
    waves: Vec<String>,
    /// How long each phase must stay good before the next starts: `90s`, `30m`, `2h`.
    #[arg(long, default_value = "0s")]
    soak: String,
    /// Cars started per minute at most.
    #[arg(long)]
    rate: Option<u32>,
    /// Failures (or rollbacks) among a phase's cars that halt the deployment: `5%`.
    #[arg(long, default_value = "10%")]
    failure_threshold: String,
    /// Successes among a phase's cars needed before the next phase: `95%`.
    #[arg(long, default_value = "100%")]
    success_threshold: String,
    /// Time-to-live: after it, cars that have not started do not start: `7d`, `12h`.
    #[arg(long, default_value = "7d")]
    ttl: String,
    /// Abort the running deployments that select any of the same cars, instead of refusing.
    #[arg(long)]
    supersede: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// `10` → cars, `10%` → a share.
fn phase(size: &str, soak_secs: u64) -> anyhow::Result<PhaseRequest> {
    let (cars, percent) =
        match size.strip_suffix('%') {
            Some(p) => (
                None,
                Some(
                    p.trim()
                        .parse::<f64>()
                        .with_context(|| format!("{size:?}: a share is like 10%"))?,
                ),
            ),
            None => (
                Some(size.trim().parse::<u64>().with_context(|| {
                    format!("{size:?}: give a number of cars or a share like 10%")
                })?),
                None,
            ),
        };
    Ok(PhaseRequest {
        cars,
        percent,
        soak_secs,
    })
}

/// `5%` → 0.05.
fn share(text: &str) -> anyhow::Result<f64> {
    let Some(p) = text.strip_suffix('%') else {
        bail!("{text:?}: give a share like 5%");
    };
    Ok(p.trim()
        .parse::<f64>()
        .with_context(|| format!("{text:?}: give a share like 5%"))?
        / 100.0)
}

/// `90s`, `30m`, `2h`, `7d` → seconds.
pub fn duration(text: &str) -> anyhow::Result<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .with_context(|| format!("{text:?}: give a duration like 90s, 30m, 2h or 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{text:?}: the unit is s, m, h or d"),
    };
    Ok(n * scale)
}

fn geofence(path: Option<&PathBuf>) -> anyhow::Result<Option<serde_json::Value>> {
    path.map(|p| {
        let bytes = files::read(p)?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", p.display()))
    })
    .transpose()
}

/// A progress bar of `width` characters for `done` of `total`.
fn bar(done: u64, failed: u64, total: u64, width: usize) -> String {
    if total == 0 {
        return format!("[{}]", " ".repeat(width));
    }
    let cells = |n: u64| ((n as f64 / total as f64) * width as f64).round() as usize;
    let ok = cells(done.saturating_sub(failed)).min(width);
    let bad = cells(failed).min(width - ok);
    format!(
        "[{}{}{}]",
        "#".repeat(ok),
        "x".repeat(bad),
        ".".repeat(width - ok - bad)
    )
}

/// The status as a person reads it.
pub fn render(d: &DeploymentView) -> String {
    let mut out = format!(
        "{} — {}@{} to `{}`{}: {}{}\n  {} cars selected, {} started, {} succeeded, {} failed (halt at {:.0} %, next phase at {:.0} % succeeded)\n",
        d.name,
        d.line,
        d.version,
        d.selector,
        if d.geofence {
            " within the geofence"
        } else {
            ""
        },
        d.state.to_uppercase(),
        match (&d.reason, d.never_reached) {
            (Some(reason), _) => format!(" — {reason}"),
            (_, Some(n)) => format!(" — {n} cars never reached"),
            _ => String::new(),
        },
        d.selected,
        d.started,
        d.succeeded,
        d.failed,
        d.failure_threshold * 100.0,
        d.success_threshold * 100.0,
    );
    if d.deltas_ahead_pending > 0 {
        out += &format!(
            "  making the release's deltas ahead of the first car: {} pairs to go\n",
            d.deltas_ahead_pending
        );
    }
    for (i, p) in d.phases.iter().enumerate() {
        let current = if i + 1 == d.phase && d.state == "running" {
            "▶"
        } else {
            " "
        };
        out += &format!(
            "  {current} phase {} {} {:>5}/{:<5} started, {} succeeded, {} failed{}\n",
            i + 1,
            bar(p.succeeded + p.failed, p.failed, p.group, 30),
            p.started,
            p.group,
            p.succeeded,
            p.failed,
            if p.soak_secs > 0 {
                format!(", soak {} s", p.soak_secs)
            } else {
                String::new()
            },
        );
    }
    for f in &d.failures {
        out += &format!(
            "  failed: {} — {}\n",
            f.car,
            f.error.as_deref().unwrap_or("no reason reported")
        );
    }
    for e in d
        .events
        .iter()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        out += &format!("  {}  {}\n", e.at, e.message);
    }
    out
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create(args) => {
            let CreateArgs {
                name,
                release,
                selector,
                geofence: fence,
                canary,
                waves,
                soak,
                rate,
                failure_threshold,
                success_threshold,
                ttl,
                supersede,
                api,
            } = *args;
            let soak = duration(&soak)?;
            let mut phases = vec![phase(&canary, soak)?];
            if waves.is_empty() {
                phases.push(phase("100%", 0)?);
            }
            for w in &waves {
                phases.push(phase(w, soak)?);
            }
            let request = NewDeployment {
                name,
                release,
                selector,
                geofence: geofence(fence.as_ref())?,
                phases,
                max_starts_per_minute: rate,
                failure_threshold: share(&failure_threshold)?,
                success_threshold: share(&success_threshold)?,
                ttl_secs: duration(&ttl)?,
                supersede,
            };
            let api = Api::new(&api)?;
            let view: DeploymentView =
                api.post("creating the deployment", "/api/v1/deployments", &request)?;
            print!("{}", render(&view));
            Ok(())
        }
        Command::Preview {
            selector,
            geofence: fence,
            api,
        } => {
            let api = Api::new(&api)?;
            let request = PreviewRequest {
                selector,
                geofence: geofence(fence.as_ref())?,
            };
            let view: PreviewView =
                api.post("previewing", "/api/v1/deployments/preview", &request)?;
            for car in &view.cars {
                println!("{car}");
            }
            let more = view.total - view.cars.len();
            if more > 0 {
                println!("… and {more} more");
            }
            eprintln!("{} cars selected", view.total);
            Ok(())
        }
        Command::List { json, api } => {
            let api = Api::new(&api)?;
            let views: Vec<DeploymentView> =
                api.get("listing deployments", "/api/v1/deployments")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<24} {:<10} {:>5} {:>8} {:>8} {:>9} {:>6}",
                "NAME", "RELEASE", "STATE", "PHASE", "SELECTED", "STARTED", "SUCCEEDED", "FAILED"
            );
            for d in views {
                println!(
                    "{:<24} {:<24} {:<10} {:>5} {:>8} {:>8} {:>9} {:>6}",
                    d.name,
                    format!("{}@{}", d.line, d.version),
                    d.state,
                    format!("{}/{}", d.phase, d.phases.len()),
                    d.selected,
                    d.started,
                    d.succeeded,
                    d.failed
                );
            }
            Ok(())
        }
        Command::Status {
            name,
            watch,
            json,
            api,
        } => {
            let api = Api::new(&api)?;
            let path = format!("/api/v1/deployments/{name}");
            loop {
                let view: DeploymentView = api.get("reading the deployment", &path)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&view)?);
                } else {
                    if watch {
                        // Clear the screen and go home: the status redraws in place.
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", render(&view));
                }
                let over = matches!(view.state.as_str(), "completed" | "aborted" | "expired");
                if !watch || over {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Command::Pause { name, api } => act(&api, &name, "pause"),
        Command::Resume { name, api } => act(&api, &name, "resume"),
        Command::Abort { name, api } => act(&api, &name, "abort"),
    }
}

fn act(api: &ApiArgs, name: &str, action: &str) -> anyhow::Result<()> {
    let api = Api::new(api)?;
    let view: DeploymentView = api.post(
        &format!("{action} the deployment"),
        &format!("/api/v1/deployments/{name}/{action}"),
        &serde_json::json!({}),
    )?;
    print!("{}", render(&view));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_shares_and_durations_read_as_people_write_them() {
        assert_eq!(phase("10", 5).unwrap().cars, Some(10));
        assert_eq!(phase("12.5%", 5).unwrap().percent, Some(12.5));
        assert!(phase("ten", 0).is_err());
        assert!((share("5%").unwrap() - 0.05).abs() < 1e-12);
        assert!(share("5").is_err());
        assert_eq!(duration("90s").unwrap(), 90);
        assert_eq!(duration("30m").unwrap(), 1800);
        assert_eq!(duration("2h").unwrap(), 7200);
        assert_eq!(duration("7d").unwrap(), 604_800);
        assert_eq!(duration("45").unwrap(), 45);
        assert!(duration("1w").is_err());
        assert!(duration("m").is_err());
    }

    #[test]
    fn a_bar_shows_successes_and_failures() {
        assert_eq!(bar(5, 1, 10, 10), "[####x.....]");
        assert_eq!(bar(0, 0, 0, 4), "[    ]");
        assert_eq!(bar(10, 0, 10, 4), "[####]");
    }
}

//! What the OS driver observes: RAUC (reached with retries: at boot the agent may start before
//! it), the boot id, the running system's version; and the report of the slots made from it.

use std::time::Duration;

use cardeploy_protocol::{OsReport, SlotReport};
use cardeploy_rauc::{Rauc, SlotStatus};

use super::machine::{Facts, Health, OsUpdate, WorkloadsGate};
use super::policy::{self, OsConfig};
use crate::{Error, now_secs};

/// Connect to RAUC, retrying until it answers: at boot the agent may start before RAUC.
pub(crate) async fn connect(config: &OsConfig) -> Rauc {
    let mut delay = Duration::from_millis(200);
    let mut warned = false;
    loop {
        let attempt = match &config.rauc_bus {
            Some(address) => Rauc::at(address).await,
            None => Rauc::system().await,
        };
        match attempt {
            Ok(rauc) => match rauc.compatible().await {
                Ok(_) => return rauc,
                Err(e) if !warned => {
                    tracing::warn!("RAUC is not answering yet: {e}");
                    warned = true;
                }
                Err(_) => {}
            },
            Err(e) if !warned => {
                tracing::warn!("RAUC is not reachable yet: {e}");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// What RAUC and the system say, beyond the pure facts: for reports.
pub(super) struct Observed {
    pub facts: Facts,
    /// `VERSION_ID` of the running system's os-release.
    pub version: Option<String>,
    pub slots: Vec<SlotStatus>,
    pub primary: Option<String>,
}

/// `VERSION_ID` from an os-release file, if there is one.
fn os_version(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix("VERSION_ID=")?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}

fn read_boot_id(config: &OsConfig) -> Result<String, Error> {
    std::fs::read_to_string(&config.boot_id_file)
        .map(|s| s.trim().to_owned())
        .map_err(|source| Error::Io {
            path: config.boot_id_file.clone(),
            source,
        })
}

pub(super) fn bootname_of(slots: &[SlotStatus], name: &str) -> Option<String> {
    slots
        .iter()
        .find(|s| s.name == name)
        .and_then(|s| s.bootname.clone())
}

/// `last` is what RAUC said before: while it installs it answers no slot-status or primary
/// query (`Busy`), and the report keeps the last known slots meanwhile.
pub(super) async fn observe(
    rauc: &Rauc,
    config: &OsConfig,
    health: &Health,
    last: Option<&Observed>,
) -> Result<Observed, Error> {
    let boot_id = read_boot_id(config)?;
    let booted = rauc.boot_slot().await?;
    let rauc_idle = rauc.operation().await? == "idle";
    let (slots, primary) = match rauc.slots().await {
        Ok(slots) => {
            // Some bootloader backends cannot say; the report then leaves it out.
            let primary = match rauc.primary().await {
                Ok(name) => bootname_of(&slots, &name),
                Err(e) => {
                    tracing::debug!("RAUC primary slot unknown: {e}");
                    None
                }
            };
            (slots, primary)
        }
        Err(cardeploy_rauc::Error::Busy) if !rauc_idle || last.is_some() => last
            .map(|l| (l.slots.clone(), l.primary.clone()))
            .unwrap_or_default(),
        Err(e) => return Err(e.into()),
    };
    let now = now_secs();
    let parked = match &config.reboot {
        policy::RebootPolicy::Parked { file } => file.exists(),
        _ => false,
    };
    Ok(Observed {
        facts: Facts {
            boot_id,
            booted: booted.into(),
            rauc_idle,
            now,
            reboot: policy::reboot_gate(&config.reboot, now, parked),
            health: health.clone(),
            // Filled in by the caller, which holds the state.
            boot_confirmed: false,
            // The driver fills these in from the state.
            workloads: WorkloadsGate::NotPart,
        },
        version: os_version(&config.os_release),
        slots,
        primary,
    })
}

pub(super) fn os_report(observed: &Observed, update: &OsUpdate) -> OsReport {
    OsReport {
        booted: observed.facts.booted.to_string(),
        version: observed.version.clone(),
        primary: observed.primary.clone(),
        update: update.name().to_owned(),
        release: update.release().map(|r| r.label()),
        slots: observed
            .slots
            .iter()
            .map(|s| SlotReport {
                name: s.name.clone(),
                bootname: s.bootname.clone(),
                state: s.state.to_string(),
                boot_status: s.boot_status.clone(),
                bundle_version: s.bundle_version.clone(),
            })
            .collect(),
    }
}

//! The OS driver's effects on the system: hash the bundle again, install it with RAUC, reboot.

use std::time::Duration;

use cardeploy_protocol::{InstallProgress, ReportBody};
use cardeploy_rauc::{InstallArgs, Rauc};

use super::health::run;
use super::host::Host;
use super::machine::{Bootname, Facts, OsUpdate, Outcome};
use super::observe::bootname_of;
use super::policy::OsConfig;
use crate::Error;
use crate::error::io;
use crate::release::HeldArtifact;

/// Hash the bundle on disk again: what RAUC installs must be what the release names.
pub(super) async fn verify(host: &Host, current: &OsUpdate) -> Outcome {
    let Some(bundle) = host.bundle() else {
        return Outcome::VerifyFailed("the accepted release names no OS bundle".into());
    };
    let (path, artifact) = bundle;
    let checked = tokio::task::spawn_blocking({
        let path = path.clone();
        let artifact = artifact.clone();
        move || check_file(&path, &artifact)
    })
    .await;
    match checked {
        Ok(Ok(())) => {
            tracing::info!(bundle = %path.display(), "bundle verified");
            Outcome::Verified
        }
        Ok(Err(e)) => {
            // Forget it: the next desired state fetches it again.
            host.forget_artifact(artifact.name()).await;
            Outcome::VerifyFailed(format!(
                "the bundle of {} on disk is not the release's ({e}); it is fetched again with the next desired state",
                current
                    .release()
                    .map_or_else(|| "?".to_owned(), |r| r.label())
            ))
        }
        Err(e) => Outcome::VerifyFailed(format!("verification task failed: {e}")),
    }
}

/// Size and sha256 of a file on disk against its declaration, read in blocks.
fn check_file(path: &std::path::Path, artifact: &HeldArtifact) -> Result<(), Error> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = cardeploy_chunks::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finish().hex();
    let declared = &artifact.declared;
    if size != declared.size || digest != declared.digest {
        return Err(Error::NotAsDeclared {
            path: path.to_owned(),
            size,
            digest,
            declared_size: declared.size,
            declared_digest: declared.digest.clone(),
        });
    }
    Ok(())
}

pub(super) async fn install(
    host: &Host,
    rauc: &Rauc,
    config: &OsConfig,
    current: &OsUpdate,
    facts: &Facts,
) -> Outcome {
    let Some((path, _)) = host.bundle() else {
        return Outcome::InstallRefused("the accepted release names no OS bundle".into());
    };
    let label = current.release().map_or_else(String::new, |r| r.label());
    tracing::info!(bundle = %path.display(), release = %label, "installing");
    let mut last = -1;
    let on_progress = |p: &cardeploy_rauc::Progress| {
        // RAUC reports each step; the twin needs a handful of lines, not hundreds.
        if p.percentage / 10 == last / 10 && p.percentage != 100 {
            return;
        }
        last = p.percentage;
        tracing::info!("install {}%: {}", p.percentage, p.message);
        let body = ReportBody::Install {
            progress: InstallProgress {
                release: label.clone(),
                percentage: p.percentage,
                message: p.message.clone(),
            },
        };
        host.report_soon(body);
    };
    let result = rauc
        .install(
            &path,
            &InstallArgs::default(),
            Duration::from_secs(config.install_timeout_secs),
            on_progress,
        )
        .await;
    match result {
        Ok(()) => {
            let slots = rauc.slots().await.unwrap_or_default();
            let to = match rauc.primary().await {
                Ok(name) => bootname_of(&slots, &name).map(Bootname::from),
                Err(_) => None,
            }
            // A backend that cannot say its primary: the other slot of the booted one's class.
            .or_else(|| {
                let class = slots
                    .iter()
                    .find(|s| s.bootname.as_deref() == Some(facts.booted.as_str()))
                    .map(|s| s.class.clone());
                slots
                    .iter()
                    .find(|s| {
                        Some(&s.class) == class.as_ref()
                            && s.bootname.is_some()
                            && s.bootname.as_deref() != Some(facts.booted.as_str())
                    })
                    .and_then(|s| s.bootname.clone())
                    .map(Bootname::from)
            });
            match to {
                Some(to) if to != facts.booted => Outcome::Installed {
                    from: facts.booted.clone(),
                    to,
                    boot_id: facts.boot_id.clone(),
                },
                Some(to) => Outcome::InstallRefused(format!(
                    "RAUC installed {label} but slot {to}, the booted one, is primary: check the slot configuration"
                )),
                None => Outcome::InstallRefused(format!(
                    "RAUC installed {label} but no other slot with a bootname was found: check system.conf"
                )),
            }
        }
        Err(cardeploy_rauc::Error::InstallFailed { code, last_error }) => {
            Outcome::InstallRefused(format!("RAUC refused {label} (code {code}): {last_error}"))
        }
        Err(e) => Outcome::InstallInterrupted(format!(
            "installing {label} was interrupted: {e}; it is started again"
        )),
    }
}

/// Why the car could not be rebooted.
#[derive(Debug, thiserror::Error)]
pub(super) enum RebootError {
    #[error("os.reboot_command is empty")]
    EmptyCommand,
    #[error(
        "reboot failed: {command} did not work and reboot(2) said {errno} (the agent needs CAP_SYS_BOOT)"
    )]
    Refused { command: String, errno: nix::Error },
    #[error("the reboot task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The init system reboots; if that fails, reboot(2).
pub(super) async fn reboot(config: &OsConfig) -> Result<(), RebootError> {
    if config.reboot_command.is_empty() {
        return Err(RebootError::EmptyCommand);
    }
    tracing::warn!(command = ?config.reboot_command, "rebooting");
    match run(&config.reboot_command, Duration::from_secs(60)).await {
        Ok(_) => return Ok(()),
        Err(e) => tracing::error!("{e}; calling reboot(2)"),
    }
    let direct = tokio::task::spawn_blocking(|| {
        nix::unistd::sync();
        nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
    })
    .await?;
    match direct {
        Err(errno) => Err(RebootError::Refused {
            command: config.reboot_command.join(" "),
            errno,
        }),
        Ok(never) => match never {},
    }
}

//! The health gate's checks: systemd units, a command, the twin reached, the k3s node. Each
//! check runs with a deadline; the verdict is pure (`super::policy::verdict`).

use std::time::Duration;

use super::host::Host;
use super::machine::Health;
use super::policy::{self, Check, K3sCheck, OsConfig};

/// Longest a single health-check program may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a program the OS driver ran did not succeed.
#[derive(Debug, thiserror::Error)]
pub(super) enum RunError {
    #[error("the command is empty")]
    Empty,
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not finish within {} s", limit.as_secs())]
    Timeout { program: String, limit: Duration },
    /// `stderr` is its last 200 characters.
    #[error("{command} exited with {status}{}{stderr}", if stderr.is_empty() { "" } else { ": " })]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Run a program within `limit`; its stdout when it exits 0.
pub(super) async fn run(argv: &[String], limit: Duration) -> Result<String, RunError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(RunError::Empty);
    };
    let out = tokio::time::timeout(
        limit,
        tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| RunError::Timeout {
        program: program.clone(),
        limit,
    })?
    .map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let tail_from = stderr.char_indices().rev().nth(199).map_or(0, |(at, _)| at);
    Err(RunError::Failed {
        command: argv.join(" "),
        status: out.status,
        stderr: stderr[tail_from..].to_owned(),
    })
}

async fn run_check(argv: &[String]) -> Result<String, RunError> {
    run(argv, CHECK_TIMEOUT).await
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// One round of every configured check.
pub(super) async fn check_health(host: &Host, config: &OsConfig) -> Health {
    let h = &config.health;
    let mut checks = Vec::new();
    for unit in &h.units {
        let argv = ["systemctl".to_owned(), "is-active".to_owned(), unit.clone()];
        checks.push(match run_check(&argv).await {
            Ok(_) => Check::Ok,
            Err(_) => Check::Missing(format!("unit {unit} is not active")),
        });
    }
    if !h.command.is_empty() {
        checks.push(match run_check(&h.command).await {
            Ok(_) => Check::Ok,
            Err(why) => Check::Missing(why.to_string()),
        });
    }
    checks.push(policy::twin_check(
        h.twin_grace_secs,
        host.twin_reached(),
        host.uptime_secs(),
    ));
    let k3s_present = on_path("k3s");
    match (h.k3s_node, k3s_present) {
        (K3sCheck::Off, _) | (K3sCheck::Auto, false) => {}
        (K3sCheck::Required, false) => {
            checks.push(Check::Missing("k3s is required but not installed".into()));
        }
        (_, true) => {
            let argv: Vec<String> = ["k3s", "kubectl", "get", "nodes", "--no-headers"]
                .map(String::from)
                .to_vec();
            checks.push(match run_check(&argv).await {
                Ok(out)
                    if !out.is_empty()
                        && out
                            .lines()
                            .all(|l| l.split_whitespace().nth(1) == Some("Ready")) =>
                {
                    Check::Ok
                }
                Ok(out) => Check::Missing(format!("k3s node not Ready: {out}")),
                Err(why) => Check::Missing(format!("k3s node: {why}")),
            });
        }
    }
    policy::verdict(&checks)
}

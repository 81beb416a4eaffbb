//! The health gate's checks: systemd units, a command, the twin reached, the k3s node. Each
//! check runs with a deadline; the verdict is pure (`super::policy::verdict`).

use std::time::Duration;

use super::host::Host;
use super::machine::Health;
use super::policy::{self, Check, K3sCheck, OsConfig};

/// Longest a single health-check program may run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Run a program; Ok when it exits 0, else what went wrong.
async fn run_check(argv: &[String]) -> Result<String, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".into());
    };
    let out = tokio::time::timeout(
        CHECK_TIMEOUT,
        tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        format!(
            "{program} did not finish within {} s",
            CHECK_TIMEOUT.as_secs()
        )
    })?
    .map_err(|e| format!("cannot run {program}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr
            .trim()
            .chars()
            .rev()
            .take(200)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        Err(format!(
            "{} exited with {}{}{tail}",
            argv.join(" "),
            out.status,
            if tail.is_empty() { "" } else { ": " }
        ))
    }
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
            Err(why) => Check::Missing(why),
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

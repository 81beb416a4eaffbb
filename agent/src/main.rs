use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// cardeploy-agent: the car-side daemon. Connects to the twin with the car's certificate, applies
/// desired state, reports, and reconnects on its own. Stops cleanly on SIGTERM.
///
/// `cardeploy car add` writes a ready configuration (agent.toml) for each car.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The agent's TOML configuration. Repeat it to layer files: later files override earlier
    /// ones key by key, e.g. the image's /etc/cardeploy/agent.toml, then the car's identity
    /// written at provisioning (/data/cardeploy/car.toml).
    #[arg(long, value_name = "FILE", default_value = "/etc/cardeploy/agent.toml")]
    config: Vec<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let config = match cardeploy_agent::Config::from_files(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("cardeploy-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cardeploy_agent::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardeploy-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            eprintln!("cardeploy-agent: cannot watch SIGTERM ({e}); Ctrl-C still works");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

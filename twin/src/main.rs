use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// cardeploy-twin: the digital twin server. Cars connect over RSocket with mutual TLS; operators
/// use the REST API with the token in <data>/operator.token.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve cars and operators until SIGTERM or Ctrl-C.
    ///
    /// First time: `cardeploy pki init --dir DATA/pki`, then `cardeploy-twin serve --data DATA`.
    Serve {
        /// Data directory: database, operator token, and by default the PKI in DATA/pki.
        #[arg(long, value_name = "DIR", required_unless_present = "config")]
        data: Option<PathBuf>,
        /// A TOML configuration file (see docs/architecture.md); flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Where cars connect [default: 0.0.0.0:7443].
        #[arg(long, value_name = "ADDR")]
        cars_listen: Option<SocketAddr>,
        /// Where the operator API listens [default: 127.0.0.1:7080].
        #[arg(long, value_name = "ADDR")]
        api_listen: Option<SocketAddr>,
        /// Heartbeat interval cars keep, seconds; a car silent for 3 is dropped [default: 10].
        #[arg(long, value_name = "SECS")]
        heartbeat_secs: Option<u64>,
        /// Development only: plain TCP and self-named cars. Never in production.
        #[arg(long)]
        insecure_plaintext: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let Command::Serve {
        data,
        config,
        cars_listen,
        api_listen,
        heartbeat_secs,
        insecure_plaintext,
    } = Cli::parse().command;
    let mut cfg = match (&config, &data) {
        (Some(path), _) => match cardeploy_twin::Config::from_file(path) {
            Ok(cfg) => cfg,
            Err(e) => return fail(&e),
        },
        (None, Some(dir)) => cardeploy_twin::Config::new(dir),
        (None, None) => unreachable!("clap requires --data or --config"),
    };
    if let Some(dir) = data {
        cfg.data_dir = dir;
    }
    if let Some(addr) = cars_listen {
        cfg.cars_listen = addr;
    }
    if let Some(addr) = api_listen {
        cfg.api_listen = addr;
    }
    if let Some(secs) = heartbeat_secs {
        cfg.heartbeat_secs = secs;
    }
    cfg.insecure_plaintext |= insecure_plaintext;
    if let Err(e) = cfg.validate(
        config
            .as_deref()
            .unwrap_or(std::path::Path::new("--heartbeat-secs")),
    ) {
        return fail(&e);
    }
    match cardeploy_twin::run(cfg, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &cardeploy_twin::Error) -> ExitCode {
    eprintln!("cardeploy-twin: {e}");
    ExitCode::FAILURE
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("cardeploy-twin: cannot watch SIGTERM ({e}); Ctrl-C still works");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

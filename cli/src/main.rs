//! `cardeploy`: the pipeline and operator tool. One module per subcommand.

mod api;
mod artifact;
mod car;
mod keys;
mod pki;
mod root;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// cardeploy: continuous deployment to cars.
///
/// Typical first run:
///   cardeploy pki init --dir data/pki
///   cardeploy-twin serve --data data &
///   cardeploy car add VIN0001 --attr model=tx7 --pki data/pki --out cars/VIN0001
///   cardeploy-agent --config cars/VIN0001/agent.toml &
///   cardeploy car set-desired VIN0001 --release infotainment@1.0.0
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The fleet's certificates: CA and twin.
    #[command(subcommand)]
    Pki(pki::Command),
    /// Cars: register, list, show, set desired state, inspect.
    #[command(subcommand)]
    Car(car::Command),
    /// Signing keys (ed25519) for the root, release and director roles.
    #[command(subcommand)]
    Keys(keys::Command),
    /// The root of trust: which keys sign for which role; init, rotate, verify.
    #[command(subcommand)]
    Root(root::Command),
    /// Artifacts: chunk a file and push only the chunks the twin lacks.
    #[command(subcommand)]
    Artifact(artifact::Command),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Pki(command) => pki::run(command),
        Command::Car(command) => car::run(command),
        Command::Artifact(command) => artifact::run(command),
        Command::Keys(command) => keys::run(command),
        Command::Root(command) => root::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardeploy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

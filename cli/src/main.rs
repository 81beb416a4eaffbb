//! `cardeploy`: the pipeline and operator tool. One module per subcommand.

mod api;
mod artifact;
mod car;
mod deploy;
mod files;
mod keys;
mod pki;
mod release;
mod root;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// cardeploy: continuous deployment to cars.
///
/// Typical first run:
///   cardeploy pki init --dir data/pki
///   cardeploy-twin serve --data data &
///   export CARDEPLOY_TOKEN_FILE=data/operator.token
///   cardeploy keys gen keys/root-1 && cardeploy keys gen keys/release
///   cardeploy root director --out keys/director.pub
///   cardeploy root init --root-key keys/root-1.pub --release-key keys/release.pub \
///     --director-key keys/director.pub --sign-with keys/root-1.key --out root.json
///   cardeploy root push root.json
///   cardeploy car add VIN0001 --attr model=tx7 --pki data/pki --out cars/VIN0001
///   cardeploy-agent --config cars/VIN0001/agent.toml &
///   cardeploy release create --line ecu-main --version 1.0.0 --os rootfs.raucb \
///     --image oci/infotainment --manifests k8s/ --out releases/1.0.0
///   cardeploy release sign releases/1.0.0 --key keys/release.key
///   cardeploy release push releases/1.0.0      (prints the release digest)
///   cardeploy car set-desired VIN0001 --release DIGEST
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
    /// Cars: register, list, show, events, set desired state, inspect, revoke.
    #[command(subcommand)]
    Car(car::Command),
    /// Signing keys (ed25519) for the root, release and director roles.
    #[command(subcommand)]
    Keys(keys::Command),
    /// The root of trust: which keys sign for which role; init, rotate, verify, push.
    #[command(subcommand)]
    Root(root::Command),
    /// Artifacts: chunk a file and push only the chunks the twin lacks.
    #[command(subcommand)]
    Artifact(artifact::Command),
    /// Releases: create from a RAUC bundle, OCI images and manifests; sign, verify, push.
    #[command(subcommand)]
    Release(release::Command),
    /// Fleet deployments: a release to the cars a selector picks, a canary then waves, halted
    /// by failures: create, preview, list, status, pause, resume, abort.
    #[command(subcommand)]
    Deploy(deploy::Command),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Pki(command) => pki::run(command),
        Command::Car(command) => car::run(command),
        Command::Artifact(command) => artifact::run(command),
        Command::Keys(command) => keys::run(command),
        Command::Root(command) => root::run(command),
        Command::Release(command) => release::run(command),
        Command::Deploy(command) => deploy::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cardeploy: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and each of its causes once. The workspace's errors name their cause in their own
/// message (`cannot create keys/x: No such file or directory`) and also return it as their
/// `source()`, so printing the chain as it is (`{:#}`) would say the same thing twice.
fn report(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn an_error_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = cardeploy_chunks::Error::Io {
            what: "cannot create",
            path: "keys/.1.0.tmp".into(),
            source: io,
        };
        let e = anyhow::Error::new(e).context("writing keys/root-1.key");
        assert_eq!(
            super::report(&e),
            "writing keys/root-1.key: cannot create keys/.1.0.tmp: No such file or directory"
        );
    }

    /// clap checks its definitions only when a command is parsed; this checks all of them (a
    /// flag name used twice, a missing value name) for every subcommand at once.
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

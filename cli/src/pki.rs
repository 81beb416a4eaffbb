use std::path::PathBuf;

use anyhow::Context;
use cardeploy_pki::{DEFAULT_TWIN_NAMES, FleetPki};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the fleet CA and the twin's server certificate.
    ///
    /// Writes ca.pem, ca.key (0600), twin.pem and twin.key (0600) into DIR, creating DIR (and
    /// missing parents, e.g. the twin's data directory) with mode 0700: the twin refuses to
    /// start with a key others can read. Keep ca.key offline in production: it is only needed
    /// to issue car certificates. Refuses to overwrite a CA.
    Init {
        /// Where to write the files, e.g. the twin's DATA/pki.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The fleet's name, shown in every certificate.
        #[arg(long, default_value = "cardeploy fleet")]
        fleet_name: String,
        /// DNS names and IP addresses cars use to reach the twin (repeat the flag). Defaults to
        /// localhost, 127.0.0.1, ::1 and 10.0.2.2 (the host as seen from a qemu guest).
        #[arg(long = "twin-name", value_name = "NAME")]
        twin_names: Vec<String>,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init {
            dir,
            fleet_name,
            twin_names,
        } => {
            let names: Vec<String> = if twin_names.is_empty() {
                DEFAULT_TWIN_NAMES.iter().map(|s| (*s).to_owned()).collect()
            } else {
                twin_names
            };
            let pki = FleetPki::generate(&fleet_name, &names).context("creating the fleet PKI")?;
            pki.write(&dir)?;
            println!("fleet CA and twin certificate written to {}", dir.display());
            println!("  twin names: {}", names.join(", "));
            println!(
                "next: cardeploy-twin serve --data <DATA> (with this directory as <DATA>/pki)"
            );
            Ok(())
        }
    }
}

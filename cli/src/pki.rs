use std::path::PathBuf;

use anyhow::Context;
use cardeploy_pki::{DEFAULT_TWIN_NAMES, FleetCa, FleetPki, write_file};
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
    /// Issue a new server certificate for the twin from the fleet CA: to rotate it before it
    /// expires or after its key leaked, or to add a name cars reach the twin by.
    ///
    /// Reads ca.pem and ca.key from DIR and writes twin.pem and twin.key (0600) into OUT
    /// (default DIR), keeping the ones it replaces as twin.pem.previous and
    /// twin.key.previous. Cars trust the CA, not one certificate: restart the twin (each
    /// instance in turn) and they reconnect with no change on their side.
    Twin {
        /// The PKI directory holding ca.pem and ca.key (made by `pki init`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Where to write twin.pem and twin.key; default DIR.
        #[arg(long, value_name = "OUT")]
        out: Option<PathBuf>,
        /// DNS names and IP addresses cars use to reach the twin (repeat the flag). Defaults to
        /// localhost, 127.0.0.1, ::1 and 10.0.2.2.
        #[arg(long = "twin-name", value_name = "NAME")]
        twin_names: Vec<String>,
    },
}

fn names_or_default(twin_names: Vec<String>) -> Vec<String> {
    if twin_names.is_empty() {
        DEFAULT_TWIN_NAMES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        twin_names
    }
}

/// Move `path` aside to `<path>.previous` when it exists.
fn keep_previous(path: &std::path::Path) -> anyhow::Result<()> {
    if path.exists() {
        let mut previous = path.as_os_str().to_owned();
        previous.push(".previous");
        std::fs::rename(path, &previous)
            .with_context(|| format!("cannot move {} aside", path.display()))?;
    }
    Ok(())
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init {
            dir,
            fleet_name,
            twin_names,
        } => {
            let names = names_or_default(twin_names);
            let pki = FleetPki::generate(&fleet_name, &names).context("creating the fleet PKI")?;
            pki.write(&dir)?;
            println!("fleet CA and twin certificate written to {}", dir.display());
            println!("  twin names: {}", names.join(", "));
            println!(
                "next: cardeploy-twin serve --data <DATA> (with this directory as <DATA>/pki)"
            );
            Ok(())
        }
        Command::Twin {
            dir,
            out,
            twin_names,
        } => {
            let names = names_or_default(twin_names);
            let ca = FleetCa::load(&dir.join("ca.pem"), &dir.join("ca.key"))
                .with_context(|| format!("reading the fleet CA in {}", dir.display()))?;
            let issued = ca
                .issue_twin(&names)
                .context("issuing the twin's certificate")?;
            let out = out.unwrap_or(dir);
            cardeploy_pki::create_private_dir(&out)?;
            let (cert, key) = (out.join("twin.pem"), out.join("twin.key"));
            keep_previous(&cert)?;
            keep_previous(&key)?;
            write_file(&key, &issued.key_pem, true)?;
            write_file(&cert, &issued.cert_pem, false)?;
            println!("twin certificate written to {}", cert.display());
            println!("  twin names: {}", names.join(", "));
            println!(
                "next: restart the twin (each instance in turn); cars reconnect with it, trusting the same CA"
            );
            Ok(())
        }
    }
}

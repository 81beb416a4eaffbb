//! `cardeploy keys`: ed25519 signing keys for the root, release and director roles.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cardeploy_release::{PublicKey, SigningKey};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate an ed25519 key pair: NAME.key (PKCS#8, mode 0600: keep it offline for the root
    /// and release roles) and NAME.pub (the public key, JSON, for `cardeploy root init`).
    Gen {
        /// Base name of the two files, e.g. keys/root-1.
        #[arg(value_name = "NAME")]
        name: PathBuf,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Gen { name } => {
            let (key_path, pub_path) = (with_ext(&name, "key"), with_ext(&name, "pub"));
            if key_path.exists() {
                bail!(
                    "{} exists: refusing to overwrite a private key (remove it first if you mean it)",
                    key_path.display()
                );
            }
            let key = SigningKey::generate()?;
            cardeploy_pki::write_file(&key_path, &hex(key.pkcs8()), true)?;
            let public = serde_json::to_string_pretty(&key.public())?;
            cardeploy_pki::write_file(&pub_path, &format!("{public}\n"), false)?;
            println!("{}", key.public().id());
            eprintln!(
                "wrote {} (private, 0600) and {}; the line above is the key id",
                key_path.display(),
                pub_path.display()
            );
            Ok(())
        }
    }
}

fn with_ext(name: &Path, ext: &str) -> PathBuf {
    let mut s = name.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn hex(bytes: &[u8]) -> String {
    let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.push('\n');
    s
}

/// Load a private key written by `keys gen`.
pub fn load_private(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the private key {}", path.display()))?;
    let text = text.trim();
    if text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "{} is not a key written by `cardeploy keys gen`",
            path.display()
        );
    }
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect();
    SigningKey::from_pkcs8(&bytes).with_context(|| format!("loading {}", path.display()))
}

/// Load a public key written by `keys gen` (`NAME.pub`).
pub fn load_public(path: &Path) -> anyhow::Result<PublicKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the public key {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a public key file", path.display()))
}

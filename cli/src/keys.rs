//! `cardeploy keys`: ed25519 signing keys for the root, release and director roles. The file
//! format is `cardeploy_release::key_file`'s.

use std::path::Path;

use anyhow::{Context, bail};
use cardeploy_release::{SigningKey, key_file};
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate an ed25519 key pair: NAME.key (PKCS#8, mode 0600: keep it offline for the root
    /// and release roles) and NAME.pub (the public key, JSON, for `cardeploy root init`).
    ///
    /// A missing directory for NAME is created with mode 0700: it holds a private key.
    Gen {
        /// Base name of the two files, e.g. keys/root-1.
        #[arg(value_name = "NAME")]
        name: std::path::PathBuf,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Gen { name } => {
            let (key_path, pub_path) = key_file::pair_paths(&name);
            if key_path.exists() {
                bail!(
                    "{} exists: refusing to overwrite a private key (remove it first if you mean it)",
                    key_path.display()
                );
            }
            create_parent(&key_path, 0o700)?;
            let key = SigningKey::generate()?;
            key_file::write_private(&key_path, &key)?;
            key_file::write_public(&pub_path, &key.public())?;
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

/// Create the missing directories above `file` with `mode` (the umask applies), so that the
/// first key or file of a new directory needs no `mkdir`. Existing directories keep their mode.
pub fn create_parent(file: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("creating the directory {}", dir.display()))
}

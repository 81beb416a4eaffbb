//! The twin's secrets on disk: the operator token (anyone who reads it is an operator), the
//! director key (signs what every car runs next) and the TLS key (is the twin to every car).
//! The twin refuses to start when one of them can be read or written by anyone but its owner,
//! rather than serve with a secret that may already be someone else's; and it creates its data
//! directory private.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::Error;

/// Whether a file mode lets group or others read, write or execute.
pub(crate) fn shared(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// Refuse `path` if it exists and is not private to its owner. A missing file is fine here:
/// whoever needs it says so (or makes it, with mode 0600).
pub(crate) fn check(path: &Path) -> Result<(), Error> {
    let mode = match std::fs::metadata(path) {
        Ok(meta) => meta.permissions().mode(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    if shared(mode) {
        return Err(Error::Config {
            path: path.to_owned(),
            why: format!(
                "mode {:04o} lets group or others read or write this secret; make it private with `chmod 600 {}` (and replace the secret if someone else may have read it)",
                mode & 0o7777,
                path.display()
            ),
        });
    }
    Ok(())
}

/// Create the data directory with mode 0700 (and any missing parents the same). One that exists
/// already is left as it is; if others can enter it, the log says so.
pub(crate) fn create_dir(path: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
    if let Ok(meta) = std::fs::metadata(path)
        && shared(meta.permissions().mode())
    {
        tracing::warn!(path = %path.display(), mode = format!("{:04o}", meta.permissions().mode() & 0o7777),
            "the data directory is open to group or others; `chmod 700` it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn only_modes_without_group_and_other_bits_are_private() {
        for private in [0o600, 0o400, 0o700, 0o100600] {
            assert!(!shared(private), "{private:o}");
        }
        for open in [0o640, 0o604, 0o644, 0o620, 0o602, 0o666, 0o610] {
            assert!(shared(open), "{open:o}");
        }
    }

    #[test]
    fn a_secret_readable_by_others_is_refused_with_the_file_its_mode_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("twin.key");
        check(&key).unwrap();
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let message = check(&key).unwrap_err().to_string();
        assert!(message.contains(&key.display().to_string()), "{message}");
        assert!(message.contains("0644"), "{message}");
        assert!(
            message.contains(&format!("chmod 600 {}", key.display())),
            "{message}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        check(&key).unwrap();
    }

    #[test]
    fn the_data_directory_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/b");
        create_dir(&data).unwrap();
        for d in [dir.path().join("a"), data] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", d.display());
        }
    }
}

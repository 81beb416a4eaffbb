//! The key files, read and written in one place: `NAME.pub` holds a public key as a root
//! document names it (`{"ed25519": "<64 hex>"}`, pretty JSON and a newline); `NAME.key` holds the
//! private key as hex of its PKCS#8 v2 document and a newline, mode 0600. `cardeploy keys gen`,
//! `cardeploy root director` and the twin's director key all use these files.
//!
//! Reading a public key is verification-side and always compiled; reading a private key and
//! writing either needs feature `sign`. Writes are atomic (`cardeploy_chunks::atomic`): a key
//! file is never half written, and a private one never readable by others.

use std::path::{Path, PathBuf};

use crate::{Error, PublicKey};

fn unreadable(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::KeyFileRead {
        path: path.to_owned(),
        source,
    }
}

fn malformed(path: &Path, why: impl Into<String>) -> Error {
    Error::KeyFile {
        path: path.to_owned(),
        why: why.into(),
    }
}

/// The public key in `path` (a `NAME.pub`).
pub fn read_public(path: &Path) -> Result<PublicKey, Error> {
    let text = std::fs::read_to_string(path).map_err(unreadable(path))?;
    decode_public(&text).map_err(|why| malformed(path, why))
}

/// The public key a `NAME.pub` text holds, or why it holds none.
fn decode_public(text: &str) -> Result<PublicKey, String> {
    serde_json::from_str(text).map_err(|e| format!("not a public key file ({e})"))
}

/// The text of a `NAME.pub`: what serde_json's pretty printer makes of the key, written out
/// so that there is no failure path to handle.
pub fn encode_public(key: &PublicKey) -> String {
    format!(
        "{{\n  \"ed25519\": \"{}\"\n}}\n",
        crate::hex::encode(key.bytes())
    )
}

#[cfg(feature = "sign")]
pub use sign::*;

#[cfg(feature = "sign")]
mod sign {
    use cardeploy_chunks::atomic;

    use super::*;
    use crate::SigningKey;

    /// Write `key` to `path` as a `NAME.pub` (mode 0644). The directory must exist.
    pub fn write_public(path: &Path, key: &PublicKey) -> Result<(), Error> {
        atomic::write(path, encode_public(key).as_bytes(), atomic::PUBLIC)
            .map_err(|source| written(path, source))
    }

    /// The private key in `path` (a `NAME.key`).
    pub fn read_private(path: &Path) -> Result<SigningKey, Error> {
        let text = std::fs::read_to_string(path).map_err(unreadable(path))?;
        decode_private(&text).map_err(|why| malformed(path, why))
    }

    /// The private key a `NAME.key` text holds, or why it holds none.
    fn decode_private(text: &str) -> Result<SigningKey, String> {
        let pkcs8 = crate::hex::decode(text.trim())
            .ok_or("not hex (a private key file holds the hex of a PKCS#8 document)")?;
        SigningKey::from_pkcs8(&pkcs8).map_err(|e| e.to_string())
    }

    /// The text of a `NAME.key`.
    pub fn encode_private(key: &SigningKey) -> String {
        format!("{}\n", crate::hex::encode(key.pkcs8()))
    }

    /// Write `key` to `path` as a `NAME.key`, created with mode 0600. The directory must exist;
    /// whether an existing key may be replaced is the caller's decision.
    pub fn write_private(path: &Path, key: &SigningKey) -> Result<(), Error> {
        atomic::write(path, encode_private(key).as_bytes(), atomic::PRIVATE)
            .map_err(|source| written(path, source))
    }

    fn written(path: &Path, source: cardeploy_chunks::Error) -> Error {
        Error::KeyFileWrite {
            path: path.to_owned(),
            source: Box::new(source),
        }
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]

        use std::os::unix::fs::PermissionsExt;

        use super::*;

        #[test]
        fn a_key_pair_written_reads_back_the_same_and_the_private_half_is_0600() {
            let dir = tempfile::tempdir().unwrap();
            let key = SigningKey::generate().unwrap();
            let (private, public) = (dir.path().join("k.key"), dir.path().join("k.pub"));
            write_private(&private, &key).unwrap();
            write_public(&public, &key.public()).unwrap();
            assert_eq!(read_private(&private).unwrap().public(), key.public());
            assert_eq!(read_public(&public).unwrap(), key.public());
            let pretty = serde_json::to_string_pretty(&key.public()).unwrap();
            assert_eq!(encode_public(&key.public()), format!("{pretty}\n"));
            let mode = std::fs::metadata(&private).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        #[test]
        fn a_file_that_is_not_a_key_is_refused_with_its_path() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("k.key");
            std::fs::write(&path, "not hex\n").unwrap();
            let err = read_private(&path).unwrap_err();
            assert!(
                matches!(&err, Error::KeyFile { path: p, .. } if p == &path),
                "{err}"
            );
            let err = read_public(&path).unwrap_err();
            assert!(
                matches!(&err, Error::KeyFile { path: p, .. } if p == &path),
                "{err}"
            );
            let missing = dir.path().join("none.pub");
            let err = read_public(&missing).unwrap_err();
            assert!(
                matches!(&err, Error::KeyFileRead { path: p, .. } if p == &missing),
                "{err}"
            );
        }
    }
}

/// `NAME.key` and `NAME.pub` for a key named `NAME` (e.g. `keys/root-1`).
pub fn pair_paths(name: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut s = name.as_os_str().to_owned();
        s.push(".");
        s.push(ext);
        PathBuf::from(s)
    };
    (with("key"), with("pub"))
}

//! The fleet's X.509 identities: one fleet CA, a server certificate for the twin and one client
//! certificate per car, all ECDSA P-256 made with rcgen (ring). Used by the `cardeploy` CLI and by
//! tests; never compiled into the agent (the agent only loads PEM files).
//!
//! Files written by [`FleetPki::write`] are the layout `cardeploy pki init` documents:
//! `ca.pem`, `ca.key` (0600), `twin.pem`, `twin.key` (0600), in a directory it creates with mode
//! 0700 (with any missing parent: usually the twin's data directory).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not generate {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable {what}: {source}")]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "{path} already exists: refusing to overwrite a fleet CA (every car certificate depends on it); \
         choose another directory or remove it deliberately"
    )]
    Exists { path: PathBuf },
    #[error("invalid name {name:?} for a certificate: {why}")]
    Name { name: String, why: &'static str },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print private keys, even in debug output.
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The fleet CA: signs the twin's and every car's certificate.
pub struct FleetCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").finish_non_exhaustive()
    }
}

/// Names the twin's certificate carries when none are given: local development and the address
/// a qemu guest uses for its host with user networking.
pub const DEFAULT_TWIN_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1", "10.0.2.2"];

fn validity(years: u64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::from(SystemTime::now());
    // An hour of slack for cars whose clock is a little behind at first boot.
    let start = now - Duration::from_secs(3600);
    let end = now + Duration::from_secs(years * 365 * 24 * 3600);
    (start, end)
}

fn generate(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |source| Error::Generate {
        what: what.to_owned(),
        source,
    }
}

impl FleetCa {
    /// A new CA named `name`, valid for 20 years.
    pub fn generate(name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(generate("the fleet CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "cardeploy fleet");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.not_before, params.not_after) = validity(20);
        let cert = params
            .self_signed(&key)
            .map_err(generate("the fleet CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Load a CA written by [`FleetPki::write`].
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, Error> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| Error::Parse {
            path: key_path.to_owned(),
            what: "private key",
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| Error::Parse {
            path: cert_path.to_owned(),
            what: "CA certificate",
            source,
        })?;
        Ok(Self { cert_pem, issuer })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The twin's server certificate for the given DNS names and IP addresses.
    pub fn issue_twin(&self, names: &[String]) -> Result<Issued, Error> {
        let mut sans = Vec::new();
        for name in names {
            if let Ok(ip) = name.parse::<IpAddr>() {
                sans.push(SanType::IpAddress(ip));
            } else {
                let dns = name.clone().try_into().map_err(|_| Error::Name {
                    name: name.clone(),
                    why: "not an IP address nor a DNS name",
                })?;
                sans.push(SanType::DnsName(dns));
            }
        }
        self.issue(
            "cardeploy twin",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            5,
        )
    }

    /// A car's client certificate. The car id is its common name; the twin identifies the car by
    /// the certificate's fingerprint, registered with `cardeploy car add`.
    pub fn issue_car(&self, car_id: &str) -> Result<Issued, Error> {
        if car_id.is_empty() || car_id.len() > 64 {
            return Err(Error::Name {
                name: car_id.to_owned(),
                why: "a car id has 1-64 characters",
            });
        }
        self.issue(car_id, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth, 10)
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        years: u64,
    ) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(generate(common_name))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(years);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate(common_name))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh fleet PKI: the CA and the twin's certificate.
#[derive(Debug)]
pub struct FleetPki {
    pub ca: FleetCa,
    pub twin: Issued,
}

impl FleetPki {
    pub fn generate(fleet_name: &str, twin_names: &[String]) -> Result<Self, Error> {
        let ca = FleetCa::generate(fleet_name)?;
        let twin = ca.issue_twin(twin_names)?;
        Ok(Self { ca, twin })
    }

    /// Write `ca.pem`, `ca.key`, `twin.pem`, `twin.key` into `dir`; refuses to overwrite a CA.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let ca_key = dir.join("ca.key");
        if ca_key.exists() {
            return Err(Error::Exists { path: ca_key });
        }
        create_private_dir(dir)?;
        write_file(&dir.join("ca.pem"), &self.ca.cert_pem, false)?;
        write_file(&ca_key, &self.ca.issuer.key().serialize_pem(), true)?;
        write_file(&dir.join("twin.pem"), &self.twin.cert_pem, false)?;
        write_file(&dir.join("twin.key"), &self.twin.key_pem, true)?;
        Ok(())
    }
}

/// Create `dir` and its missing parents with mode 0700: the usual place is the twin's data
/// directory (`DATA/pki`), which holds its secrets and which the twin wants private.
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Write a file; private keys are created with mode 0600 so they are never readable by others,
/// not even for a moment.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_ca_loads_back_and_keeps_issuing() {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            FleetPki::generate("test fleet", &["localhost".into(), "127.0.0.1".into()]).unwrap();
        pki.write(dir.path()).unwrap();
        let ca = FleetCa::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).unwrap();
        assert_eq!(ca.cert_pem(), pki.ca.cert_pem());
        let car = ca.issue_car("VIN0001").unwrap();
        assert!(car.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(car.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn an_existing_ca_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let pki = FleetPki::generate("f", &["localhost".into()]).unwrap();
        pki.write(dir.path()).unwrap();
        let again = FleetPki::generate("f", &["localhost".into()]).unwrap();
        assert!(matches!(again.write(dir.path()), Err(Error::Exists { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_and_the_directories_made_for_them_are_only_open_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        FleetPki::generate("f", &["localhost".into()])
            .unwrap()
            .write(dir.path())
            .unwrap();
        let data = dir.path().join("data");
        FleetPki::generate("f", &["localhost".into()])
            .unwrap()
            .write(&data.join("pki"))
            .unwrap();
        for created in [&data, &data.join("pki")] {
            let mode = fs::metadata(created).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", created.display());
        }
        for key in ["ca.key", "twin.key"] {
            let mode = fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
}

use std::path::{Path, PathBuf};

use cardeploy_protocol::CarId;
use serde::Deserialize;

use crate::Error;

/// `cardeploy-agent` configuration (TOML), e.g. as written by `cardeploy car add`:
///
/// ```toml
/// car_id = "WVW0000000001"
/// twin = "twin.example.com:7443"
/// ca = "/etc/cardeploy/ca.pem"
/// cert = "/etc/cardeploy/car.pem"
/// key = "/etc/cardeploy/car.key"
/// state_dir = "/var/lib/cardeploy"
/// root = "/etc/cardeploy/root.json"
/// compatible = "cardeploy-qemuarm64"
/// ```
///
/// Relative paths are relative to the configuration file's directory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub car_id: CarId,
    /// `host:port` of the twin's car endpoint; the host must be a name in the twin's certificate.
    pub twin: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Persistent state (survives restarts and reboots).
    pub state_dir: PathBuf,
    /// The root of trust pinned at installation (`cardeploy root init`; the image carries it,
    /// read-only). Every release and desired state is verified against it and the rotations
    /// the twin sends (docs/release-format.md).
    pub root: PathBuf,
    /// This hardware's RAUC `compatible`: releases for other hardware are refused (M4). With
    /// `[os]` it is read from RAUC and may be left out (if given, it must match RAUC's).
    #[serde(default)]
    pub compatible: Option<String>,
    /// OS updates through RAUC (docs/state-machines.md). Without it, an OS bundle is fetched
    /// and verified but not installed.
    #[serde(default)]
    pub os: Option<crate::os::OsConfig>,
    /// Containers: the car's registry (crates/registry) serving the images of the release on
    /// the car. Without it, OCI artifacts are fetched and verified but not served.
    #[serde(default)]
    pub containers: Option<crate::containers::ContainersConfig>,
    /// Where the car is (gpsd or a file), reported rounded for deployments with a geofence.
    #[serde(default)]
    pub position: Option<crate::position::PositionConfig>,
    /// Heartbeat interval until the twin says otherwise, seconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// First reconnect delay ceiling, milliseconds; doubles per failure (full jitter).
    #[serde(default = "default_reconnect_base")]
    pub reconnect_base_ms: u64,
    /// Largest reconnect delay ceiling, seconds.
    #[serde(default = "default_reconnect_cap")]
    pub reconnect_cap_secs: u64,
    /// Deadline of each request to the twin, seconds.
    #[serde(default = "default_deadline")]
    pub request_deadline_secs: u64,
    /// Development only: plain TCP, no certificates.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Files or block devices the agent may read as seeds: data it already has, e.g. the
    /// running rootfs slot (`/dev/disk/by-partlabel/rootfs-a`). Read-only, never written.
    #[serde(default)]
    pub seeds: Vec<PathBuf>,
    /// Most chunks per `artifact.chunks` window.
    #[serde(default = "default_window_chunks")]
    pub window_chunks: usize,
    /// Most raw bytes per window; with the largest delta reference this bounds the agent's
    /// memory during a download.
    #[serde(default = "default_window_bytes")]
    pub window_bytes: u64,
    /// Ask for the next window while the current one is written (two windows in flight): hides
    /// the round trip and the twin's work. An interruption then costs up to two windows instead of
    /// one.
    #[serde(default = "default_prefetch")]
    pub prefetch: bool,
    /// Deadline of one window, seconds: a window must arrive whole within it (size windows to
    /// the slowest link the car is expected to see).
    #[serde(default = "default_window_deadline")]
    pub window_deadline_secs: u64,
    /// Largest artifact the agent accepts an index for, bytes.
    #[serde(default = "default_max_artifact")]
    pub max_artifact_bytes: u64,
}

fn default_window_chunks() -> usize {
    16
}
fn default_window_bytes() -> u64 {
    4 << 20
}
fn default_prefetch() -> bool {
    true
}
fn default_window_deadline() -> u64 {
    120
}
fn default_max_artifact() -> u64 {
    16 << 30
}

fn default_heartbeat() -> u64 {
    10
}
fn default_reconnect_base() -> u64 {
    500
}
fn default_reconnect_cap() -> u64 {
    60
}
fn default_deadline() -> u64 {
    15
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        Self::from_files(std::slice::from_ref(&path.to_path_buf()))
    }

    /// Reads several files as one configuration, later files overriding earlier ones key by key
    /// (tables merge, any other value replaces). An image ships the settings every car shares and
    /// provisioning adds the car's identity in a second file, so neither is rewritten on the car.
    /// A relative path is relative to the file that names it.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self, Error> {
        let Some(last) = paths.last() else {
            return Err(Error::Config {
                path: PathBuf::new(),
                why: "no configuration file given".to_owned(),
            });
        };
        let mut merged = toml::Table::new();
        for path in paths {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let mut table: toml::Table = toml::from_str(&text).map_err(|e| Error::Config {
                path: path.clone(),
                why: e.to_string(),
            })?;
            absolutize(&mut table, path.parent().unwrap_or(Path::new(".")));
            merge(&mut merged, table);
        }
        // Errors about the whole (a missing key, a wrong type) name every file that contributed.
        let named = || {
            if paths.len() == 1 {
                last.clone()
            } else {
                let all: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                PathBuf::from(all.join(" + "))
            }
        };
        let config: Self =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config {
                    path: named(),
                    why: e.to_string(),
                })?;
        config.validate(&named())?;
        Ok(config)
    }

    pub fn validate(&self, path: &Path) -> Result<(), Error> {
        let bad = |why: String| Error::Config {
            path: path.to_owned(),
            why,
        };
        if !(1..=3600).contains(&self.heartbeat_secs) {
            return Err(bad(format!(
                "heartbeat_secs = {} is out of range 1..=3600",
                self.heartbeat_secs
            )));
        }
        if self.reconnect_base_ms == 0 || self.reconnect_cap_secs == 0 {
            return Err(bad(
                "reconnect_base_ms and reconnect_cap_secs must be above 0".into(),
            ));
        }
        if self.window_chunks == 0 || self.window_chunks > cardeploy_protocol::MAX_WINDOW_CHUNKS {
            return Err(bad(format!(
                "window_chunks = {} is out of range 1..={}",
                self.window_chunks,
                cardeploy_protocol::MAX_WINDOW_CHUNKS
            )));
        }
        if self.window_bytes < 1 << 20 || self.window_bytes > cardeploy_protocol::MAX_WINDOW_BYTES {
            return Err(bad(format!(
                "window_bytes = {} is out of range 1 MiB..={} (a window must hold the largest chunk)",
                self.window_bytes,
                cardeploy_protocol::MAX_WINDOW_BYTES
            )));
        }
        if self.request_deadline_secs == 0 {
            return Err(bad("request_deadline_secs must be above 0".into()));
        }
        match (&self.compatible, &self.os) {
            (None, None) => {
                return Err(bad(
                    "compatible is missing: give this hardware's RAUC compatible, or add [os] to read it from RAUC".into(),
                ));
            }
            (_, Some(os)) => os.validate().map_err(|e| bad(e.to_string()))?,
            _ => {}
        }
        if let Some(position) = &self.position {
            position.validate().map_err(bad)?;
        }
        if !self.twin.contains(':') {
            return Err(bad(format!(
                "twin = {:?}: expected host:port, e.g. twin.example.com:7443",
                self.twin
            )));
        }
        Ok(())
    }
}

/// The keys that hold paths, top level and under `[os]`: made absolute against the directory of
/// the file that sets them, before files are merged.
const PATH_KEYS: &[&str] = &["ca", "cert", "key", "state_dir", "root"];
const OS_PATH_KEYS: &[&str] = &["boot_id_file"];

fn absolutize(table: &mut toml::Table, base: &Path) {
    let fix = |value: &mut toml::Value| {
        if let toml::Value::String(s) = value
            && Path::new(s.as_str()).is_relative()
        {
            *s = base.join(s.as_str()).display().to_string();
        }
    };
    for key in PATH_KEYS {
        if let Some(value) = table.get_mut(*key) {
            fix(value);
        }
    }
    if let Some(toml::Value::Array(seeds)) = table.get_mut("seeds") {
        seeds.iter_mut().for_each(fix);
    }
    if let Some(toml::Value::Table(os)) = table.get_mut("os") {
        for key in OS_PATH_KEYS {
            if let Some(value) = os.get_mut(*key) {
                fix(value);
            }
        }
    }
    if let Some(toml::Value::Table(position)) = table.get_mut("position")
        && let Some(value) = position.get_mut("file")
    {
        fix(value);
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(old)), toml::Value::Table(new)) => merge(old, new),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_car_file_layered_on_the_image_file_makes_one_configuration() {
        let tmp = tempfile::tempdir().unwrap();
        let (etc, data) = (tmp.path().join("etc"), tmp.path().join("data"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let image = write(
            &etc,
            "agent.toml",
            "twin = \"twin.example:7443\"\nca = \"fleet-ca.pem\"\nroot = \"/etc/cardeploy/root.json\"\n\
             state_dir = \"/data/cardeploy/state\"\nheartbeat_secs = 10\n\
             [os.health]\ndeadline_secs = 300\nunits = [\"k3s.service\"]\n",
        );
        let car = write(
            &data,
            "car.toml",
            "car_id = \"VIN0001\"\ncert = \"car.pem\"\nkey = \"car.key\"\nheartbeat_secs = 5\n\
             [os.health]\ndeadline_secs = 200\n",
        );
        let config = Config::from_files(&[image, car]).unwrap();
        assert_eq!(config.car_id.as_str(), "VIN0001");
        // Each relative path is relative to the file that names it.
        assert_eq!(config.ca, etc.join("fleet-ca.pem"));
        assert_eq!(config.cert, data.join("car.pem"));
        assert_eq!(config.key, data.join("car.key"));
        assert_eq!(config.root, PathBuf::from("/etc/cardeploy/root.json"));
        // The later file wins key by key; tables merge instead of replacing each other.
        assert_eq!(config.heartbeat_secs, 5);
        let health = &config.os.as_ref().unwrap().health;
        assert_eq!(health.deadline_secs, 200);
        assert_eq!(health.units, vec!["k3s.service".to_owned()]);
    }

    #[test]
    fn a_key_missing_from_every_layer_names_all_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let image = write(
            tmp.path(),
            "agent.toml",
            "twin = \"t:1\"\nca = \"a\"\nroot = \"r\"\nstate_dir = \"s\"\n",
        );
        let car = write(tmp.path(), "car.toml", "cert = \"c\"\nkey = \"k\"\n");
        let err = Config::from_files(&[image.clone(), car.clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("car_id"), "{err}");
        assert!(err.contains(&image.display().to_string()), "{err}");
        assert!(err.contains(&car.display().to_string()), "{err}");
    }

    #[test]
    fn a_missing_layer_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("car.toml");
        let err = Config::from_files(std::slice::from_ref(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}

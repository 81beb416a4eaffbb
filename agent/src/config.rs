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
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(os) = &mut config.os
            && os.boot_id_file.is_relative()
        {
            os.boot_id_file = base.join(&os.boot_id_file);
        }
        for p in [
            &mut config.ca,
            &mut config.cert,
            &mut config.key,
            &mut config.state_dir,
            &mut config.root,
        ]
        .into_iter()
        .chain(config.seeds.iter_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.validate(path)?;
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
            (_, Some(os)) => os.validate().map_err(bad)?,
            _ => {}
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

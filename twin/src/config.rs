use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

/// `cardeploy-twin` configuration (TOML). Every path and address can be overridden so that tests
/// run the real server against temp dirs and port 0.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Database, operator token and (by default) the PKI live here.
    pub data_dir: PathBuf,
    /// Where cars connect (RSocket over mutual TLS).
    #[serde(default = "default_cars_listen")]
    pub cars_listen: SocketAddr,
    /// The operator REST API.
    #[serde(default = "default_api_listen")]
    pub api_listen: SocketAddr,
    /// Fleet CA certificate; default `<data_dir>/pki/ca.pem`.
    pub ca: Option<PathBuf>,
    /// The twin's certificate; default `<data_dir>/pki/twin.pem`.
    pub cert: Option<PathBuf>,
    /// The twin's key; default `<data_dir>/pki/twin.key`.
    pub key: Option<PathBuf>,
    /// Heartbeat interval cars are told to keep, seconds. A car silent for 3 is dropped.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// Development only: plain TCP, cars name themselves. Never in production.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Largest artifact an uploaded chunk index may describe, bytes.
    #[serde(default = "default_max_artifact")]
    pub max_artifact_bytes: u64,
    /// zstd level of deltas made for cars (made once per chunk and base, then cached).
    #[serde(default = "default_delta_level")]
    pub delta_level: i32,
    /// How long a signed desired state stays valid, seconds (freeze protection: a car refuses
    /// an expired one). The twin signs a fresh one when a car says hello with less than half
    /// of it left.
    #[serde(default = "default_desired_ttl")]
    pub desired_ttl_secs: u64,
    /// Requests one car may have open at once (request-response and request-stream); more are
    /// refused with RSocket ERROR `REJECTED`.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_car: usize,
    /// Answer bytes queued for one car and not yet taken by it; answers wait for room beyond.
    #[serde(default = "default_max_queued")]
    pub max_queued_bytes_per_car: usize,
    /// A car that takes no bytes for this long while the twin has some for it is dropped, seconds.
    #[serde(default = "default_send_stall")]
    pub send_stall_secs: u64,
    /// Threads that make deltas; each car has at most one delta job in flight.
    #[serde(default = "default_delta_workers")]
    pub delta_workers: usize,
    /// Size cap of the delta cache, bytes; least recently used (target, base) pairs go first.
    #[serde(default = "default_delta_cache")]
    pub delta_cache_bytes: u64,
}

fn default_max_streams() -> usize {
    cardeploy_link::Limits::default().max_streams
}

fn default_max_queued() -> usize {
    cardeploy_link::Limits::default().max_queued
}

fn default_send_stall() -> u64 {
    cardeploy_link::Limits::default().send_stall.as_secs()
}

fn default_delta_workers() -> usize {
    // Leave a core to the cars' connections and the API.
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn default_delta_cache() -> u64 {
    4 << 30
}

fn default_desired_ttl() -> u64 {
    86_400
}

fn default_max_artifact() -> u64 {
    16 << 30
}

fn default_delta_level() -> i32 {
    19
}

fn default_cars_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7080))
}

fn default_heartbeat() -> u64 {
    10
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            cars_listen: default_cars_listen(),
            api_listen: default_api_listen(),
            ca: None,
            cert: None,
            key: None,
            heartbeat_secs: default_heartbeat(),
            insecure_plaintext: false,
            max_artifact_bytes: default_max_artifact(),
            delta_level: default_delta_level(),
            desired_ttl_secs: default_desired_ttl(),
            max_streams_per_car: default_max_streams(),
            max_queued_bytes_per_car: default_max_queued(),
            send_stall_secs: default_send_stall(),
            delta_workers: default_delta_workers(),
            delta_cache_bytes: default_delta_cache(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn validate(&self, path: &Path) -> Result<(), Error> {
        if self.heartbeat_secs == 0 || self.heartbeat_secs > 3600 {
            return Err(Error::Config {
                path: path.to_owned(),
                why: format!(
                    "heartbeat_secs = {} is out of range; use 1..=3600",
                    self.heartbeat_secs
                ),
            });
        }
        if self.max_streams_per_car < 2 || self.delta_workers == 0 || self.send_stall_secs == 0 {
            return Err(Error::Config {
                path: path.to_owned(),
                why: format!(
                    "max_streams_per_car = {} (at least 2: a car holds car.desired open while it asks for more), delta_workers = {} and send_stall_secs = {} (at least 1)",
                    self.max_streams_per_car, self.delta_workers, self.send_stall_secs
                ),
            });
        }
        if self.desired_ttl_secs < 60 {
            return Err(Error::Config {
                path: path.to_owned(),
                why: format!(
                    "desired_ttl_secs = {} is too short for a car to act on; use at least 60",
                    self.desired_ttl_secs
                ),
            });
        }
        Ok(())
    }

    pub fn ca_path(&self) -> PathBuf {
        self.ca
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pki/ca.pem"))
    }

    pub fn cert_path(&self) -> PathBuf {
        self.cert
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pki/twin.pem"))
    }

    pub fn key_path(&self) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pki/twin.key"))
    }

    /// The chunk store and its indexes.
    pub fn chunks_path(&self) -> PathBuf {
        self.data_dir.join("chunks")
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("twin.db")
    }

    pub fn token_path(&self) -> PathBuf {
        self.data_dir.join("operator.token")
    }
}

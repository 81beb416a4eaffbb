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
    /// PostgreSQL instead of the embedded SQLite (`<data_dir>/twin.db`):
    /// `postgres://user:password@host:5432/database`, for several twin instances sharing one
    /// database (docs/operations.md). The database must exist; the twin creates its tables.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Connections the twin keeps to PostgreSQL (SQLite uses its own, fixed number).
    #[serde(default = "default_database_connections")]
    pub database_connections: u32,
    /// The chunk store, its indexes and the delta cache in S3-compatible object storage instead
    /// of `<data_dir>/chunks` (docs/operations.md).
    #[serde(default)]
    pub object_store: Option<ObjectStoreConfig>,
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

    /// Bytes of one event message kept; a longer one is cut, with a marker saying so.
    #[serde(default = "default_event_message_bytes")]
    pub event_message_max_bytes: usize,
    /// Characters of one event kind kept.
    #[serde(default = "default_event_kind_chars")]
    pub event_kind_max_chars: usize,
    /// Events kept per car; the oldest go first.
    #[serde(default = "default_events_per_car")]
    pub events_per_car: u32,
    /// Events older than this are removed by a periodic sweep, seconds.
    #[serde(default = "default_event_max_age")]
    pub event_max_age_secs: u64,
    /// How often that sweep runs, seconds.
    #[serde(default = "default_hourly")]
    pub event_sweep_secs: u64,
    /// `car.report` messages one car may send per second, on average. Over the rate (after
    /// the burst) a report is dropped and counted.
    #[serde(default = "default_report_rate")]
    pub report_rate_per_sec: f64,
    /// Reports one car may send at once before the rate applies.
    #[serde(default = "default_report_burst")]
    pub report_burst: u32,

    /// The operator API closes a connection that has not sent a request's headers within this
    /// many seconds (idle keep-alive connections included).
    #[serde(default = "default_header_timeout")]
    pub api_header_timeout_secs: u64,
    /// A request body must arrive within this many seconds, or the answer is 408.
    #[serde(default = "default_body_timeout")]
    pub api_body_timeout_secs: u64,
    /// Chunk and index uploads served at once; more are answered 429 with `Retry-After`.
    #[serde(default = "default_max_uploads")]
    pub max_concurrent_uploads: usize,

    /// How often unreferenced chunks and indexes are collected, seconds.
    #[serde(default = "default_hourly")]
    pub gc_interval_secs: u64,
    /// Chunks and indexes younger than this are never collected, seconds: an upload in
    /// progress has stored chunks that no index names yet.
    #[serde(default = "default_gc_grace")]
    pub gc_grace_secs: u64,
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

fn default_event_message_bytes() -> usize {
    4096
}

fn default_event_kind_chars() -> usize {
    64
}

fn default_events_per_car() -> u32 {
    1000
}

fn default_event_max_age() -> u64 {
    30 * 86_400
}

fn default_hourly() -> u64 {
    3600
}

fn default_report_rate() -> f64 {
    5.0
}

fn default_report_burst() -> u32 {
    60
}

fn default_header_timeout() -> u64 {
    30
}

fn default_body_timeout() -> u64 {
    60
}

fn default_max_uploads() -> usize {
    16
}

fn default_gc_grace() -> u64 {
    86_400
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

/// `[object_store]`: an S3-compatible bucket for the chunk store.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreConfig {
    /// `s3://bucket` or `s3://bucket/prefix` (keys go under the prefix).
    pub url: String,
    /// An S3-compatible server's URL; none: Amazon S3 itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region; none: `AWS_DEFAULT_REGION` or `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Credentials; none: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` from the environment.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Allow an `http://` endpoint (a server on a private network or loopback).
    #[serde(default)]
    pub allow_http: bool,
}

impl std::fmt::Debug for ObjectStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("ObjectStoreConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreConfig {
    /// The bucket and the key prefix (possibly empty) of `url`.
    pub fn bucket_and_prefix(&self) -> Result<(String, String), String> {
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| {
            format!(
                "object_store.url = {:?}: use s3://bucket or s3://bucket/prefix",
                self.url
            )
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("object_store.url = {:?} names no bucket", self.url));
        }
        Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
    }
}

fn default_database_connections() -> u32 {
    16
}

fn default_heartbeat() -> u64 {
    10
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database_url: None,
            object_store: None,
            database_connections: default_database_connections(),
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
            event_message_max_bytes: default_event_message_bytes(),
            event_kind_max_chars: default_event_kind_chars(),
            events_per_car: default_events_per_car(),
            event_max_age_secs: default_event_max_age(),
            event_sweep_secs: default_hourly(),
            report_rate_per_sec: default_report_rate(),
            report_burst: default_report_burst(),
            api_header_timeout_secs: default_header_timeout(),
            api_body_timeout_secs: default_body_timeout(),
            max_concurrent_uploads: default_max_uploads(),
            gc_interval_secs: default_hourly(),
            gc_grace_secs: default_gc_grace(),
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
        let bad = |why: String| {
            Err(Error::Config {
                path: path.to_owned(),
                why,
            })
        };
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return bad(
                "database_url must be a postgres:// URL (leave it out for the embedded SQLite in data_dir)"
                    .into(),
            );
        }
        if let Some(objects) = &self.object_store {
            if let Err(why) = objects.bucket_and_prefix() {
                return bad(why);
            }
            if objects
                .endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
                && !objects.allow_http
            {
                return bad(format!(
                    "object_store.endpoint = {:?} is plain HTTP: set allow_http = true if that is meant (a server on a private network)",
                    objects.endpoint.as_deref().unwrap_or_default()
                ));
            }
        }
        if !(2..=1000).contains(&self.database_connections) {
            return bad(format!(
                "database_connections = {} is out of range; use 2..=1000",
                self.database_connections
            ));
        }
        if self.heartbeat_secs == 0 || self.heartbeat_secs > 3600 {
            return bad(format!(
                "heartbeat_secs = {} is out of range; use 1..=3600",
                self.heartbeat_secs
            ));
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
            return bad(format!(
                "desired_ttl_secs = {} is too short for a car to act on; use at least 60",
                self.desired_ttl_secs
            ));
        }
        // The marker of a cut message takes up to 40 bytes of its own.
        if self.event_message_max_bytes < 64 {
            return bad(format!(
                "event_message_max_bytes = {} leaves no room for a message; use at least 64",
                self.event_message_max_bytes
            ));
        }
        if !self.report_rate_per_sec.is_finite() || self.report_rate_per_sec <= 0.0 {
            return bad(format!(
                "report_rate_per_sec = {} must be a positive number",
                self.report_rate_per_sec
            ));
        }
        let at_least_one = [
            ("event_kind_max_chars", self.event_kind_max_chars as u64),
            ("events_per_car", u64::from(self.events_per_car)),
            ("event_max_age_secs", self.event_max_age_secs),
            ("event_sweep_secs", self.event_sweep_secs),
            ("report_burst", u64::from(self.report_burst)),
            ("api_header_timeout_secs", self.api_header_timeout_secs),
            ("api_body_timeout_secs", self.api_body_timeout_secs),
            ("max_concurrent_uploads", self.max_concurrent_uploads as u64),
            ("gc_interval_secs", self.gc_interval_secs),
        ];
        if let Some((key, _)) = at_least_one.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{key} = 0: use at least 1"));
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

    /// The director key (`trust.rs` makes it at first start).
    pub fn director_key_path(&self) -> PathBuf {
        self.data_dir.join("director.key")
    }

    pub(crate) fn event_limits(&self) -> crate::db::EventLimits {
        crate::db::EventLimits {
            message_bytes: self.event_message_max_bytes,
            kind_chars: self.event_kind_max_chars,
            per_car: self.events_per_car,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn limits_that_would_switch_a_protection_off_are_refused() {
        let path = Path::new("twin.toml");
        Config::new("data").validate(path).unwrap();
        let refused = |change: fn(&mut Config)| {
            let mut config = Config::new("data");
            change(&mut config);
            config.validate(path).unwrap_err().to_string()
        };
        assert!(refused(|c| c.report_rate_per_sec = 0.0).contains("report_rate_per_sec"));
        assert!(refused(|c| c.report_rate_per_sec = f64::NAN).contains("report_rate_per_sec"));
        assert!(refused(|c| c.events_per_car = 0).contains("events_per_car = 0"));
        assert!(refused(|c| c.gc_interval_secs = 0).contains("gc_interval_secs = 0"));
        assert!(refused(|c| c.max_concurrent_uploads = 0).contains("max_concurrent_uploads"));
        assert!(refused(|c| c.event_message_max_bytes = 10).contains("at least 64"));
    }

    #[test]
    fn a_configuration_file_names_the_new_limits_or_takes_their_defaults() {
        let config: Config = toml::from_str(
            "data_dir = \"d\"\nevents_per_car = 50\nreport_rate_per_sec = 0.5\ngc_grace_secs = 600\n",
        )
        .unwrap();
        assert_eq!(config.events_per_car, 50);
        assert_eq!(config.report_rate_per_sec, 0.5);
        assert_eq!(config.gc_grace_secs, 600);
        assert_eq!(config.event_message_max_bytes, 4096);
        assert_eq!(config.event_max_age_secs, 30 * 86_400);
        assert_eq!(config.max_concurrent_uploads, 16);
        assert!(toml::from_str::<Config>("data_dir = \"d\"\nevents_per_cars = 5\n").is_err());
    }
}

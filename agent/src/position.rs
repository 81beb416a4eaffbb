//! Where the car is, for deployments with a geofence: from gpsd (the Linux GNSS daemon, its JSON
//! protocol on TCP) or from a file the vehicle integration writes (`{"lat": 48.137, "lon":
//! 11.575}`). Positions are rounded to `decimals` decimal places of a degree on the car (3 is
//! about a hundred metres) and reported only when the rounded position changes — and again at
//! each new session, so a twin that was away has it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cardeploy_protocol::Position;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::reporter::Reporter;

/// `[position]` in agent.toml: one source.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PositionConfig {
    /// gpsd's address, e.g. `127.0.0.1:2947`.
    #[serde(default)]
    pub gpsd: Option<String>,
    /// A JSON file `{"lat": DEGREES, "lon": DEGREES}` the vehicle integration keeps current.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How often the file is read, seconds.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Decimal places of a degree kept (0–6): 2 ≈ 1 km, 3 ≈ 100 m.
    #[serde(default = "default_decimals")]
    pub decimals: u32,
}

fn default_interval() -> u64 {
    10
}

fn default_decimals() -> u32 {
    3
}

impl PositionConfig {
    pub fn validate(&self) -> Result<(), String> {
        match (&self.gpsd, &self.file) {
            (Some(_), Some(_)) => return Err("[position]: give `gpsd` or `file`, not both".into()),
            (None, None) => {
                return Err("[position]: give `gpsd = \"HOST:PORT\"` or `file = PATH`".into());
            }
            _ => {}
        }
        if self.decimals > 6 {
            return Err(format!(
                "[position] decimals = {}: give 0 to 6",
                self.decimals
            ));
        }
        if !(1..=3600).contains(&self.interval_secs) {
            return Err(format!(
                "[position] interval_secs = {}: give 1 to 3600",
                self.interval_secs
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Degrees {
    lat: f64,
    lon: f64,
}

/// A position from the file's text.
fn from_file(text: &str, decimals: u32) -> Result<Position, String> {
    let d: Degrees =
        serde_json::from_str(text).map_err(|e| format!("not {{\"lat\", \"lon\"}}: {e}"))?;
    Position::rounded(d.lat, d.lon, decimals)
        .ok_or_else(|| format!("({}, {}) is not on Earth", d.lat, d.lon))
}

/// A position from one line of gpsd's JSON: a `TPV` report with a 2D or 3D fix.
fn from_gpsd(line: &str, decimals: u32) -> Option<Position> {
    #[derive(Deserialize)]
    struct Tpv {
        class: String,
        #[serde(default)]
        mode: u8,
        lat: Option<f64>,
        lon: Option<f64>,
    }
    let tpv: Tpv = serde_json::from_str(line).ok()?;
    if tpv.class != "TPV" || tpv.mode < 2 {
        return None;
    }
    Position::rounded(tpv.lat?, tpv.lon?, decimals)
}

/// Report `p` if it differs from the last one.
async fn moved(reporter: &Reporter, last: &mut Option<Position>, p: Position) {
    if *last != Some(p) {
        tracing::debug!(lat_e6 = p.lat_e6, lon_e6 = p.lon_e6, "position");
        reporter.position(p).await;
        *last = Some(p);
    }
}

/// Run the position source until the agent stops.
pub async fn run(config: PositionConfig, reporter: Arc<Reporter>) {
    let mut last = None;
    let mut told: Option<String> = None;
    let mut problem = |why: String| {
        if told.as_ref() != Some(&why) {
            tracing::warn!("position: {why}");
            told = Some(why);
        }
    };
    loop {
        if let Some(path) = &config.file {
            match std::fs::read_to_string(path) {
                Ok(text) => match from_file(&text, config.decimals) {
                    Ok(p) => moved(&reporter, &mut last, p).await,
                    Err(why) => problem(format!("{}: {why}", path.display())),
                },
                // No file: the vehicle knows no position now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problem(format!("{}: {e}", path.display())),
            }
            tokio::time::sleep(Duration::from_secs(config.interval_secs)).await;
        } else if let Some(addr) = &config.gpsd {
            if let Err(e) = gpsd(addr, config.decimals, &reporter, &mut last).await {
                problem(format!("gpsd at {addr}: {e}"));
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        } else {
            return;
        }
    }
}

/// One gpsd session: watch in JSON, report each fix that moved the rounded position.
async fn gpsd(
    addr: &str,
    decimals: u32,
    reporter: &Reporter,
    last: &mut Option<Position>,
) -> std::io::Result<()> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(b"?WATCH={\"enable\":true,\"json\":true};\n")
        .await?;
    let mut lines = BufReader::new(read).lines();
    // A line longer than gpsd ever writes ends the session (gpsd's own reports are a few KiB).
    while let Some(line) = lines.next_line().await? {
        if line.len() > 64 << 10 {
            return Err(std::io::Error::other("a line over 64 KiB"));
        }
        if let Some(p) = from_gpsd(&line, decimals) {
            moved(reporter, last, p).await;
        }
    }
    Err(std::io::Error::other("gpsd closed the connection"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpsd_fixes_are_read_from_tpv_reports_only() {
        // Lines as gpsd 3.22 writes them.
        let version =
            r#"{"class":"VERSION","release":"3.22","rev":"3.22","proto_major":3,"proto_minor":14}"#;
        let no_fix = r#"{"class":"TPV","device":"/dev/pts/3","mode":1}"#;
        let fix = r#"{"class":"TPV","device":"/dev/pts/3","mode":3,"time":"2026-12-03T10:00:00.000Z","lat":48.137154,"lon":11.575382,"altHAE":520.0,"speed":12.3}"#;
        let sky = r#"{"class":"SKY","device":"/dev/pts/3","satellites":[]}"#;
        assert_eq!(from_gpsd(version, 3), None);
        assert_eq!(from_gpsd(no_fix, 3), None);
        assert_eq!(from_gpsd(sky, 3), None);
        assert_eq!(
            from_gpsd(fix, 3),
            Some(Position {
                lat_e6: 48_137_000,
                lon_e6: 11_575_000
            })
        );
        assert_eq!(from_gpsd("not json", 3), None);
    }

    #[test]
    fn the_file_says_where_the_car_is_or_why_not() {
        assert_eq!(
            from_file(r#"{"lat": 48.1372, "lon": 11.5754}"#, 2).unwrap(),
            Position {
                lat_e6: 48_140_000,
                lon_e6: 11_580_000
            }
        );
        assert!(
            from_file("{}", 2)
                .unwrap_err()
                .contains("not {\"lat\", \"lon\"}")
        );
        assert!(
            from_file(r#"{"lat": 100, "lon": 0}"#, 2)
                .unwrap_err()
                .contains("not on Earth")
        );
    }

    #[test]
    fn a_configuration_names_one_source() {
        let both = PositionConfig {
            gpsd: Some("127.0.0.1:2947".into()),
            file: Some("/run/position.json".into()),
            interval_secs: 10,
            decimals: 3,
        };
        assert!(both.validate().unwrap_err().contains("not both"));
        let none = PositionConfig {
            gpsd: None,
            file: None,
            ..both.clone()
        };
        assert!(none.validate().is_err());
        let fine = PositionConfig { file: None, ..both };
        fine.validate().unwrap();
        assert!(
            PositionConfig {
                decimals: 7,
                ..fine
            }
            .validate()
            .is_err()
        );
    }
}

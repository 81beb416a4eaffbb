//! The real agent's position sources against a real twin. gpsd: gpsfake replays a drive a real
//! receiver recorded (NMEA) into Debian's gpsd, the agent watches it, and what the twin shows is
//! checked against the fixes this test reads out of the same log. The file: what the vehicle
//! integration writes, rewritten, and malformed.
//!
//! The gpsd test needs gpsd and python3-gps installed and `CARDEPLOY_GPSFAKE` (gpsfake, taken out
//! of gpsd-clients) and `CARDEPLOY_NMEA_TRACK` (the recorded log) set: `cargo xtask deps`
//! prepares both in target/gpsd/ and prints the variables; `cargo xtask test` sets them. Without
//! them it says SKIPPED, and fails under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Agent, Env, call, free_port, until, until_within};
use serde_json::Value;

/// Microdegrees (latitude, longitude), as the car rounds and the twin keeps them.
type Micro = (i64, i64);

const NEEDS: &str = "gpsd and python3-gps (apt-get install gpsd python3-gps python3-distutils) \
    and CARDEPLOY_GPSFAKE (gpsfake from Debian's gpsd-clients) with CARDEPLOY_NMEA_TRACK (a \
    recorded NMEA log): `cargo xtask deps` installs and fetches them into target/gpsd/ and prints \
    both variables; `cargo xtask test` sets them";

/// Debian's gpsd, which gpsfake starts.
const GPSD: &str = "/usr/sbin/gpsd";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_drive_reaches_the_twin_rounded_and_an_unmoved_car_sends_nothing_new() {
    let test = "a_replayed_drive_reaches_the_twin_rounded_and_an_unmoved_car_sends_nothing_new";
    let Some(replay) = Replay::from_env(test) else {
        return;
    };
    let log = String::from_utf8_lossy(&std::fs::read(&replay.track).unwrap()).into_owned();
    let track = fixes(&log);
    // At three decimals (about 100 m) the drive moves; at none it stays in one square degree.
    let on_track: BTreeSet<Micro> = track.iter().map(|f| rounded(*f, 3)).collect();
    let mut path: Vec<Micro> = track.iter().map(|f| rounded(*f, 3)).collect();
    path.dedup();
    let (first, last) = (path[0], path[path.len() - 1]);
    assert!(
        path.len() >= 2 && first != last,
        "{} does not move at three decimals: {path:?}",
        replay.track.display()
    );
    let parked: BTreeSet<Micro> = track.iter().map(|f| rounded(*f, 0)).collect();
    assert_eq!(parked.len(), 1, "the drive crosses a whole degree");
    let parked = *parked.first().unwrap();

    let gpsd = Gpsfake::start(&replay);
    let env = Env::new();
    let twin = env.twin().await;
    let driving = env.car(&twin, "VIN-GPS-DRIVE").await;
    with_position(
        &driving,
        &format!("gpsd = \"127.0.0.1:{}\"\ndecimals = 3", gpsd.port),
    );
    let parked_dir = tempfile::tempdir().unwrap();
    let parking = env
        .another_car(&twin, "VIN-GPS-PARK", parked_dir.path())
        .await;
    with_position(
        &parking,
        &format!("gpsd = \"127.0.0.1:{}\"\ndecimals = 0", gpsd.port),
    );
    let _driving = Agent::start(&driving);
    let _parking = Agent::start(&parking);

    // The car that rounds to whole degrees: one position, and what it was sent with.
    let view = until_within(
        &twin,
        "VIN-GPS-PARK",
        Duration::from_secs(60),
        "the first position of the car rounding to whole degrees",
        |v| shown(v).is_some(),
    )
    .await;
    assert_eq!(shown(&view), Some(parked), "{view}");
    let once = (
        view["reported"]["epoch"].clone(),
        view["reported"]["seq"].clone(),
        view["position"].clone(),
    );
    assert!(view["position"]["at"].as_i64().unwrap() > 0, "{view}");

    // The driving car: whatever the twin shows is a fix of the log rounded to three decimals,
    // and it shows both ends of the drive (gpsfake plays the log over and over). Both cars watch
    // the same gpsd, so the other one was told of the drive moving too: the twin saw the driving
    // car change position after the other car's first report.
    let seen = RefCell::new(BTreeSet::new());
    let view = until_within(
        &twin,
        "VIN-GPS-DRIVE",
        Duration::from_secs(90),
        "the twin to show the drive's start and its end",
        |v| {
            if let Some(p) = shown(v) {
                assert!(
                    on_track.contains(&p),
                    "the twin shows {p:?}, which is no fix of the drive rounded ({on_track:?})"
                );
                seen.borrow_mut().insert(p);
            }
            let seen = seen.borrow();
            seen.contains(&first) && seen.contains(&last)
        },
    )
    .await;
    assert!(view["position"]["at"].as_i64().unwrap() > 0, "{view}");
    eprintln!("positions the twin showed: {:?}", seen.borrow());

    // The car rounding to whole degrees never moved: not one report more.
    let (_, view) = call(&twin, "GET", "/api/v1/cars/VIN-GPS-PARK", None).await;
    assert_eq!(view["connected"], true, "{view}");
    assert_eq!(
        (
            view["reported"]["epoch"].clone(),
            view["reported"]["seq"].clone(),
            view["position"].clone()
        ),
        once,
        "a car whose rounded position never changed sent again: {view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_position_file_reaches_the_twin_rounded_and_a_malformed_one_gives_none() {
    let env = Env::new();
    let twin = env.twin().await;
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("position.json");
    let log = work.path().join("agent.log");
    let config = env.car(&twin, "VIN-FILE").await;
    with_position(
        &config,
        &format!(
            "file = \"{}\"\ninterval_secs = 1\ndecimals = 3",
            file.display()
        ),
    );

    // Malformed from the start: the agent says why, connects, and the twin has no position.
    write(&file, r#"{"lat": 52.51"#);
    let mut agent = start_logged(&config, &log);
    said_about(&log, &file, 1).await;
    let view = until(&twin, "VIN-FILE", "the car to connect", |v| {
        v["connected"] == true
    })
    .await;
    assert_eq!(shown(&view), None, "{view}");
    let mut seq = view["reported"]["seq"].as_i64().unwrap();

    // Each position arrives rounded to three decimals (down and up), in one report.
    for (text, want) in [
        (
            r#"{"lat": 52.51637, "lon": 13.37770}"#,
            (52_516_000, 13_378_000),
        ),
        (
            r#"{"lat": 48.13743, "lon": 11.57549}"#,
            (48_137_000, 11_575_000),
        ),
    ] {
        write(&file, text);
        let view = until(&twin, "VIN-FILE", &format!("{want:?} from {text}"), |v| {
            shown(v) == Some(want)
        })
        .await;
        seq += 1;
        assert_eq!(
            view["reported"]["seq"], seq,
            "one report per position: {view}"
        );
    }

    // Malformed again (another problem, so it is said again): nothing is sent, the agent runs on.
    write(&file, r#"{"lon": 11.6}"#);
    said_about(&log, &file, 2).await;
    let (_, view) = call(&twin, "GET", "/api/v1/cars/VIN-FILE", None).await;
    assert_eq!(shown(&view), Some((48_137_000, 11_575_000)), "{view}");
    assert_eq!(view["reported"]["seq"], seq, "{view}");
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent exited on a malformed position file"
    );

    // It goes on reading: the next position is the one report after the last good one.
    write(&file, r#"{"lat": 48.15, "lon": 11.58}"#);
    let view = until(
        &twin,
        "VIN-FILE",
        "the position after the malformed file",
        |v| shown(v) == Some((48_150_000, 11_580_000)),
    )
    .await;
    assert_eq!(
        view["reported"]["seq"],
        seq + 1,
        "the malformed file was reported: {view}"
    );
}

#[test]
fn nmea_fixes_are_read_from_rmc_and_gga_with_a_good_checksum() {
    // Sentences as the NL-8002U wrote them, GGAs of other receivers and places, and ones that
    // are no fix: a bad checksum, no fix (status V, quality 0), another sentence.
    let log = "# Name: NaviLock NL-8002U\n\
        $GNRMC,091503.000,A,4813.0509,N,00824.8699,E,6.56,175.87,101015,,,A,V*0B\n\
        $GPGGA,143444.28,4629.8972,N,00734.0447,E,1,00,2.40,1344.99,M,45.590,M,,*57\n\
        $GPGGA,120000.00,3351.0396,S,15112.0294,W,1,05,1.2,20.0,M,,M,,*4B\n\
        $GNRMC,091503.000,A,4813.0509,N,00824.8699,E,6.56,175.87,101015,,,A,V*0C\n\
        $GPRMC,,V,,,,,,,,,,N*53\n\
        $GPGGA,120000.00,3351.0000,S,15112.0000,W,0,00,,,M,,M,,*7D\n\
        $GNGSA,A,3,05,13,15,18,20,29,,,,,,,1.68,0.98,1.36,1*08\n";
    let got = fixes(log);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!((got[0].lat - (48.0 + 13.0509 / 60.0)).abs() < 1e-9);
    assert!((got[0].lon - (8.0 + 24.8699 / 60.0)).abs() < 1e-9);
    assert_eq!(rounded(got[0], 3), (48_218_000, 8_414_000));
    assert_eq!(rounded(got[1], 2), (46_500_000, 7_570_000));
    assert_eq!(rounded(got[2], 3), (-33_851_000, -151_200_000));
    assert_eq!(rounded(got[2], 0), (-34_000_000, -151_000_000));
}

/// One fix, in degrees.
#[derive(Clone, Copy, Debug)]
struct Fix {
    lat: f64,
    lon: f64,
}

/// The fixes of an NMEA log: `RMC` with status A and `GGA` with a fix quality above 0, from any
/// talker (`$GP`, `$GN`, ...) and with a good checksum, as gpsd reads them; everything else
/// (comments, other sentences) skipped.
fn fixes(log: &str) -> Vec<Fix> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(fields) = sentence(line.trim_end()) else {
            continue;
        };
        let fields: Vec<&str> = fields.split(',').collect();
        let kind = fields[0].get(2..).unwrap_or_default();
        let at = match kind {
            "RMC" if fields.get(2) == Some(&"A") => 3,
            "GGA" if fields.get(6).is_some_and(|q| !q.is_empty() && *q != "0") => 2,
            _ => continue,
        };
        if let (Some(lat), Some(lon)) = (
            degrees(fields.get(at), fields.get(at + 1), "S"),
            degrees(fields.get(at + 2), fields.get(at + 3), "W"),
        ) {
            out.push(Fix { lat, lon });
        }
    }
    out
}

/// The fields of `$...*hh` (talker and type first) if the checksum, the XOR of every byte between
/// `$` and `*`, is right.
fn sentence(line: &str) -> Option<&str> {
    let (body, sum) = line.strip_prefix('$')?.rsplit_once('*')?;
    let want = u8::from_str_radix(sum, 16).ok()?;
    (body.bytes().fold(0, |x, b| x ^ b) == want).then_some(body)
}

/// NMEA's `(d)ddmm.mmmm` and hemisphere, in signed degrees.
fn degrees(value: Option<&&str>, hemisphere: Option<&&str>, negative: &str) -> Option<f64> {
    let value: f64 = value?.parse().ok()?;
    let whole = (value / 100.0).trunc();
    let deg = whole + (value - whole * 100.0) / 60.0;
    Some(if *hemisphere? == negative { -deg } else { deg })
}

/// `fix` rounded to `decimals` decimal places of a degree, in microdegrees.
fn rounded(fix: Fix, decimals: u32) -> Micro {
    let scale = 10f64.powi(decimals as i32);
    let micro = |deg: f64| (deg * scale).round() as i64 * 10i64.pow(6 - decimals);
    (micro(fix.lat), micro(fix.lon))
}

/// The position the twin's car view shows, in microdegrees.
fn shown(view: &Value) -> Option<Micro> {
    let p = view.get("position")?;
    let micro = |v: &Value| v.as_f64().map(|d| (d * 1e6).round() as i64);
    Some((micro(&p["lat"])?, micro(&p["lon"])?))
}

/// `[position]` with `lines`, appended to the car's agent.toml.
fn with_position(config: &Path, lines: &str) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!("\n[position]\n{lines}\n"));
    std::fs::write(config, text).unwrap();
}

/// Replace `file` at once, as the vehicle integration should: the agent never reads half of it.
fn write(file: &Path, text: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, file).unwrap();
}

/// The agent with its log (tracing writes to stdout) in `log`, to wait for what it says.
fn start_logged(config: &Path, log: &Path) -> Agent {
    let mut sh = Command::new("sh");
    sh.args([
        "-c",
        r#"exec "$0" "$@" >"$AGENT_LOG" 2>&1"#,
        env!("CARGO_BIN_EXE_cardeploy-agent"),
    ])
    .env("AGENT_LOG", log)
    .env("NO_COLOR", "1");
    Agent::start_with(sh, config)
}

/// Wait until the agent's log names `file` `times` times (each a problem it said once).
async fn said_about(log: &Path, file: &Path, times: usize) {
    let name = file.display().to_string();
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(&name).count() >= times {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the agent did not say a {times}th time what is wrong with {name}; its log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// gpsfake and the recorded track, from the environment the test command sets.
struct Replay {
    gpsfake: PathBuf,
    track: PathBuf,
}

impl Replay {
    /// None (after saying SKIPPED, or failing under CI) when something is missing.
    fn from_env(test: &str) -> Option<Self> {
        // Relative paths are taken from the checkout, where `cargo xtask deps` puts them.
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let var = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(|v| checkout.join(v))
        };
        match (var("CARDEPLOY_GPSFAKE"), var("CARDEPLOY_NMEA_TRACK")) {
            (Some(gpsfake), Some(track)) if Path::new(GPSD).is_file() => {
                for (name, path) in [
                    ("CARDEPLOY_GPSFAKE", &gpsfake),
                    ("CARDEPLOY_NMEA_TRACK", &track),
                ] {
                    assert!(path.is_file(), "{name}: no file {}", path.display());
                }
                Some(Self { gpsfake, track })
            }
            _ => {
                cardeploy_testkit::cannot_run(test, NEEDS);
                None
            }
        }
    }
}

/// gpsfake feeding the track to its own gpsd on a free loopback port, stopped on drop with the
/// gpsd it started.
struct Gpsfake {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gpsfake {
    fn start(replay: &Replay) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("gpsfake.log");
        let child = Command::new(&replay.gpsfake)
            // -n: gpsd reads the fake receiver at once, not only once a client watches; -c: 50 ms
            // between sentences, the log's 127 in about 6 s (roughly five times its own pace),
            // over and over (no -1), so a car that connects late still sees the whole drive.
            .args(["-q", "-n", "-c", "0.05", "-P", &port.to_string()])
            .arg(&replay.track)
            .current_dir(dir.path())
            // gpsd's control socket goes to $TMPDIR.
            .env("TMPDIR", dir.path())
            // Debian's gpsd, whatever else is on PATH.
            .env("GPSD_HOME", Path::new(GPSD).parent().unwrap())
            // A group of its own, so gpsfake and its gpsd are stopped together.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", replay.gpsfake.display()));
        let mut gpsfake = Self {
            child,
            port,
            log,
            _dir: dir,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = gpsfake.child.try_wait().unwrap() {
                panic!(
                    "gpsfake exited ({status}) before gpsd listened: {}",
                    gpsfake.said()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "gpsd did not listen on port {port} within 30 s: {}",
                gpsfake.said()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        gpsfake
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        // No libc binding in this workspace: kill(1) signals the group.
        let _ = Command::new("kill")
            .args([signal, "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Gpsfake {
    fn drop(&mut self) {
        // gpsfake stops its gpsd on SIGTERM; whatever is left after 5 s is killed.
        self.signal("-TERM");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

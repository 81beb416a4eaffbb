//! What the position test (agent/tests/position.rs) replays a drive with: Debian's gpsd and
//! python3-gps from apt (`host::APT_GPSD`), `gpsfake` taken out of gpsd-clients (whose
//! dependencies pull GTK and matplotlib, so it is not installed), and a track recorded by a real
//! receiver, from gpsd's own regression logs. Kept in target/gpsd/.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::sh::{fresh_dir, output, root, run};
use crate::{debian, host};

/// gpsd's source, for its test logs: pool path, size and sha256 as Debian 12 has it.
const ORIG: &str = "main/g/gpsd/gpsd_3.22.orig.tar.xz";
const ORIG_BYTES: u64 = 3_347_364;
const ORIG_SHA256: &str = "68d2a04e237a02ce42158ceda462a24afe11eeaa2b13482e94ac7ef66693f3a0";

/// The track: a NaviLock NL-8002U (u-blox 8) in a car on a public road in the Black Forest, in
/// NMEA (GN talker: GPS with GLONASS): standing, driving, stopped about 650 m away; four
/// positions at three decimals. `bu303-moving.log`, the name that suggests itself, is SiRF
/// binary (no NMEA for the test to read the fixes from) and walks about six metres: at three
/// decimals it never moves.
const TRACK: &str = "gpsd-3.22/test/daemon/nl2008u.log";

/// Where the position test finds them (`CARDEPLOY_GPSFAKE`, `CARDEPLOY_NMEA_TRACK`).
pub struct Replay {
    pub gpsfake: PathBuf,
    pub track: PathBuf,
}

/// gpsd and python3-gps installed, gpsfake and the track in target/gpsd/ (fetched once).
pub fn prepare() -> anyhow::Result<Replay> {
    host::apt_install("the position test", host::APT_GPSD)?;
    let dir = root().join("target/gpsd");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let replay = Replay {
        gpsfake: gpsfake(&dir)?,
        track: track(&dir)?,
    };
    println!(
        "position test: CARDEPLOY_GPSFAKE={} CARDEPLOY_NMEA_TRACK={}",
        replay.gpsfake.display(),
        replay.track.display()
    );
    Ok(replay)
}

/// gpsfake from gpsd-clients of the installed python3-gps's version: gpsfake refuses a `gps`
/// module of another version.
fn gpsfake(dir: &Path) -> anyhow::Result<PathBuf> {
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "python3-gps"]))?;
    let gpsfake = dir.join("gpsfake");
    let stamp = dir.join("gpsfake.version");
    if gpsfake.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|v| v == version) {
        return Ok(gpsfake);
    }
    let scratch = dir.join("deb");
    fresh_dir(&scratch)?;
    let deb = debian::download("gpsd-clients", &version, &scratch)?;
    debian::extract_file(&deb, "usr/bin/gpsfake", &gpsfake)?;
    std::fs::remove_dir_all(&scratch)?;
    std::fs::write(&stamp, &version)?;
    Ok(gpsfake)
}

/// The recorded track out of gpsd's source tarball (kept beside it).
fn track(dir: &Path) -> anyhow::Result<PathBuf> {
    let name = Path::new(TRACK)
        .file_name()
        .context("the track has a file name")?;
    let track = dir.join(name);
    if track.is_file() {
        return Ok(track);
    }
    let tarball = dir.join("gpsd_3.22.orig.tar.xz");
    debian::pool_file(ORIG, ORIG_BYTES, ORIG_SHA256, &tarball)?;
    let scratch = dir.join("orig");
    fresh_dir(&scratch)?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&scratch)
        .arg(TRACK))?;
    std::fs::rename(scratch.join(TRACK), &track)
        .with_context(|| format!("cannot move {TRACK} to {}", track.display()))?;
    std::fs::remove_dir_all(&scratch)?;
    Ok(track)
}

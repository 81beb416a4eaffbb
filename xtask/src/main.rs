//! `cargo xtask`: the project's own commands. Each installs what it needs (apt packages, the
//! aarch64 toolchain, a Python venv) so that a fresh Debian 12 machine runs them as they are.
//!
//! - `cargo xtask demo`   the main job: a twin, a car, a desired-state change seen end to end
//! - `cargo xtask test`   every test: fmt, clippy -D warnings, unit/integration, interop, aarch64
//! - `cargo xtask cross`  the aarch64 agent (Debian's rustc-web + gcc-aarch64-linux-gnu)
//! - `cargo xtask image`  the aarch64 A/B qemu disk image and RAUC bundles (images/README.md)
//! - `cargo xtask deps`   only install prerequisites
//! - `cargo xtask crates-inc [--check]`  meta-cardeploy's crate list from Cargo.lock
//! - `cargo xtask yocto-lint`  the layer's checks (crates.inc, oelint-adv, kas schema)
//! - `cargo xtask yocto-parse --layers DIR`  bitbake -p / -g against the wrynose layers, offline
//! - `cargo xtask fuzz --seconds N`  every fuzz target (nightly, cargo-fuzz installed if missing)
//! - `cargo xtask bench link`  link benchmarks (memory per car, push latency, dead peers, RSS)
//! - `cargo xtask bench delta` delta transfer against zstd, xdelta3, bsdiff, casync, block hashes
//! - `cargo xtask bench hostile` what one hostile car costs the twin (memory, pushes, CPU, revocation)

mod bench;
mod bench_delta;
mod delta_inputs;
mod delta_tools;
mod demo;
mod demo_qemu;
mod image;
mod yocto;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub const AARCH64: &str = "aarch64-unknown-linux-gnu";
/// rsocket-py, the RSocket implementation from another ecosystem the twin is tested against.
const RSOCKET_PY: &str = "rsocket==0.4.20";

const APT_CROSS: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev:arm64",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
];

/// RAUC on the host for the OS tests and the demo: a real `rauc service` on a private bus with
/// file-backed slots (docs/state-machines.md, crates/testkit/src/rauc.rs).
const APT_RAUC: &[&str] = &[
    "rauc",
    "rauc-service",
    "squashfs-tools",
    "dbus",
    "e2fsprogs",
    "openssl",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("demo") => demo::main(),
        Some("cross") => cross().map(|bin| {
            println!("aarch64 agent: {}", bin.display());
        }),
        Some("qemu-test") => qemu_test(&args[1..]),
        Some("image") => image::main(&args[1..]).map(|dir| {
            println!("image: {}", dir.display());
        }),
        Some("deps") => deps(true),
        Some("crates-inc") => yocto::crates_inc(&args[1..]),
        Some("yocto-lint") => yocto::lint(),
        Some("yocto-parse") => yocto::parse(&args[1..]),
        Some("fuzz") => {
            let seconds = match args.iter().position(|a| a == "--seconds") {
                Some(i) => args.get(i + 1).and_then(|s| s.parse().ok()),
                None => Some(60),
            };
            match seconds {
                Some(s) => fuzz(s),
                None => Err(anyhow::anyhow!("usage: cargo xtask fuzz [--seconds N]")),
            }
        }
        Some("bench") => bench::run(&args[1..]),
        Some("fixtures") => run(cargo()
            .args([
                "run",
                "--locked",
                "-q",
                "-p",
                "cardeploy-testkit",
                "--example",
                "threat_fixtures",
                "--",
            ])
            .arg(root().join("tests/data"))),
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 demo         the main job: twin + car + desired state end to end\n  \
                 test         every test (fmt, clippy, docs, tests, interop, aarch64 under qemu-user,\n               \
                 the qemu-aarch64 system tests, fuzzing)\n  \
                 cross        build the aarch64 agent with Debian's toolchain\n  \
                 image        the aarch64 A/B qemu disk image + RAUC bundles in target/image [--agent PATH]\n  \
                 qemu-test    the qemu-aarch64 system tests (image, twin, suites) [SUITE...]\n  \
                 deps         install prerequisites only\n  \
                 crates-inc   write meta-cardeploy's cardeploy-agent-crates.inc from Cargo.lock [--check]\n  \
                 yocto-lint   the layer's checks: crates.inc fresh, oelint-adv, kas schema\n  \
                 yocto-parse  bitbake -p and -g with the real wrynose layers, offline (--layers DIR)\n  \
                 fuzz         every fuzz target for --seconds N (default 60; nightly + cargo-fuzz)\n  \
                 fixtures     write the signed-metadata threat fixtures to tests/data (commit them)\n  \
                 bench link   link benchmarks: memory per car, push latency, dead peers, agent RSS\n  \
                 bench delta  delta transfer on real data vs zstd, xdelta3, bsdiff, casync, RAUC-style\n               \
                 block hashes [--fresh: measure the external tools again]\n  \
                 bench hostile  one hostile car against the twin: RSS, push p99, CPU, revocation\n               \
                 [--cars N] [--requests N] [--smoke]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub(crate) fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// apt packages (with arm64 multiarch for the aarch64 standard library) and the Python venv.
fn deps(cross_too: bool) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = APT_RAUC.iter().copied().filter(|p| !installed(p)).collect();
    if cross_too {
        missing.extend(APT_CROSS.iter().filter(|p| !installed(p)));
    }
    if !Path::new("/usr/bin/python3").exists() && which("python3").is_none() {
        missing.push("python3");
    }
    if !missing.is_empty() {
        if !as_root() {
            bail!(
                "missing packages {missing:?}; run as root or install them: apt-get install {}",
                missing.join(" ")
            );
        }
        let arches = Command::new("dpkg")
            .arg("--print-foreign-architectures")
            .output()?;
        if !String::from_utf8_lossy(&arches.stdout).contains("arm64") {
            run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
        }
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    venv()?;
    Ok(())
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// `.venv` with rsocket-py, for the interoperability test; returns its python.
pub fn venv() -> anyhow::Result<PathBuf> {
    Ok(python_venv(".venv", &[RSOCKET_PY])?.join("bin/python"))
}

/// A venv at `name` in the checkout with the pinned packages `pins` (`name==version`), made or
/// completed when one is missing; returns its directory.
pub(crate) fn python_venv(name: &str, pins: &[&str]) -> anyhow::Result<PathBuf> {
    let venv = root().join(name);
    let python = venv.join("bin/python");
    // pip freeze spells names with '_' where PyPI has '-' (oelint_adv==…).
    let have = Command::new(&python)
        .args(["-m", "pip", "freeze"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .to_lowercase()
                .replace('-', "_")
        })
        .unwrap_or_default();
    let missing: Vec<&str> = pins
        .iter()
        .copied()
        .filter(|pin| {
            !have
                .lines()
                .any(|l| l == pin.to_lowercase().replace('-', "_"))
        })
        .collect();
    if !missing.is_empty() {
        let base = which("python3").unwrap_or_else(|| PathBuf::from("/usr/bin/python3"));
        if !python.exists() {
            run(Command::new(&base).args(["-m", "venv"]).arg(&venv))?;
        }
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(&missing))?;
    }
    Ok(venv)
}

/// Build the aarch64 agent with Debian's rustc-web; returns the binary.
pub fn cross() -> anyhow::Result<PathBuf> {
    deps(true)?;
    run(Command::new("/usr/bin/cargo")
        .current_dir(root())
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            AARCH64,
            "-p",
            "cardeploy-agent",
        ])
        .env("RUSTC", "/usr/bin/rustc")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar"))?;
    let bin = root()
        .join("target")
        .join(AARCH64)
        .join("release/cardeploy-agent");
    let size = std::fs::metadata(&bin)
        .with_context(|| format!("{} was not built", bin.display()))?
        .len();
    println!(
        "aarch64 agent: {} ({:.2} MiB, stripped)",
        bin.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(bin)
}

/// cargo-fuzz, pinned; installed from crates.io when missing.
const CARGO_FUZZ: &str = "0.13.2";
/// Fuzz targets in `fuzz/fuzz_targets/`.
const FUZZ_TARGETS: &[&str] = &[
    "chunk_index",
    "transit_frame",
    "envelope",
    "release_documents",
];
const FUZZ_SECONDS_IN_TEST: u64 = 20;

/// `cargo xtask fuzz --seconds N`: every fuzz target for N seconds on the nightly toolchain
/// (libFuzzer needs it). Findings land in `fuzz/artifacts/<target>/`.
fn fuzz(seconds: u64) -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ));
    if !installed {
        run(cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ]))?;
    }
    for target in FUZZ_TARGETS {
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", "--fuzz-dir"])
            .arg(root().join("fuzz"))
            .arg("--target-dir")
            .arg(root().join("target/fuzz"))
            .arg(target)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=1024",
            ])
            .env_remove("RUSTUP_TOOLCHAIN")
            .current_dir(root()))?;
    }
    Ok(())
}

/// The qemu-aarch64 system tests (qemu-tests/): the image (`cargo xtask image`, which builds the
/// aarch64 agent once), the host binaries, then the suites in order. `suites` picks some by name.
fn qemu_test(suites: &[String]) -> anyhow::Result<()> {
    let image = image::main(&[])?;
    qemu_suites(&image, suites)
}

/// Build the host binaries the suites drive and run the suites against the image in `image`.
fn qemu_suites(image: &Path, suites: &[String]) -> anyhow::Result<()> {
    run(cargo().args([
        "build",
        "--locked",
        "-p",
        "cardeploy-twin",
        "-p",
        "cardeploy",
        "-p",
        "cardeploy-qemu-tests",
    ]))?;
    let bin = root().join("target/debug");
    run(Command::new(bin.join("cardeploy-qemu-tests"))
        .arg("--image")
        .arg(image)
        .arg("--bin")
        .arg(&bin)
        .arg("--work")
        .arg(root().join("target/qemu-tests"))
        .args(suites))
}

fn test() -> anyhow::Result<()> {
    let python = {
        deps(true)?;
        venv()?
    };
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The Yocto layer: crate list fresh, oelint-adv clean, kas files valid (seconds, PyPI only).
    yocto::lint()?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    // CONVENTIONS §9: the docs build without warnings (broken intra-doc links included).
    run(cargo()
        .args(["doc", "--workspace", "--no-deps", "--locked"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    // The aarch64 agent is built once per run and tested under qemu-user by agent/tests/cross.rs.
    let aarch64 = cross()?;
    run(cargo()
        .args(["test", "--workspace", "--locked"])
        .env("CARDEPLOY_PYTHON", &python)
        .env("CARDEPLOY_AARCH64_AGENT", &aarch64))?;
    // Benches run in their smoke mode, so one that breaks fails here.
    bench::hostile_smoke()?;
    // Tier 4: the qemu-aarch64 system tests, on an image holding the agent built above.
    let image = image::main(&["--agent".to_owned(), aarch64.display().to_string()])?;
    qemu_suites(&image, &[])?;
    // Every parser of untrusted input, fuzzed for a bounded time; a crash fails the run.
    fuzz(FUZZ_SECONDS_IN_TEST)?;
    println!("xtask test: all checks passed");
    Ok(())
}

//! `cargo xtask test`: every check, in the order that fails cheapest first. `.ci/run` runs this
//! and nothing else.

use crate::sh::{cargo, root, run};
use crate::{bench, cross, doc_check, fuzz, gpsd, host, image, postgres, qemu, s3, yocto};

/// How long each fuzz target runs in the test command.
const FUZZ_SECONDS: u64 = 20;

pub fn test() -> anyhow::Result<()> {
    host::deps(true)?;
    let python = host::venv()?;
    // gpsfake and a recorded drive for agent/tests/position.rs.
    let replay = gpsd::prepare()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The docs name only what exists (links, repository paths) and cite nothing outside it.
    doc_check::check(&root())?;
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
    // The rustdoc build fails on warnings, broken intra-doc links included.
    run(cargo()
        .args(["doc", "--workspace", "--no-deps", "--locked"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    // The aarch64 agent is built once per run and tested under qemu-user by agent/tests/agent.rs.
    let aarch64 = cross::agent()?;
    // The twin's database tests run on SQLite and on this PostgreSQL, its chunk store tests on
    // files and on this S3-compatible server (both stopped when they drop).
    let pg = postgres::start()?;
    let objects = s3::start()?;
    run(cargo()
        .args(["test", "--workspace", "--locked"])
        .env("CARDEPLOY_POSTGRES_URL", &pg.url)
        .env("CARDEPLOY_S3_ENDPOINT", &objects.endpoint)
        .env("CARDEPLOY_PYTHON", &python)
        .env("CARDEPLOY_AARCH64_AGENT", &aarch64)
        .env("CARDEPLOY_GPSFAKE", &replay.gpsfake)
        .env("CARDEPLOY_NMEA_TRACK", &replay.track))?;
    // The twin's server suites once more as a fleet runs it: PostgreSQL and object storage,
    // each test on a database and a bucket of its own.
    run(cargo()
        .args(["test", "--locked", "-p", "cardeploy-twin"])
        .args([
            "--test",
            "twin",
            "--test",
            "deployments",
            "--test",
            "hostile",
        ])
        .args(["--test", "interop"])
        .env("CARDEPLOY_TWIN_DB", "postgres")
        .env("CARDEPLOY_POSTGRES_URL", &pg.url)
        .env("CARDEPLOY_TWIN_OBJECTS", "s3")
        .env("CARDEPLOY_S3_ENDPOINT", &objects.endpoint)
        .env("CARDEPLOY_PYTHON", &python))?;
    drop((pg, objects));
    // Every bench in its smoke mode, on the debug build `cargo test` just made, so a bench that
    // breaks fails here; the figures themselves stay in `cargo xtask bench`.
    bench::smoke_all(&bench::debug_bins())?;
    // Tier 4: the qemu-aarch64 system tests, on an image holding the agent built above.
    let image = image::main(&image::Options {
        agent: Some(aarch64),
    })?;
    qemu::suites(&image, &[])?;
    // Every parser of untrusted input, fuzzed for a bounded time; a crash fails the run.
    fuzz::fuzz(FUZZ_SECONDS)?;
    println!("xtask test: all checks passed");
    Ok(())
}

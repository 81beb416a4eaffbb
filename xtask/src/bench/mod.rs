//! `cargo xtask bench …`: the figures that are measured, never asserted by a timed test
//! (sizes, throughput, memory, scale), one module per bench. Each bench also has a smoke mode:
//! the same code end to end on a small input and the debug build, failing when a figure is not
//! sane, so that `cargo xtask test` notices a bench that broke ([`smoke_all`]).

mod build;
mod containers;
mod delta;
mod fleet;
pub mod fleet_sim;
mod hostile;
mod link;
mod plot;

use std::path::Path;

/// `cargo xtask bench <BENCH>`.
#[derive(clap::Subcommand, Debug)]
pub enum Bench {
    /// The link: twin memory per idle connected car (1,000 and 10,000), desired-state push
    /// latency, dead-peer detection, memory kept per closed connection, the agent's idle RSS
    /// (x86_64 and aarch64 under qemu-user) and binary size. Table in target/bench-link.md.
    Link(link::Options),
    /// Delta transfer: bytes on the wire, time and memory of an update against zstd, xdelta3,
    /// bsdiff, casync and a RAUC-style block-hash reference, on real Debian arm64 and PyPI data it
    /// downloads itself. Table in target/bench-delta/results.md, plot in delta.png beside it.
    Delta(delta::Options),
    /// One hostile car against the twin process: RSS while it holds unread chunk windows, push
    /// p99 to honest cars quiet and under attack, CPU for requests naming a base the car does not
    /// own, revocation to session closed. Table in target/bench-hostile.md.
    Hostile(hostile::Options),
    /// Containers on the car: a real container update's bytes on the wire against a layer pull
    /// and the delta tools, rollback time with its breakdown, and the car's registry (a large
    /// layer pulled by skopeo against reading the file, the memory serving adds). Table in
    /// target/bench-containers.md.
    Containers(containers::Options),
    /// The twin beyond one machine: several instances on one PostgreSQL database with
    /// 10,000 / 50,000 / 100,000 simulated connected cars — memory per idle car, push latency to
    /// one car and to all, the PostgreSQL load, the reconnect storm after a restart. Table in
    /// target/bench-fleet.md, plot in target/bench-fleet.png.
    Fleet(fleet::Options),
}

pub fn run(bench: &Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Link(options) => link::run_bench(options),
        Bench::Delta(options) => delta::run_bench(options),
        Bench::Hostile(options) => hostile::run_bench(options),
        Bench::Containers(options) => containers::run_bench(options),
        Bench::Fleet(options) => fleet::run_bench(options),
    }
}

/// Every bench in its smoke mode, on the debug binaries in `bins` (`cargo test` built them).
pub fn smoke_all(bins: &Path) -> anyhow::Result<()> {
    link::smoke(bins)?;
    delta::smoke(bins)?;
    hostile::smoke(bins)?;
    containers::smoke(bins)?;
    fleet::smoke(bins)?;
    fleet_sim::smoke(bins)
}

/// Where the debug build puts the binaries the smoke runs need.
pub fn debug_bins() -> std::path::PathBuf {
    build::dir(build::Profile::Debug)
}

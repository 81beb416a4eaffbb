//! The host side of a system test: the testkit's fleet (a real `cardeploy-twin` process and the
//! `cardeploy` CLI, set up the way an operator and a pipeline would). Cars in qemu reach the twin
//! at 10.0.2.2 (qemu's user networking maps it to the host's loopback).

pub use cardeploy_testkit::fleet::{CarOptions, Fleet, os, phase, progress_line, release, run};

/// The twin as a qemu guest sees it.
pub const TWIN_FROM_GUEST: &str = "10.0.2.2";

//! qemu-aarch64 system tests (tier 4 in docs/architecture.md): the A/B image from `cargo xtask image`
//! booted under TCG with U-Boot, real RAUC and the cross-built agent in the guest, a real twin on
//! the host (the guest reaches it at 10.0.2.2 through qemu's user networking). The suites assert
//! on what the serial console and the twin say. Run them with `cargo xtask qemu-test`.

pub mod fleet;
pub mod machine;
pub mod suites;

//! `cardeploy-rauc` against a real `rauc service` on a private bus (`cardeploy_testkit::rauc`),
//! with real bundles written into file-backed slots. Each test has a hard 60 s limit; without
//! root, loop devices or the programs, each prints `SKIPPED: <why>` and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardeploy_rauc::{Error, InstallArgs, MarkSlot, MarkState, Progress, Rauc, SlotState};
use cardeploy_testkit::rauc::{RaucSystem, Signer};

const COMPATIBLE: &str = "cardeploy-test-car";
const LIMIT: Duration = Duration::from_secs(60);
const INSTALL_DEADLINE: Duration = Duration::from_secs(45);
/// Each bootloader write takes this long in tests that act while RAUC installs; an installation
/// makes two.
const SLOW: Duration = Duration::from_millis(500);

/// Skips loudly: written to the process's stderr, which the test harness does not capture
/// (it captures only `eprintln!`), so the reason shows even when the test "passes".
macro_rules! skip_without_rauc {
    () => {
        if cardeploy_testkit::rauc::skipped() {
            return;
        }
    };
}

async fn within<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("test did not finish within 60 s")
}

/// Unwraps, or fails the test with RAUC's own log.
fn ok<T>(system: &RaucSystem, r: Result<T, Error>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!(
            "unexpected error: {e} ({e:?})\n--- rauc service log ---\n{}",
            system.service_log()
        ),
    }
}

async fn start(booted: &str) -> (RaucSystem, Rauc) {
    let system = RaucSystem::start(COMPATIBLE, booted).expect("start RAUC on a private bus");
    let rauc = Rauc::at(system.bus_address())
        .await
        .expect("connect to the private bus");
    (system, rauc)
}

/// A bundle big enough that RAUC is still working when a test acts on its first progress:
/// 16 MiB that squashfs cannot compress.
fn big_bundle(system: &RaucSystem, out: &Path) {
    use std::io::Read;
    let mut noise = vec![0u8; 16 * 1024 * 1024];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut noise))
        .expect("read /dev/urandom");
    system
        .bundle(
            out,
            COMPATIBLE,
            "2.0.0",
            &[("noise.bin", &noise)],
            Signer::Trusted,
        )
        .expect("build the big bundle");
}

/// A small good bundle in the system's directory.
fn small_bundle(system: &RaucSystem) -> std::path::PathBuf {
    let bundle = system.dir().join("good.raucb");
    system
        .bundle(
            &bundle,
            COMPATIBLE,
            "2.0.0",
            &[("x", b"x")],
            Signer::Trusted,
        )
        .unwrap();
    bundle
}

/// A file's content inside an ext4 image, read without mounting it.
fn ext4_file(image: &Path, file: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat /{file}"))
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs failed: {out:?}");
    out.stdout
}

#[tokio::test]
async fn properties_describe_the_booted_system() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        assert_eq!(ok(&system, rauc.compatible().await), COMPATIBLE);
        assert_eq!(ok(&system, rauc.boot_slot().await), "A");
        assert_eq!(ok(&system, rauc.operation().await), "idle");
        assert_eq!(ok(&system, rauc.last_error().await), "");
        assert_eq!(ok(&system, rauc.variant().await), "");
        assert_eq!(ok(&system, rauc.primary().await), "rootfs.0");
        let progress = ok(&system, rauc.progress().await);
        assert_eq!(progress.percentage, 0, "{progress:?}");
    })
    .await;
}

#[tokio::test]
async fn slot_status_lists_the_booted_and_the_inactive_slot() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        let slots = ok(&system, rauc.slots().await);
        assert_eq!(slots.len(), 2, "{slots:#?}");
        let (a, b) = (&slots[0], &slots[1]);
        assert_eq!(a.name, "rootfs.0");
        assert_eq!(a.state, SlotState::Booted);
        assert_eq!(a.bootname.as_deref(), Some("A"));
        assert_eq!(b.name, "rootfs.1");
        assert_eq!(b.state, SlotState::Inactive);
        assert_eq!(b.bootname.as_deref(), Some("B"));
        for (slot, bootname) in [(a, "A"), (b, "B")] {
            assert_eq!(slot.class, "rootfs");
            assert_eq!(slot.slot_type, "ext4");
            assert_eq!(Path::new(&slot.device), system.slot_path(bootname));
            assert_eq!(slot.boot_status.as_deref(), Some("good"));
            assert_eq!(slot.bundle_version, None, "nothing installed yet");
        }
    })
    .await;
}

#[tokio::test]
async fn a_good_bundle_is_written_to_the_other_slot_and_becomes_primary() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        let bundle = system.dir().join("good.raucb");
        let payload = b"cardeploy says hello\n";
        system
            .bundle(
                &bundle,
                COMPATIBLE,
                "1.2.3",
                &[("hello.txt", payload), ("etc/version", b"1.2.3\n")],
                Signer::Trusted,
            )
            .expect("build bundle");

        let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
        let record = seen.clone();
        let args = InstallArgs {
            ignore_compatible: false,
            // Not sent: RAUC 1.8 refuses unknown keys, and this one arrived in 1.10.
            transaction_id: Some("txn-1".into()),
        };
        let started = Instant::now();
        let r = rauc
            .install(&bundle, &args, INSTALL_DEADLINE, |p| {
                record.lock().unwrap().push(p.clone())
            })
            .await;
        ok(&system, r);
        eprintln!("install took {:?}", started.elapsed());

        let seen = seen.lock().unwrap().clone();
        let percentages: Vec<i32> = seen.iter().map(|p| p.percentage).collect();
        assert!(percentages.len() >= 3, "{seen:#?}");
        assert!(
            percentages.windows(2).all(|w| w[0] <= w[1]),
            "percentages must not fall: {percentages:?}"
        );
        assert!(
            percentages.iter().any(|p| (1..100).contains(p)),
            "{percentages:?}"
        );
        assert_eq!(percentages.last(), Some(&100), "{seen:#?}");

        assert_eq!(ext4_file(&system.slot_path("B"), "hello.txt"), payload);
        assert_eq!(ext4_file(&system.slot_path("B"), "etc/version"), b"1.2.3\n");
        assert_eq!(ok(&system, rauc.primary().await), "rootfs.1");
        assert_eq!(ok(&system, rauc.operation().await), "idle");
        let (primary, states) = system.bootloader_state();
        assert_eq!(primary.as_deref(), Some("B"));
        assert_eq!(states.get("B").map(String::as_str), Some("good"));
        assert_eq!(states.get("A").map(String::as_str), Some("good"));

        let slots = ok(&system, rauc.slots().await);
        let b = slots.iter().find(|s| s.name == "rootfs.1").unwrap();
        assert_eq!(b.bundle_version.as_deref(), Some("1.2.3"), "{b:#?}");
        assert_eq!(b.bundle_compatible.as_deref(), Some(COMPATIBLE));
        assert!(b.sha256.as_ref().is_some_and(|h| h.len() == 64), "{b:#?}");
        assert!(b.installed_timestamp.is_some(), "{b:#?}");
        assert!(b.extra.contains_key("installed.count"), "{b:#?}");
    })
    .await;
}

#[tokio::test]
async fn an_incompatible_bundle_is_refused_with_rauc_s_reason() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        let bundle = system.dir().join("other-car.raucb");
        system
            .bundle(
                &bundle,
                "some-other-car",
                "1.0.0",
                &[("x", b"x")],
                Signer::Trusted,
            )
            .expect("build bundle");
        let r = rauc
            .install(&bundle, &InstallArgs::default(), INSTALL_DEADLINE, |_| {})
            .await;
        match r {
            Err(Error::InstallFailed { code, last_error }) => {
                eprintln!("code {code}, LastError {last_error:?}");
                assert_ne!(code, 0);
                assert!(last_error.contains("ompatible"), "{last_error}");
                assert!(last_error.contains("some-other-car"), "{last_error}");
            }
            other => panic!(
                "expected InstallFailed, got {other:?}\n{}",
                system.service_log()
            ),
        }
        assert_eq!(ok(&system, rauc.operation().await), "idle");
        assert_eq!(ok(&system, rauc.primary().await), "rootfs.0");
    })
    .await;
}

#[tokio::test]
async fn ignore_compatible_installs_a_bundle_for_another_compatible() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        let bundle = system.dir().join("other-car.raucb");
        system
            .bundle(
                &bundle,
                "some-other-car",
                "1.0.0",
                &[("x", b"forced")],
                Signer::Trusted,
            )
            .expect("build bundle");
        let args = InstallArgs {
            ignore_compatible: true,
            transaction_id: None,
        };
        let r = rauc.install(&bundle, &args, INSTALL_DEADLINE, |_| {}).await;
        ok(&system, r);
        assert_eq!(ext4_file(&system.slot_path("B"), "x"), b"forced");
    })
    .await;
}

#[tokio::test]
async fn a_bundle_from_an_untrusted_signer_is_refused() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        let bundle = system.dir().join("untrusted.raucb");
        system
            .bundle(
                &bundle,
                COMPATIBLE,
                "1.0.0",
                &[("x", b"x")],
                Signer::Untrusted,
            )
            .expect("build bundle");
        let r = rauc
            .install(&bundle, &InstallArgs::default(), INSTALL_DEADLINE, |_| {})
            .await;
        match r {
            Err(Error::InstallFailed { code, last_error }) => {
                eprintln!("code {code}, LastError {last_error:?}");
                assert!(last_error.contains("signature"), "{last_error}");
            }
            other => panic!(
                "expected InstallFailed, got {other:?}\n{}",
                system.service_log()
            ),
        }
        assert_eq!(ok(&system, rauc.primary().await), "rootfs.0");
        assert_eq!(system.bootloader_state().0.as_deref(), Some("A"));
    })
    .await;
}

#[tokio::test]
async fn marks_change_the_bootloader_state() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        // As if the bootloader had counted A down to bad.
        std::fs::write(system.dir().join("boot/state.A"), "bad\n").unwrap();

        let marked = ok(&system, rauc.mark(MarkState::Good, MarkSlot::Booted).await);
        eprintln!("{marked:?}");
        assert_eq!(marked.slot, "rootfs.0");
        assert_eq!(system.bootloader_state().1["A"], "good");

        let marked = ok(&system, rauc.mark(MarkState::Bad, MarkSlot::Other).await);
        eprintln!("{marked:?}");
        assert_eq!(marked.slot, "rootfs.1");
        assert_eq!(system.bootloader_state().1["B"], "bad");

        let marked = ok(
            &system,
            rauc.mark(MarkState::Active, MarkSlot::Named("rootfs.1".into()))
                .await,
        );
        eprintln!("{marked:?}");
        assert_eq!(marked.slot, "rootfs.1");
        let (primary, states) = system.bootloader_state();
        assert_eq!(primary.as_deref(), Some("B"));
        assert_eq!(states["B"], "good", "activating a slot marks it good");

        match rauc
            .mark(MarkState::Good, MarkSlot::Named("nosuch.9".into()))
            .await
        {
            Err(Error::Call { method, source }) => {
                eprintln!("unknown slot: {source}");
                assert_eq!(method, "Mark");
            }
            other => panic!("expected a Call error, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn after_a_restart_into_b_the_boot_slot_is_b() {
    skip_without_rauc!();
    within(async {
        let (mut system, rauc) = start("A").await;
        assert_eq!(ok(&system, rauc.boot_slot().await), "A");
        system.restart("B").expect("restart RAUC booted from B");
        // The same handle follows the well-known name to the new process.
        assert_eq!(ok(&system, rauc.boot_slot().await), "B");
        let slots = ok(&system, rauc.slots().await);
        assert_eq!(slots[0].state, SlotState::Inactive, "{slots:#?}");
        assert_eq!(slots[1].state, SlotState::Booted, "{slots:#?}");
    })
    .await;
}

#[tokio::test]
async fn a_crash_during_an_install_is_service_gone_not_a_hang() {
    skip_without_rauc!();
    within(async {
        let (mut system, rauc) = start("A").await;
        let bundle = system.dir().join("big.raucb");
        big_bundle(&system, &bundle);
        // RAUC must still be installing when the kill lands, however loaded this machine is.
        system.slow_bootloader(SLOW).unwrap();

        let (first_progress, progressed) = tokio::sync::oneshot::channel::<Progress>();
        let mut first_progress = Some(first_progress);
        let args = InstallArgs::default();
        let install = rauc.install(&bundle, &args, INSTALL_DEADLINE, |p| {
            if let Some(tx) = first_progress.take() {
                let _ = tx.send(p.clone());
            }
        });
        let crash = async {
            let p = progressed.await.expect("a first progress");
            eprintln!("killing RAUC at {p:?}");
            system.kill_service();
            Instant::now()
        };
        let (r, killed_at) = tokio::join!(install, crash);
        eprintln!("install returned {:?} after the kill", killed_at.elapsed());
        assert!(matches!(r, Err(Error::ServiceGone)), "{r:?}");
        assert!(killed_at.elapsed() < Duration::from_secs(5));

        // And with RAUC gone, calls say so.
        let r = rauc.operation().await;
        assert!(matches!(r, Err(Error::NoService)), "{r:?}");
    })
    .await;
}

#[tokio::test]
async fn a_second_install_while_one_runs_is_busy() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        let bundle = small_bundle(&system);
        // The first installation must still run when the second one asks.
        system.slow_bootloader(SLOW).unwrap();

        let (first_progress, progressed) = tokio::sync::oneshot::channel::<()>();
        let mut first_progress = Some(first_progress);
        let args = InstallArgs::default();
        let first = rauc.install(&bundle, &args, INSTALL_DEADLINE, |_| {
            if let Some(tx) = first_progress.take() {
                let _ = tx.send(());
            }
        });
        let second = async {
            progressed.await.expect("a first progress");
            let again = rauc
                .install(&bundle, &InstallArgs::default(), INSTALL_DEADLINE, |_| {})
                .await;
            let slots = rauc.slots().await;
            (again, slots)
        };
        let started = Instant::now();
        let (first, (again, slots)) = tokio::join!(first, second);
        eprintln!("the slowed install took {:?}", started.elapsed());
        assert!(matches!(again, Err(Error::Busy)), "{again:?}");
        // RAUC itself refuses other calls while it installs.
        assert!(matches!(slots, Err(Error::Busy)), "{slots:?}");
        ok(&system, first);
        assert_eq!(ok(&system, rauc.primary().await), "rootfs.1");
    })
    .await;
}

#[tokio::test]
async fn a_deadline_too_short_is_a_timeout() {
    skip_without_rauc!();
    within(async {
        let (system, rauc) = start("A").await;
        let bundle = small_bundle(&system);
        system.slow_bootloader(SLOW).unwrap();
        let deadline = Duration::from_millis(300);
        let r = rauc
            .install(&bundle, &InstallArgs::default(), deadline, |_| {})
            .await;
        match r {
            Err(Error::Timeout { after }) => assert_eq!(after, deadline),
            other => panic!("expected Timeout, got {other:?}"),
        }
        // RAUC carries on regardless; it is still at it.
        assert_eq!(ok(&system, rauc.operation().await), "installing");
    })
    .await;
}

#[tokio::test]
async fn without_rauc_on_the_bus_calls_say_no_service() {
    skip_without_rauc!();
    within(async {
        let (mut system, rauc) = start("A").await;
        system.kill_service();
        let r = rauc.compatible().await;
        assert!(matches!(r, Err(Error::NoService)), "{r:?}");
        let bundle = system.dir().join("absent.raucb");
        let r = rauc
            .install(&bundle, &InstallArgs::default(), INSTALL_DEADLINE, |_| {})
            .await;
        assert!(matches!(r, Err(Error::NoService)), "{r:?}");
    })
    .await;
}

#[tokio::test]
async fn connecting_to_a_bus_that_is_not_there_names_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("unix:path={}/no-bus.sock", dir.path().display());
    match within(Rauc::at(&address)).await {
        Err(e @ Error::Connect { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&address), "{text}");
            assert!(text.contains("DBUS_SYSTEM_BUS_ADDRESS"), "{text}");
        }
        other => panic!("expected Connect, got {other:?}"),
    }
}

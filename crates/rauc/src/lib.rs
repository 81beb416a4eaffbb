//! A typed async client for RAUC's D-Bus API (`de.pengutronix.rauc.Installer` at `/`, service
//! `de.pengutronix.rauc`, system bus): what the car agent uses to install a bundle into the
//! other slot, to mark slots good, bad or active, and to read the slot and boot state.
//!
//! Built on zbus 6 (tokio, client side only). The proxy is written from RAUC 1.8's interface
//! description; [`Rauc::install`] adds what the raw API leaves to the caller: refusing to queue
//! behind a running installation ([`Error::Busy`]), waiting for both `Completed` and `Operation`
//! back at `idle` (RAUC emits them in either order), noticing the service leave the bus
//! ([`Error::ServiceGone`]) and bounding the whole wait ([`Error::Timeout`]). Nothing received
//! from the bus is trusted to have the documented types: a mismatch is [`Error::Decode`], never
//! a panic.
//!
//! Property reads are not cached: every call asks RAUC, so a value is never older than the call.
//!
//! Tests: `cargo test -p cardeploy-rauc` runs the decoding unit tests and `tests/service.rs`,
//! which starts a real `rauc service` on a private dbus-daemon with file-backed slots and a
//! custom bootloader backend (`cardeploy_testkit::rauc`), builds real bundles and installs them.
//! Those tests need root (RAUC loop-mounts the bundle) and the `rauc`, `dbus-daemon`,
//! `dbus-send`, `mksquashfs`, `mkfs.ext4`, `debugfs` and `openssl` programs; without them each
//! prints `SKIPPED: <why>`.

mod error;
mod install;
mod proxy;
mod slot;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zbus::proxy::CacheProperties;

pub use error::Error;
pub use slot::{SlotState, SlotStatus};

use proxy::InstallerProxy;

/// Where zbus looks for the system bus when `DBUS_SYSTEM_BUS_ADDRESS` is unset.
const DEFAULT_SYSTEM_BUS: &str = "unix:path=/var/run/dbus/system_bus_socket";

/// A handle on RAUC over one D-Bus connection. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Rauc {
    installer: InstallerProxy<'static>,
    properties: zbus::fdo::PropertiesProxy<'static>,
}

/// Installation progress as RAUC reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// 0–100 for the whole installation.
    pub percentage: i32,
    /// What RAUC is doing, e.g. `Copying image to rootfs.1`.
    pub message: String,
    /// Nesting depth of the step (1 is the installation itself).
    pub depth: i32,
}

impl From<(i32, String, i32)> for Progress {
    fn from((percentage, message, depth): (i32, String, i32)) -> Self {
        Self {
            percentage,
            message,
            depth,
        }
    }
}

/// Options of `InstallBundle`.
#[derive(Clone, Debug, Default)]
pub struct InstallArgs {
    /// Install even if the bundle's compatible differs from the system's (`ignore-compatible`).
    pub ignore_compatible: bool,
    /// Correlates the installation in this client's logs. RAUC 1.8 has no `transaction-id` key
    /// (it arrived in 1.10) and refuses unknown keys, so it is not sent to RAUC.
    pub transaction_id: Option<String>,
}

/// What [`Rauc::mark`] does to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkState {
    /// Keep it bootable (`good`).
    Good,
    /// Make it unbootable (`bad`).
    Bad,
    /// Boot it next (`active`).
    Active,
}

impl MarkState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Bad => "bad",
            Self::Active => "active",
        }
    }
}

/// Which slot [`Rauc::mark`] acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkSlot {
    /// The slot running now (`booted`).
    Booted,
    /// The other slot of the booted slot's class (`other`).
    Other,
    /// A slot by name, e.g. `rootfs.1`.
    Named(String),
}

impl MarkSlot {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Booted => "booted",
            Self::Other => "other",
            Self::Named(name) => name,
        }
    }
}

/// RAUC's answer to a mark: the slot it marked and what it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marked {
    /// e.g. `rootfs.1`
    pub slot: String,
    /// e.g. `marked slot rootfs.1 as good`
    pub message: String,
}

impl Rauc {
    /// Connects to RAUC on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` if set). Must be called
    /// inside a tokio runtime. Does not check that RAUC is running: the first call says so
    /// ([`Error::NoService`]).
    pub async fn system() -> Result<Rauc, Error> {
        let address = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .unwrap_or_else(|_| DEFAULT_SYSTEM_BUS.to_owned());
        let conn = zbus::Connection::system()
            .await
            .map_err(|source| Error::Connect {
                address: address.clone(),
                source,
            })?;
        Self::on(conn, &address).await
    }

    /// Connects to RAUC on the bus at `address` (`unix:path=...`), e.g. a test's private bus.
    pub async fn at(address: &str) -> Result<Rauc, Error> {
        let conn = zbus::connection::Builder::address(address)
            .build()
            .await
            .map_err(|source| Error::Connect {
                address: address.to_owned(),
                source,
            })?;
        Self::on(conn, address).await
    }

    async fn on(conn: zbus::Connection, address: &str) -> Result<Rauc, Error> {
        let connect = |source| Error::Connect {
            address: address.to_owned(),
            source,
        };
        let installer = InstallerProxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(connect)?;
        let properties = zbus::fdo::PropertiesProxy::builder(&conn)
            .destination(proxy::SERVICE)
            .path(proxy::PATH)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(connect)?;
        Ok(Rauc {
            installer,
            properties,
        })
    }

    /// The system's compatible string (`compatible=` of system.conf).
    pub async fn compatible(&self) -> Result<String, Error> {
        let r = self.installer.compatible().await;
        r.map_err(|e| Error::from_call("Compatible", e))
    }

    /// The system's variant (`variant-*=` of system.conf); empty when none is configured.
    pub async fn variant(&self) -> Result<String, Error> {
        let r = self.installer.variant().await;
        r.map_err(|e| Error::from_call("Variant", e))
    }

    /// The bootname of the booted slot, e.g. `A`.
    pub async fn boot_slot(&self) -> Result<String, Error> {
        let r = self.installer.boot_slot().await;
        r.map_err(|e| Error::from_call("BootSlot", e))
    }

    /// `idle` or `installing`.
    pub async fn operation(&self) -> Result<String, Error> {
        let r = self.installer.operation().await;
        r.map_err(|e| Error::from_call("Operation", e))
    }

    /// The message of the last failed installation; empty while one runs and after a success.
    pub async fn last_error(&self) -> Result<String, Error> {
        let r = self.installer.last_error().await;
        r.map_err(|e| Error::from_call("LastError", e))
    }

    /// The progress of the running (or last) installation; `(0, "", 0)` before the first.
    pub async fn progress(&self) -> Result<Progress, Error> {
        let r = self.installer.progress().await;
        r.map(Progress::from)
            .map_err(|e| Error::from_call("Progress", e))
    }

    /// The name of the slot the bootloader boots next, e.g. `rootfs.1`. RAUC refuses this while
    /// it installs ([`Error::Busy`]).
    pub async fn primary(&self) -> Result<String, Error> {
        let r = self.installer.get_primary().await;
        r.map_err(|e| Error::from_call("GetPrimary", e))
    }

    /// Every slot's status, sorted by slot name. RAUC refuses this while it installs
    /// ([`Error::Busy`]).
    pub async fn slots(&self) -> Result<Vec<SlotStatus>, Error> {
        let raw = self.installer.get_slot_status().await;
        let raw = raw.map_err(|e| Error::from_call("GetSlotStatus", e))?;
        let mut slots = raw
            .into_iter()
            .map(|(name, dict)| slot::decode_slot(name, dict))
            .collect::<Result<Vec<_>, _>>()?;
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(slots)
    }

    /// Marks `slot` good, bad or active. RAUC refuses this while it installs ([`Error::Busy`]);
    /// an unknown slot name is an [`Error::Call`] carrying RAUC's message.
    pub async fn mark(&self, state: MarkState, slot: MarkSlot) -> Result<Marked, Error> {
        let r = self.installer.mark(state.as_str(), slot.as_str()).await;
        let (slot, message) = r.map_err(|e| Error::from_call("Mark", e))?;
        tracing::info!(%slot, %message, "rauc mark");
        Ok(Marked { slot, message })
    }
}

/// RAUC opens the bundle itself, from its own working directory: hand it an absolute path.
fn bundle_source(bundle: &Path) -> Result<String, Error> {
    let bad = |why: String| Error::BundlePath {
        path: bundle.to_path_buf(),
        why,
    };
    let absolute: PathBuf = std::path::absolute(bundle).map_err(|e| bad(e.to_string()))?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|_| bad("not valid UTF-8, which D-Bus strings must be".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_arguments_are_the_words_rauc_expects() {
        assert_eq!(MarkState::Good.as_str(), "good");
        assert_eq!(MarkState::Bad.as_str(), "bad");
        assert_eq!(MarkState::Active.as_str(), "active");
        assert_eq!(MarkSlot::Booted.as_str(), "booted");
        assert_eq!(MarkSlot::Other.as_str(), "other");
        assert_eq!(MarkSlot::Named("rootfs.1".into()).as_str(), "rootfs.1");
    }

    /// The agent runs installations in spawned tasks.
    #[allow(dead_code)]
    fn install_future_is_send(rauc: &Rauc, bundle: &Path) {
        fn send<T: Send>(_: T) {}
        send(rauc.install(
            bundle,
            &InstallArgs::default(),
            std::time::Duration::ZERO,
            |_| {},
        ));
    }

    #[test]
    fn a_relative_bundle_path_is_made_absolute() {
        let source = bundle_source(Path::new("update.raucb")).unwrap();
        assert!(source.starts_with('/'), "{source}");
        assert!(source.ends_with("/update.raucb"), "{source}");
    }
}

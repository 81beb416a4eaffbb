//! The D-Bus interface, written from RAUC 1.8's `de.pengutronix.rauc.Installer.xml`.
//!
//! `InstallBundle` is not declared here: [`crate::Rauc::install`] calls it through the untyped
//! proxy because it needs the reply message itself (its serial number orders the signals that
//! follow, see `install.rs`). `Install` (deprecated) and `Info` are left out: the agent has no use
//! for them.

use std::collections::HashMap;

use zbus::OwnedVariant;

pub(crate) const SERVICE: &str = "de.pengutronix.rauc";
pub(crate) const INTERFACE: &str = "de.pengutronix.rauc.Installer";
pub(crate) const PATH: &str = "/";

#[zbus::proxy(
    interface = "de.pengutronix.rauc.Installer",
    default_service = "de.pengutronix.rauc",
    default_path = "/"
)]
pub(crate) trait Installer {
    /// Marks a slot `good`, `bad` or `active`; answers the slot it marked and what it did.
    fn mark(&self, state: &str, slot_identifier: &str) -> zbus::Result<(String, String)>;

    fn get_slot_status(&self) -> zbus::Result<Vec<(String, HashMap<String, OwnedVariant>)>>;

    /// The slot the bootloader will boot next.
    fn get_primary(&self) -> zbus::Result<String>;

    /// `idle` or `installing`.
    #[zbus(property)]
    fn operation(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;

    /// (percentage, message, nesting depth)
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<(i32, String, i32)>;

    #[zbus(property)]
    fn compatible(&self) -> zbus::Result<String>;

    #[zbus(property)]
    fn variant(&self) -> zbus::Result<String>;

    /// The bootname of the slot the system booted from.
    #[zbus(property)]
    fn boot_slot(&self) -> zbus::Result<String>;

    /// Sent when an installation ends; 0 is success.
    #[zbus(signal)]
    fn completed(&self, result: i32) -> zbus::Result<()>;
}

//! The image's inputs that are not code: files under `images/`, and the boot files the Yocto
//! layer shares with this image.

use std::path::PathBuf;

use anyhow::Context;

use crate::sh::root;

pub fn images_dir() -> PathBuf {
    root().join("images")
}

/// The boot script and U-Boot's flash environment live in the Yocto layer: the dev image and the
/// Yocto image boot the same way, from one copy.
pub fn boot_dir() -> PathBuf {
    root().join("meta-cardeploy/recipes-bsp/cardeploy-boot/files")
}

pub fn read_image_file(relative: &str) -> anyhow::Result<String> {
    let path = images_dir().join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

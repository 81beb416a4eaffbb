//! Stage 5: the development CA that is the image's RAUC keyring, and a signed RAUC bundle per
//! release after the factory one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::disk::MIB;
use super::files::read_image_file;
use super::rootfs::Release;
use crate::sh::{fresh_dir, run};

/// The `compatible` of the image's RAUC and of every bundle.
pub const COMPATIBLE: &str = "cardeploy-qemuarm64";

/// The development CA (the image's RAUC keyring) and the bundle signer it issued.
pub struct Keys {
    pub ca_cert: PathBuf,
    signing_cert: PathBuf,
    signing_key: PathBuf,
}

impl Keys {
    /// Reuses `dir` when complete, otherwise makes a new CA and signer with openssl.
    pub fn ensure(dir: &Path, work: &Path) -> anyhow::Result<Self> {
        let keys = Self {
            ca_cert: dir.join("ca.cert.pem"),
            signing_cert: dir.join("signing.cert.pem"),
            signing_key: dir.join("signing.key.pem"),
        };
        let ca_key = dir.join("ca.key.pem");
        if [
            &keys.ca_cert,
            &keys.signing_cert,
            &keys.signing_key,
            &ca_key,
        ]
        .iter()
        .all(|p| p.is_file())
        {
            println!("image: reusing the development CA in {}", dir.display());
            return Ok(keys);
        }
        println!("image: new development CA in {}", dir.display());
        fresh_dir(dir)?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&keys.ca_cert)
            .args([
                "-days",
                "3650",
                "-subj",
                "/O=cardeploy development/CN=cardeploy development CA",
            ])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]))
        .context("openssl could not make the development CA")?;
        let csr = work.join("signing.csr");
        run(Command::new("openssl")
            .arg("req")
            .args(ec)
            .arg("-keyout")
            .arg(&keys.signing_key)
            .arg("-out")
            .arg(&csr)
            .args([
                "-subj",
                "/O=cardeploy development/CN=cardeploy development bundle signer",
            ]))?;
        // No extendedKeyUsage: RAUC's default check-purpose (smimesign) accepts such a signer.
        let extensions = work.join("signing.ext");
        fs::write(
            &extensions,
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "3650", "-set_serial", "2"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&keys.ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&extensions)
            .arg("-out")
            .arg(&keys.signing_cert))
        .context("openssl could not issue the bundle signing certificate")?;
        Ok(keys)
    }
}

pub fn bundle(
    work: &Path,
    release: &Release,
    image: &Path,
    keys: &Keys,
    out: &Path,
) -> anyhow::Result<()> {
    let content = work.join(format!("bundle-{}", release.version));
    fresh_dir(&content)?;
    let manifest = read_image_file("bundle/manifest.raucm")?
        .replace("@VERSION@", release.version)
        .replace("@DESCRIPTION@", release.description);
    if !manifest.contains(&format!("compatible={COMPATIBLE}")) {
        bail!("images/bundle/manifest.raucm must say compatible={COMPATIBLE}");
    }
    fs::write(content.join("manifest.raucm"), manifest)?;
    fs::hard_link(image, content.join("rootfs.ext4"))
        .or_else(|_| fs::copy(image, content.join("rootfs.ext4")).map(|_| ()))
        .with_context(|| format!("cannot put {} into the bundle", image.display()))?;
    run(Command::new("rauc")
        .arg("bundle")
        // Uncompressed squashfs: the slot image's bytes appear as they are in the bundle, so the
        // car finds most of its chunks in the slot it runs (a seed) and fetches only the rest —
        // the delta. Compressed, every bundle would be new bytes to the car.
        .arg("--mksquashfs-args=-noI -noId -noD -noF -noX")
        .arg(format!("--cert={}", keys.signing_cert.display()))
        .arg(format!("--key={}", keys.signing_key.display()))
        .arg(format!("--keyring={}", keys.ca_cert.display()))
        .arg(&content)
        .arg(out))
    .with_context(|| format!("rauc bundle failed for {}", out.display()))?;
    fs::remove_dir_all(&content)?;
    println!(
        "image: {} ({}, {:.1} MiB)",
        out.display(),
        release.description,
        fs::metadata(out)?.len() as f64 / MIB as f64
    );
    Ok(())
}

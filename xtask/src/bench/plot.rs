//! The benches' plots: matplotlib from the project's venv, one script per bench in
//! `xtask/scripts/`.

use std::path::Path;

/// A PNG plot of a bench's `results` by `xtask/scripts/<script>`, with matplotlib from the
/// project's venv (installed there the first time).
pub fn png(script: &str, results: &Path, png: &Path) -> anyhow::Result<()> {
    let python = crate::host::venv()?;
    let has = std::process::Command::new(&python)
        .args(["-c", "import matplotlib"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        crate::sh::run(std::process::Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            "matplotlib==3.9.2",
        ]))?;
    }
    crate::sh::run(
        std::process::Command::new(&python)
            .arg(crate::sh::root().join("xtask/scripts").join(script))
            .arg(results)
            .arg(png),
    )
}

//! Running commands and finding the checkout: what every other module of xtask builds on. It
//! uses no other xtask module, so nothing can form a cycle through it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The checkout: xtask's manifest directory's parent, wherever cargo was started from.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs `cmd` with the output on the terminal, echoing it first so a failing run shows what ran.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// stdout of a command that must succeed.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{} printed non-UTF-8", describe(cmd)))
}

/// The command line of `cmd` as a person would type it, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shell words that raise the open-file limit for a command holding thousands of connections
/// (a bench: each side needs one per car): up to the kernel's `fs.nr_open` where the process may
/// raise its hard limit (root with CAP_SYS_RESOURCE), otherwise to the hard limit — 20,000 on our
/// machines, which cannot be raised there, so one process holds at most ~19,000 cars.
pub const RAISE_FDS: &str =
    "{ ulimit -n \"$(cat /proc/sys/fs/nr_open)\" 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; }";

/// The cargo that runs xtask (rustup's), in the checkout.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// `dir`, emptied: every build step starts from nothing, so a leftover never leaks into it.
pub fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// A heading for a step of a long command (demo, image), so a person sees where it is.
pub fn step(text: &str) {
    println!("\n== {text}");
}

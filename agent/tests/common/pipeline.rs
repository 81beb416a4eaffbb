//! The release pipeline through the real CLI, as an OTA pipeline runs it: keys, root, and
//! `cardeploy` against the test's twin.

use std::path::Path;
use std::process::Command;

use cardeploy_testkit::workspace_bin;

use super::Env;

/// Run `cardeploy ARGS` in `dir` against the twin; stdout on success, panic with stderr if not.
pub fn cardeploy(dir: &Path, twin: &cardeploy_twin::Running, env: &Env, args: &[&str]) -> String {
    let out = Command::new(workspace_bin("cardeploy"))
        .args(args)
        .current_dir(dir)
        .env("CARDEPLOY_API", format!("http://{}", twin.api_addr))
        .env(
            "CARDEPLOY_TOKEN_FILE",
            env.data.path().join("operator.token"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cardeploy {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The pipeline's keys (`keys/root`, `keys/release`), the twin's director key, the root naming
/// them (`root.json`), uploaded to the twin.
pub fn keys_and_root(dir: &Path, twin: &cardeploy_twin::Running, env: &Env) {
    cardeploy(dir, twin, env, &["keys", "gen", "keys/root"]);
    cardeploy(dir, twin, env, &["keys", "gen", "keys/release"]);
    cardeploy(
        dir,
        twin,
        env,
        &["root", "director", "--out", "keys/director.pub"],
    );
    cardeploy(
        dir,
        twin,
        env,
        &[
            "root",
            "init",
            "--root-key",
            "keys/root.pub",
            "--release-key",
            "keys/release.pub",
            "--director-key",
            "keys/director.pub",
            "--sign-with",
            "keys/root.key",
            "--out",
            "root.json",
        ],
    );
    cardeploy(dir, twin, env, &["root", "push", "root.json"]);
}

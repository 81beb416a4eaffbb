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
/// them (`root.json`), uploaded to the twin: the fleet bootstrap the demo and the qemu suites use.
pub fn keys_and_root(dir: &Path, twin: &cardeploy_twin::Running, env: &Env) {
    let bin = workspace_bin("cardeploy");
    cardeploy_testkit::fleet::Fleet::attach(
        bin.parent().unwrap(),
        dir,
        &format!("http://{}", twin.api_addr),
        env.cars_port,
    )
    .with_token_file(&env.data.path().join("operator.token"))
    .init_root()
    .unwrap();
}

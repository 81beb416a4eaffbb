SUMMARY = "cardeploy: sign releases of RAUC bundles, OCI images and manifests for cars"
DESCRIPTION = "The cardeploy command line tool for OTA pipelines and operators: keys, the root \
               of trust, releases (create, sign, verify, push) and cars. The native variant makes the \
               cardeploy release of an OS bundle during the build (classes-recipe/cardeploy_release.bbclass)."
SECTION = "admin"

require cardeploy-source.inc
# The whole workspace shares one Cargo.lock: the crate list is the agent's.
require cardeploy-agent-crates.inc

inherit cargo

CARGO_SRC_DIR = "cli"

BBCLASSEXTEND = "native"

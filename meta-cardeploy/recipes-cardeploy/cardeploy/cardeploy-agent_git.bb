SUMMARY = "cardeploy car agent: signed OTA updates with health-gated A/B rollback"
DESCRIPTION = "The car side of cardeploy. It keeps one RSocket link to the cloud digital twin, \
               verifies signed releases, fetches only the chunks the car lacks, installs OS bundles into the \
               inactive slot through RAUC's D-Bus API, checks the system's health after the reboot and marks \
               the slot good or rolls back on its own."
SECTION = "admin"

require cardeploy-source.inc
require cardeploy-agent-crates.inc

inherit cargo cargo-update-recipe-crates systemd

CARGO_SRC_DIR = "agent"

SRC_URI += "file://cardeploy-agent.service"

SYSTEMD_SERVICE:${PN} = "cardeploy-agent.service"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${UNPACKDIR}/cardeploy-agent.service ${D}${systemd_system_unitdir}/
}

# The agent drives RAUC over D-Bus and reads its keys and settings from cardeploy-conf.
RDEPENDS:${PN} += "cardeploy-conf rauc rauc-service"

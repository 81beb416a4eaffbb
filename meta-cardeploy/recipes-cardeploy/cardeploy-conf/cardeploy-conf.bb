SUMMARY = "cardeploy agent settings and trust anchors for this image"
DESCRIPTION = "Installs /etc/cardeploy/agent.toml (the twin's address, the health gate, the \
               reboot policy, the seed slots), the fleet CA the agent checks the twin against and the root of \
               trust every release is verified with. Override the ??= defaults below in local.conf, your distro \
               or a bbappend; per-car identity is provisioned into /data, never built into the image."
SECTION = "admin"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

# The twin's car endpoint, host:port; the host must be a name in the twin's certificate.
CARDEPLOY_TWIN ??= "twin.cardeploy.local:7443"
CARDEPLOY_STATE_DIR ??= "/data/cardeploy/state"
CARDEPLOY_SEEDS ??= "/dev/disk/by-partlabel/rootfs-a /dev/disk/by-partlabel/rootfs-b"
# immediately | parked (with a file the vehicle integration creates) | window; see
# docs/state-machines.md. Anything but "immediately" needs its keys in a bbappend'ed agent.toml.in.
CARDEPLOY_REBOOT ??= "immediately"
CARDEPLOY_HEALTH_DEADLINE ??= "300"
# Units that must be active before a new slot is marked good; k3s's node readiness is checked
# too whenever k3s is installed.
CARDEPLOY_HEALTH_UNITS ??= "k3s.service"

# CARDEPLOY_REGISTRY (conf/layer.conf): the address of the agent's registry, the one k3s's
# registries.yaml mirrors.

SRC_URI = "file://agent.toml.in"

S = "${UNPACKDIR}"

INHIBIT_DEFAULT_DEPS = "1"
do_configure[noexec] = "1"
do_compile[noexec] = "1"

# The keys are not in SRC_URI: a missing file then gets the message below instead of a fetcher
# error, and the task still re-runs when a key changes.
do_install[file-checksums] += "${CARDEPLOY_KEYS_DIR}/fleet-ca.pem:False ${CARDEPLOY_KEYS_DIR}/root.json:False ${CARDEPLOY_KEYS_DIR}/DEVELOPMENT:False"
do_install[vardeps] += "CARDEPLOY_TWIN CARDEPLOY_KEYS_DIR CARDEPLOY_STATE_DIR CARDEPLOY_SEEDS CARDEPLOY_REBOOT CARDEPLOY_HEALTH_DEADLINE CARDEPLOY_HEALTH_UNITS CARDEPLOY_REGISTRY"

do_install() {
    for f in fleet-ca.pem root.json; do
        if [ ! -f "${CARDEPLOY_KEYS_DIR}/$f" ]; then
            bbfatal "cardeploy-conf: ${CARDEPLOY_KEYS_DIR}/$f is missing. Set CARDEPLOY_KEYS_DIR to the directory with your fleet's fleet-ca.pem and root.json, or make a development set with meta-cardeploy/scripts/cardeploy-dev-keys ${CARDEPLOY_KEYS_DIR}."
        fi
    done
    if [ -e "${CARDEPLOY_KEYS_DIR}/DEVELOPMENT" ]; then
        bbwarn "cardeploy-conf: the image trusts the DEVELOPMENT keys in ${CARDEPLOY_KEYS_DIR}: anyone with that directory can sign releases these cars install. Use your fleet's keys for anything that leaves the lab."
    fi

    # Space-separated lists become TOML string arrays.
    seeds=""
    for item in ${CARDEPLOY_SEEDS}; do
        seeds="${seeds:+$seeds, }\"$item\""
    done
    units=""
    for item in ${CARDEPLOY_HEALTH_UNITS}; do
        units="${units:+$units, }\"$item\""
    done

    install -d ${D}${sysconfdir}/cardeploy
    install -m 0644 ${CARDEPLOY_KEYS_DIR}/fleet-ca.pem ${D}${sysconfdir}/cardeploy/fleet-ca.pem
    install -m 0644 ${CARDEPLOY_KEYS_DIR}/root.json ${D}${sysconfdir}/cardeploy/root.json
    sed -e "s#@TWIN@#${CARDEPLOY_TWIN}#" \
        -e "s#@STATE_DIR@#${CARDEPLOY_STATE_DIR}#" \
        -e "s#@SEEDS@#$seeds#" \
        -e "s#@REBOOT@#${CARDEPLOY_REBOOT}#" \
        -e "s#@HEALTH_DEADLINE@#${CARDEPLOY_HEALTH_DEADLINE}#" \
        -e "s#@HEALTH_UNITS@#$units#" \
        -e "s#@REGISTRY@#${CARDEPLOY_REGISTRY}#" \
        ${UNPACKDIR}/agent.toml.in > ${D}${sysconfdir}/cardeploy/agent.toml
    chmod 0644 ${D}${sysconfdir}/cardeploy/agent.toml
}

CONFFILES:${PN} = "${sysconfdir}/cardeploy/agent.toml"

SUMMARY = "k3s settings for cardeploy cars: registry mirror to the agent, state on /data"
DESCRIPTION = "Installs /etc/rancher/k3s/registries.yaml, which mirrors registry.cardeploy.local \
               to the cardeploy agent's registry on loopback, and a k3s configuration drop-in that keeps k3s's \
               data directory (containerd's image store included) on the data partition."
SECTION = "base"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

SRC_URI = "file://registries.yaml \
           file://50-cardeploy.yaml \
"

S = "${UNPACKDIR}"

INHIBIT_DEFAULT_DEPS = "1"
do_configure[noexec] = "1"
do_compile[noexec] = "1"

# CARDEPLOY_REGISTRY (conf/layer.conf): where the agent serves container images to k3s.

do_install() {
    install -d ${D}${sysconfdir}/rancher/k3s/config.yaml.d
    sed -e "s#@REGISTRY@#${CARDEPLOY_REGISTRY}#" ${S}/registries.yaml > ${D}${sysconfdir}/rancher/k3s/registries.yaml
    chmod 0644 ${D}${sysconfdir}/rancher/k3s/registries.yaml
    install -m 0644 ${S}/50-cardeploy.yaml ${D}${sysconfdir}/rancher/k3s/config.yaml.d/
}
do_install[vardeps] += "CARDEPLOY_REGISTRY"

RDEPENDS:${PN} = "k3s"

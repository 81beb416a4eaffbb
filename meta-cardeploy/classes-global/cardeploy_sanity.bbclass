# Warns at the start of a build when the DISTRO_FEATURES or the container profile cardeploy needs
# are missing: without them recipes are skipped quietly (k3s needs seccomp) and the failure shows
# up far from its cause. It also warns in every build whose key set is a development one (the
# cardeploy-conf recipe warns too, but only when its task runs, not when sstate has it). Set SKIP_META_CARDEPLOY_SANITY_CHECK = "1" to silence it, e.g. in a build
# that uses only the agent recipe.

CARDEPLOY_REQUIRED_DISTRO_FEATURES = "cardeploy rauc virtualization seccomp systemd"

addhandler cardeploy_sanity_check
cardeploy_sanity_check[doc] = "Warns when DISTRO_FEATURES or CONTAINER_PROFILE are not what cardeploy needs, or the keys are development keys"
cardeploy_sanity_check[eventmask] = "bb.event.SanityCheck"
python cardeploy_sanity_check() {
    if e.data.getVar('SKIP_META_CARDEPLOY_SANITY_CHECK') == "1":
        return
    features = (e.data.getVar('DISTRO_FEATURES') or "").split()
    missing = [f for f in e.data.getVar('CARDEPLOY_REQUIRED_DISTRO_FEATURES').split() if f not in features]
    if missing:
        bb.warn("meta-cardeploy is in your layers, but DISTRO_FEATURES lacks: %s. "
                "Without them cardeploy-image does not build (k3s is skipped without seccomp). "
                "Require conf/distro/include/cardeploy.inc from your distro or set "
                "DISTRO = \"cardeploy\" (meta-cardeploy/README.md, step 3)." % " ".join(missing))
    profile = e.data.getVar('CONTAINER_PROFILE')
    if profile != "k3s-host":
        bb.warn("meta-cardeploy expects CONTAINER_PROFILE = \"k3s-host\", found \"%s\": "
                "k3s then runs with another container runtime setup than the one cardeploy is tested "
                "with." % profile)
    keys = e.data.getVar('CARDEPLOY_KEYS_DIR')
    if keys and os.path.exists(os.path.join(keys, 'DEVELOPMENT')):
        bb.warn("meta-cardeploy: CARDEPLOY_KEYS_DIR (%s) holds DEVELOPMENT keys: cars built now "
                "install whatever anyone with that directory signs. Use your fleet's keys for "
                "anything that leaves the lab (meta-cardeploy/README.md, step 4)." % keys)
}

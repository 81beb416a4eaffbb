# The A/B layout of cardeploy-image and the keyring bundles are checked against; only when the
# distro has the cardeploy feature (conf/distro/include/cardeploy.inc).
require ${@bb.utils.contains('DISTRO_FEATURES', 'cardeploy', 'rauc-conf-cardeploy.inc', '', d)}

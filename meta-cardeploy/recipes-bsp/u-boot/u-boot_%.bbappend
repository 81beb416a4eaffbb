# /etc/fw_env.config for RAUC's U-Boot backend; only when the distro has the cardeploy feature.
require ${@bb.utils.contains('DISTRO_FEATURES', 'cardeploy', 'u-boot-cardeploy.inc', '', d)}

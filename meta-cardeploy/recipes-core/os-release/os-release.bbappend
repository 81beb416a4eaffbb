# VERSION_ID is the OS version the agent reports; only with the cardeploy DISTRO_FEATURE.
require ${@bb.utils.contains('DISTRO_FEATURES', 'cardeploy', 'os-release-cardeploy.inc', '', d)}

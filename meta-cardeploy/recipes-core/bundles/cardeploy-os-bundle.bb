SUMMARY = "cardeploy OS update: cardeploy-image's root file system as a signed RAUC bundle"
DESCRIPTION = "A verity RAUC bundle of cardeploy-image for slot class rootfs, with an \
               uncompressed squashfs so the slot image's bytes appear as they are in the bundle: a car then \
               takes most chunks of the update from the slot it runs (docs/delta.md, RAUC bundles). The cardeploy release for \
               the pipeline to sign and push is made beside it (classes-recipe/cardeploy_release.bbclass)."
SECTION = "base"
LICENSE = "MIT"

# The version cars see: the release's, the bundle's and the image's os-release VERSION_ID (the
# one the agent reports). Bump CARDEPLOY_OS_VERSION for every update.
PV = "${CARDEPLOY_OS_VERSION}"

inherit bundle cardeploy_release

# A bundle has no sources of its own: bundle.bbclass takes the images of RAUC_BUNDLE_SLOTS.
SRC_URI = ""

RAUC_BUNDLE_FORMAT = "verity"
RAUC_BUNDLE_COMPATIBLE = "${CARDEPLOY_COMPATIBLE}"
RAUC_BUNDLE_SLOTS = "rootfs"
RAUC_SLOT_rootfs = "cardeploy-image"
RAUC_SLOT_rootfs[fstype] = "ext4"

# Uncompressed: compression happens per chunk in transit instead, and only for what a car lacks.
BUNDLE_ARGS += "--mksquashfs-args='-noI -noId -noD -noF -noX'"

RAUC_KEY_FILE ??= "${CARDEPLOY_KEYS_DIR}/rauc-signer.key.pem"
RAUC_CERT_FILE ??= "${CARDEPLOY_KEYS_DIR}/rauc-signer.cert.pem"

CARDEPLOY_RELEASE_LINE ??= "ecu-os"

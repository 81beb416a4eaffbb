SUMMARY = "cardeploy ECU image: k3s, RAUC A/B with boot counting, the cardeploy agent"
DESCRIPTION = "A car's ECU image for cardeploy: systemd, k3s (single node) pulling from the \
               agent's on-car registry, RAUC with two root file system slots and U-Boot boot counting, and the \
               cardeploy agent, whose health gate marks a new slot good (it replaces rauc-mark-good). The disk \
               is files/wic/cardeploy-ab.wks.in: boot, uboot-env, rootfs-a, rootfs-b, data."
SECTION = "base"
LICENSE = "MIT"

inherit core-image

IMAGE_INSTALL:append = " \
    cardeploy-agent \
    cardeploy-conf \
    cardeploy-k3s-conf \
    k3s-server \
    rauc \
    rauc-service \
    libubootenv-bin \
    kernel-image \
    e2fsprogs-e2fsck \
"

# The agent marks a slot good only after its health gate passed; RAUC's plain mark-good service
# would mark every slot good that reaches multi-user, broken or not.
BAD_RECOMMENDATIONS += "rauc-mark-good"

# ext4 first: it is the slot image the bundle (cardeploy-os-bundle) takes.
IMAGE_FSTYPES = "ext4 wic"

# Every slot image gets the same file-system UUID and directory-hash seed: metadata checksums are
# seeded by the UUID, so with a random one nearly every metadata block of two releases differs,
# and the running slot stops being a useful seed for deltas (docs/delta.md, RAUC bundles).
CARDEPLOY_FS_UUID ??= "c4d0e1a2-5b6c-4d7e-8f90-a1b2c3d4e5f6"
# ext4 is an image type, an override oelint does not know.
# nooelint: oelint.vars.specific
EXTRA_IMAGECMD:ext4 = "-i 4096 -U ${CARDEPLOY_FS_UUID} -E hash_seed=${CARDEPLOY_FS_UUID}"

CARDEPLOY_SLOT_SIZE ??= "1024M"
CARDEPLOY_DATA_SIZE ??= "2048M"
WKS_FILE = "cardeploy-ab.wks.in"
WKS_FILE_DEPENDS:append = " cardeploy-boot"
IMAGE_BOOT_FILES = "boot.scr"
do_image_wic[depends] += "cardeploy-boot:do_deploy"
# The slot must fit its partition: refuse to build a root file system that would not.
IMAGE_ROOTFS_MAXSIZE ??= "1000000"

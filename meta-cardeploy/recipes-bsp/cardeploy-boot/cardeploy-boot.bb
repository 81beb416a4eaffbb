SUMMARY = "U-Boot boot script with RAUC boot counting, and the initial boot environment"
DESCRIPTION = "boot.scr picks the first slot of BOOT_ORDER with tries left, counts one try down \
               and boots it; the environment lives in the raw uboot-env partition in two redundant copies, \
               which RAUC reads and writes through fw_setenv. Deploys boot.scr (for the boot partition), \
               uboot-env.img (the partition's first content) and, for qemu, uboot-flash-env.img: U-Boot's own \
               environment for flash bank 1 that sources boot.scr at once."
SECTION = "base"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

DEPENDS = "u-boot-tools-native"

SRC_URI = "file://boot.cmd \
           file://uboot-flash-env.txt \
"

S = "${UNPACKDIR}"

inherit deploy nopackages

# Tries per slot before U-Boot falls back to the other one.
CARDEPLOY_BOOT_TRIES ??= "3"
# One copy of the boot-counting environment; boot.cmd and fw_env.config use the same size.
CARDEPLOY_ENV_COPY_SIZE = "0x10000"
# U-Boot's environment size in qemu's flash bank 1 (qemu_arm64_defconfig: CONFIG_ENV_SIZE).
CARDEPLOY_FLASH_ENV_SIZE ??= "0x40000"

do_configure[noexec] = "1"

do_compile() {
    mkimage -A arm64 -T script -C none -n "cardeploy A/B boot" -d ${S}/boot.cmd ${B}/boot.scr

    printf 'BOOT_ORDER=A B\nBOOT_A_LEFT=%s\nBOOT_B_LEFT=%s\n' \
        ${CARDEPLOY_BOOT_TRIES} ${CARDEPLOY_BOOT_TRIES} > ${B}/uboot-env.txt
    # Copy 1 is current (flags 1); copy 2 is the same data with flags 0, the older one.
    mkenvimage -r -p 0 -s ${CARDEPLOY_ENV_COPY_SIZE} -o ${B}/uboot-env.copy1 ${B}/uboot-env.txt
    cp ${B}/uboot-env.copy1 ${B}/uboot-env.copy2
    printf '\000' | dd of=${B}/uboot-env.copy2 bs=1 seek=4 conv=notrunc status=none
    cat ${B}/uboot-env.copy1 ${B}/uboot-env.copy2 > ${B}/uboot-env.img

    mkenvimage -s ${CARDEPLOY_FLASH_ENV_SIZE} -o ${B}/uboot-flash-env.img ${S}/uboot-flash-env.txt
}

do_deploy() {
    install -m 0644 ${B}/boot.scr ${B}/uboot-env.img ${B}/uboot-flash-env.img ${DEPLOYDIR}/
}
addtask deploy after do_compile before do_build

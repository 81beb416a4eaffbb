# cardeploy: A/B boot with RAUC's U-Boot boot counting. One script for both images: the Yocto
# image (meta-cardeploy, recipe cardeploy-boot) and the Debian-based qemu test image
# (images/README.md). Compiled to boot.scr with `mkimage -A arm64 -T script -C none`; U-Boot's
# bootcmd (uboot-flash-env.txt) loads it from partition 1.
#
# The boot-counting environment lives on partition 2 ("uboot-env") in two redundant copies of
# 0x10000 bytes each, at offsets 0x0 and 0x10000: [crc32 4][flags 1][name=value\0...\0\0].
# This is U-Boot's redundant environment format, the one libubootenv (fw_printenv/fw_setenv, used
# by RAUC) reads and writes per /etc/fw_env.config. The copy whose flags byte is newer
# (255 -> 0 wraps) and whose CRC is valid is current; a write goes to the other copy with the
# flags + 1, so a power cut during a write leaves the previous copy intact.
#
# Debian's U-Boot is built without CONFIG_SYS_REDUNDAND_ENVIRONMENT, so `env import/export -c`
# use the plain layout [crc32 4][data]. This script converts between the two by moving the data
# past the flags byte.
#
# Only BOOT_ORDER, BOOT_A_LEFT and BOOT_B_LEFT are read from and written back to the partition.

# Addresses in the 1 GiB of RAM at 0x40000000, clear of U-Boot (relocated to the top of RAM).
setenv cd_kernel 0x40400000
setenv cd_initrd 0x48000000
setenv cd_a 0x50000000
setenv cd_b 0x50010000
setenv cd_n 0x50020000
# One copy: 0x10000 bytes = 0x80 blocks; 0xfffb bytes of variables after crc32 and flags.
setenv cd_blocks 0x80
setenv cd_data 0xfffb
setenv cd_plain 0xffff

virtio scan
if part start virtio 0 2 cd_start; then
  setexpr cd_start_b ${cd_start} + ${cd_blocks}
else
  echo "cardeploy: no partition 2 (uboot-env) on virtio 0"
  reset
fi
virtio read ${cd_a} ${cd_start} ${cd_blocks}
virtio read ${cd_b} ${cd_start_b} ${cd_blocks}
setexpr cd_flags_a ${cd_a} + 4
setexpr cd_flags_b ${cd_b} + 4

# The newer copy first (U-Boot's env_import_redund order), the other one if its CRC is bad.
if itest.b *${cd_flags_a} -eq 0xff && itest.b *${cd_flags_b} -eq 0; then
  setenv cd_order "b a"
elif itest.b *${cd_flags_b} -eq 0xff && itest.b *${cd_flags_a} -eq 0; then
  setenv cd_order "a b"
elif itest.b *${cd_flags_b} -gt *${cd_flags_a}; then
  setenv cd_order "b a"
else
  setenv cd_order "a b"
fi

setenv BOOT_ORDER
setenv BOOT_A_LEFT
setenv BOOT_B_LEFT
setenv cd_current
for cd_copy in ${cd_order}; do
  if test -z "${cd_current}"; then
    if test "${cd_copy}" = "a"; then
      setenv cd_raw ${cd_a}
    else
      setenv cd_raw ${cd_b}
    fi
    cp.b ${cd_raw} ${cd_n} 4
    setexpr cd_from ${cd_raw} + 5
    setexpr cd_to ${cd_n} + 4
    cp.b ${cd_from} ${cd_to} ${cd_data}
    if env import -c ${cd_n} ${cd_plain} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
      setenv cd_current ${cd_copy}
    fi
  fi
done
if test -z "${cd_current}"; then
  echo "cardeploy: no valid copy of the boot environment, starting from defaults"
  setenv cd_current b
fi
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

# RAUC's boot counting: the first slot in BOOT_ORDER with tries left, one try less.
setenv cd_slot
for BOOT_SLOT in "${BOOT_ORDER}"; do
  if test -z "${cd_slot}"; then
    if test "x${BOOT_SLOT}" = "xA"; then
      if test ${BOOT_A_LEFT} -gt 0; then
        setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
        setenv cd_slot A
        setenv cd_part 3
        setenv cd_left ${BOOT_A_LEFT}
      fi
    elif test "x${BOOT_SLOT}" = "xB"; then
      if test ${BOOT_B_LEFT} -gt 0; then
        setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
        setenv cd_slot B
        setenv cd_part 4
        setenv cd_left ${BOOT_B_LEFT}
      fi
    fi
  fi
done
if test -z "${cd_slot}"; then
  # Like meta-rauc's script: every slot gets its tries back and the machine resets.
  echo "CARDEPLOY-NO-BOOTABLE-SLOT"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
fi

# Write the other copy, flags + 1.
if test "${cd_current}" = "a"; then
  setenv cd_raw ${cd_b}
  setenv cd_blk ${cd_start_b}
  setexpr.b cd_flags *${cd_flags_a}
else
  setenv cd_raw ${cd_a}
  setenv cd_blk ${cd_start}
  setexpr.b cd_flags *${cd_flags_b}
fi
setexpr cd_flags ${cd_flags} + 1
setexpr cd_flags ${cd_flags} % 0x100
env export -c -s ${cd_plain} ${cd_n} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
cp.b ${cd_n} ${cd_raw} 4
setexpr cd_to ${cd_raw} + 4
mw.b ${cd_to} ${cd_flags}
setexpr cd_to ${cd_raw} + 5
setexpr cd_from ${cd_n} + 4
cp.b ${cd_from} ${cd_to} ${cd_data}
virtio write ${cd_raw} ${cd_blk} ${cd_blocks} || echo "cardeploy: cannot write the boot environment"

if test -z "${cd_slot}"; then
  reset
fi

echo "CARDEPLOY-UBOOT slot=${cd_slot} left=${cd_left}"
setenv bootargs "console=ttyAMA0 rauc.slot=${cd_slot} root=/dev/vda${cd_part} ro panic=-1 quiet"
if ext4load virtio 0:${cd_part} ${cd_kernel} /boot/Image; then
  # Debian's kernel needs its initramfs (virtio and ext4 are modules there); a Yocto kernel has
  # them built in and its slots carry no initrd.img.
  if ext4load virtio 0:${cd_part} ${cd_initrd} /boot/initrd.img; then
    booti ${cd_kernel} ${cd_initrd}:${filesize} ${fdtcontroladdr}
  else
    booti ${cd_kernel} - ${fdtcontroladdr}
  fi
fi
# Only reached when the slot has no kernel or it does not start: the tries count down to the
# other slot.
echo "cardeploy: slot ${cd_slot} does not boot, resetting"
reset

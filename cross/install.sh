#!/bin/sh
# Installs the aarch64 toolchain that cross/config.toml names (Debian 12, as root):
# Debian's rustc-web and cargo-web with the arm64 standard library, the aarch64 C cross
# compiler and libc, and qemu-user to run the result. Idempotent: when everything is there it
# changes nothing and needs no root. `cargo xtask cross` runs it before every build.
set -eu

PACKAGES="rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
arm64=yes
dpkg --print-foreign-architectures | grep -qx arm64 || arm64=no

if [ -z "$missing" ] && [ "$arm64" = yes ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "cross/install.sh: missing:$missing (arm64 architecture enabled: $arm64); run it as root" >&2
    exit 1
fi
# libstd-rust-web-dev:arm64 is an arm64 package: apt needs the foreign architecture first.
if [ "$arm64" = no ]; then
    dpkg --add-architecture arm64
fi
apt-get update -q
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing

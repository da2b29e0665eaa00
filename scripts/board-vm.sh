#!/usr/bin/env bash
# A real board: Debian 12 in qemu (TCG) with the agent .deb installed and
# systemd as PID 1, programmed over its emulated UART by provision-station,
# then provisioned to ACTIVE over mTLS (harness/board_vm.py; --help).
# Installs its host tools from Debian's archive when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null

arch=amd64
for ((i = 1; i <= $#; i++)); do
    case "${!i}" in
        --arch) j=$((i + 1)); arch="${!j}" ;;
        --arch=*) arch="${!i#--arch=}" ;;
    esac
done

missing=()
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
# --backend deployed (the default) boots the backend in a Debian 12 container.
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
if [ "$arch" = arm64 ]; then
    command -v qemu-system-aarch64 >/dev/null 2>&1 || missing+=(qemu-system-arm)
    # The arm64 image's maintainer scripts run in a chroot through binfmt.
    [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static binfmt-support)
else
    command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "board-vm: apt-get install ${missing[*]}" >&2
    [ "$(id -u)" -eq 0 ] || { echo "board-vm: run as root to install them" >&2; exit 2; }
    . scripts/apt-install.sh
    apt_install "${missing[@]}"
fi
if [ "$arch" = arm64 ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64
fi
exec .venv/bin/python -m harness.board_vm "$@"

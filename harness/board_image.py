"""The board VM's disk image: Debian 12 from Debian's archive, the agent .deb installed.

Two cached layers under ``cache_root()`` (outside the checkout), each keyed
by the sha256 of what went into it, built in a temporary directory and
renamed into place (a build killed half-way leaves no entry):

- ``base-<arch>-<key>/``: a root filesystem from ``mmdebstrap`` (systemd as
  init, the distribution kernel, python3, qemu-guest-agent as the harness's
  control channel). Rebuilt only when the package list or this recipe changes.
- ``image-<arch>-<key>/``: ``disk.img`` (ext4 made with ``mkfs.ext4 -d``, no
  loop mount), ``vmlinuz`` and ``initrd.img`` for qemu's ``-kernel``/``-initrd``.
  Keyed by the base key, the agent .deb's sha256 and the board settings below:
  the .deb is installed with ``dpkg -i`` in a chroot of a copy of the base
  (qemu-user binfmt runs the arm64 maintainer scripts).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import platformdirs

from server.errors import ServerError

SUITE: Final = "bookworm"
MIRROR: Final = "http://deb.debian.org/debian"
# Bumped when the recipe below changes in a way the package list does not show.
RECIPE_VERSION: Final = 1
# The broker's name inside the guest; /etc/hosts points it at the guestfwd address.
BROKER_HOSTNAME: Final = "mqtt.board-vm.test"
BROKER_GUEST_IP: Final = "10.0.2.100"
KEEP_IMAGES: Final = 2  # per architecture; older images are deleted after a build


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the two board architectures."""

    arch: str
    kernel_package: str
    console: str  # the kernel console (the harness logs it)
    factory_port: str  # the UART the factory console serves
    qemu: str


ARCHES: Final = {
    "amd64": ArchSpec(
        "amd64", "linux-image-cloud-amd64", "ttyS0", "/dev/ttyS1", "qemu-system-x86_64"
    ),
    # qemu 7.2's "virt" machine has one PL011 (the console); the factory UART
    # is a PCI 16550 there, the first 8250 port.
    "arm64": ArchSpec(
        "arm64", "linux-image-cloud-arm64", "ttyAMA0", "/dev/ttyS0", "qemu-system-aarch64"
    ),
}

BASE_PACKAGES: Final = (
    "systemd-sysv",
    "udev",
    "python3",
    "iproute2",
    "procps",
    "qemu-guest-agent",
)
# The initramfs only has to find an ext4 root on virtio-blk (MODULES=dep
# cannot probe from a chroot); udev loads everything else after switch_root.
INITRAMFS_MODULES: Final = ("virtio_pci", "virtio_blk", "ext4")
DPKG_EXCLUDES: Final = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*")


class ImageError(ServerError):
    """The board image could not be built."""


@dataclass(frozen=True)
class BoardImage:
    """A built image: the disk and the kernel and initramfs to boot it with."""

    arch: ArchSpec
    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "disk.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def cache_root() -> Path:
    """``$BOARD_VM_CACHE``, else the user cache dir (``~/.cache/device-provisioning/board-vm``)."""
    override = os.environ.get("BOARD_VM_CACHE")
    if override:
        return Path(override)
    return Path(platformdirs.user_cache_dir("device-provisioning")) / "board-vm"


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(argv: list[str], what: str, log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise ImageError(f"{what} failed (exit {result.returncode}); log {log}:\n{tail}")


@contextmanager
def _locked(root: Path, arch: str) -> Iterator[None]:
    """One builder per architecture at a time (two CI runs on one machine share the cache)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".lock-{arch}").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _base_recipe(spec: ArchSpec) -> dict[str, object]:
    return {
        "v": RECIPE_VERSION,
        "suite": SUITE,
        "arch": spec.arch,
        "packages": [*BASE_PACKAGES, spec.kernel_package],
        "initramfs": INITRAMFS_MODULES,
        "excludes": DPKG_EXCLUDES,
    }


def _build_base(spec: ArchSpec, target: Path, log: Path) -> None:
    modules = "\\n".join(INITRAMFS_MODULES)
    hook = (
        'mkdir -p "$1/etc/initramfs-tools/conf.d" && '
        'echo MODULES=list > "$1/etc/initramfs-tools/conf.d/board-vm.conf" && '
        f'printf "{modules}\\n" > "$1/etc/initramfs-tools/modules"'
    )
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=apt",
        f"--arch={spec.arch}",
        '--aptopt=APT::Install-Recommends "false"',
        *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
        f"--include={','.join([*BASE_PACKAGES, spec.kernel_package])}",
        f"--essential-hook={hook}",
        SUITE,
        str(target),
        os.environ.get("BOARD_VM_MIRROR", MIRROR),
    ]
    _run(argv, "mmdebstrap", log)


def _board_files(rootfs: Path, spec: ArchSpec) -> None:
    """What makes the base a factory-fresh board: disk, network, names, agent config."""
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (rootfs / "etc/hostname").write_text("board-vm\n")
    with (rootfs / "etc/hosts").open("a") as hosts:
        hosts.write(f"{BROKER_GUEST_IP}\t{BROKER_HOSTNAME}\n")
    network = rootfs / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    (network / "20-wired.network").write_text("[Match]\nType=ether\n[Network]\nDHCP=ipv4\n")
    config_dir = rootfs / "etc/provision-agent"
    (config_dir / "agent.toml").write_text(f'[serial]\nport = "{spec.factory_port}"\n')
    # Factory image: the marker starts provision-factory-console.service.
    (config_dir / "factory-mode").write_text("")


def _chroot(rootfs: Path, log: Path, *argv: str) -> None:
    _run(["chroot", str(rootfs), *argv], f"chroot {' '.join(argv)}", log)


def _build_image(spec: ArchSpec, base: Path, deb: Path, target: Path, log: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=target.parent))
    try:
        rootfs = work / "rootfs"
        _run(["cp", "-a", "--reflink=auto", str(base), str(rootfs)], "copy base", log)
        shutil.copy(deb, rootfs / "tmp/agent.deb")
        _chroot(rootfs, log, "dpkg", "-i", "/tmp/agent.deb")  # noqa: S108 (inside the chroot)
        (rootfs / "tmp/agent.deb").unlink()
        _board_files(rootfs, spec)
        _chroot(rootfs, log, "chown", "provision-agent:provision-agent",
                "/etc/provision-agent/agent.toml", "/etc/provision-agent/factory-mode")  # fmt: skip
        _chroot(rootfs, log, "chmod", "0600", "/etc/provision-agent/agent.toml")
        _chroot(rootfs, log, "systemctl", "enable", "systemd-networkd.service")
        # The factory UART belongs to the factory console alone (hw/README.md).
        _chroot(rootfs, log, "systemctl", "mask", f"serial-getty@{spec.factory_port[5:]}.service")
        boot = rootfs / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if len(kernels) != 1 or len(initrds) != 1:
            raise ImageError(
                f"expected one kernel and one initrd in {boot}, found {kernels} {initrds}"
            )
        target.mkdir()
        shutil.copy(kernels[0], target / "vmlinuz")
        shutil.copy(initrds[0], target / "initrd.img")
        used_mib = _du_mib(rootfs)
        size = f"{used_mib + 384}M"  # room for the journal, state and a second kernel
        _run(["mkfs.ext4", "-q", "-F", "-L", "board-root", "-d", str(rootfs),
              str(target / "disk.img"), size], "mkfs.ext4 -d", log)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _du_mib(path: Path) -> int:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def _publish(build: Callable[[Path], None], final: Path) -> None:
    """Build into a temporary sibling, then rename: the entry exists only when complete."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prune(root: Path, prefix: str, keep: Path) -> None:
    """Keep the newest KEEP_IMAGES entries with ``prefix`` (always ``keep``)."""
    entries = sorted(root.glob(f"{prefix}*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [e for e in entries if e != keep][KEEP_IMAGES - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_image(arch: str, deb: Path, log: Path) -> tuple[BoardImage, dict[str, float]]:
    """The cached image for ``arch`` with ``deb`` installed (built if missing) and build times."""
    spec = ARCHES[arch]
    root = cache_root()
    times: dict[str, float] = {}
    with _locked(root, arch):
        base_key = _digest(_base_recipe(spec))
        base = root / f"base-{arch}-{base_key}"
        if not base.is_dir():
            started = _now()
            _publish(lambda tmp: _build_base(spec, tmp, log), base)
            times["base_build_s"] = _now() - started
            _prune(root, f"base-{arch}-", base)
        settings = {"base": base_key, "deb": _file_sha256(deb), "board": _board_recipe(spec)}
        image_dir = root / f"image-{arch}-{_digest(settings)}"
        if not image_dir.is_dir():
            started = _now()
            _publish(lambda tmp: _build_image(spec, base, deb, tmp, log), image_dir)
            times["image_build_s"] = _now() - started
            _prune(root, f"image-{arch}-", image_dir)
        os.utime(image_dir)  # most recently used survives pruning
    return BoardImage(spec, image_dir), times


def _board_recipe(spec: ArchSpec) -> dict[str, object]:
    return {
        "v": RECIPE_VERSION,
        "broker": [BROKER_HOSTNAME, BROKER_GUEST_IP],
        "spec": spec.__dict__,
    }


def _now() -> float:
    return time.monotonic()

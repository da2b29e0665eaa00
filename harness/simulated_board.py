"""Simulated board filesystems (tests, demo, bench): a sysfs network tree and serial files.

The layout is the kernel's: ``class/net/<if>`` is a relative symlink into
``devices/...``; physical interfaces sit under a platform device and have a
``device`` link, virtual ones sit under ``devices/virtual/net``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772


def make_sysfs(
    root: Path,
    interfaces: Mapping[str, tuple[str, bool]],
    *,
    types: Mapping[str, int] | None = None,
) -> Path:
    """Create ``<root>/class/net/<name>`` for each ``name: (mac, physical)``; return ``root``.

    ``types`` overrides the ``type`` file (default 772 for ``lo``, else 1).
    """
    root = Path(root)
    net_class = root / "class" / "net"
    net_class.mkdir(parents=True, exist_ok=True)
    for name, (mac, physical) in interfaces.items():
        if physical:
            device = root / "devices" / "platform" / "soc" / f"{name}-controller"
            target = device / "net" / name
        else:
            device = None
            target = root / "devices" / "virtual" / "net" / name
        target.mkdir(parents=True)
        (target / "address").write_text(mac + "\n")
        default_type = ARPHRD_LOOPBACK if name == "lo" else ARPHRD_ETHER
        (target / "type").write_text(f"{(types or {}).get(name, default_type)}\n")
        if device is not None:
            os.symlink(os.path.relpath(device, target), target / "device")
        os.symlink(os.path.relpath(target, net_class), net_class / name)
    return root


def make_board_files(
    root: Path, *, dt_serial: bytes | None = None, machine_id: str | None = None
) -> Path:
    """Create ``proc/device-tree/serial-number`` and/or ``etc/machine-id`` under ``root``."""
    root = Path(root)
    if dt_serial is not None:
        (root / "proc" / "device-tree").mkdir(parents=True, exist_ok=True)
        (root / "proc" / "device-tree" / "serial-number").write_bytes(dt_serial)
    if machine_id is not None:
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "machine-id").write_text(machine_id)
    return root

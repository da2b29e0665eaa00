"""The board's hardware identity: MAC address, board serial number, default clientId."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from agent import protocol
from agent.errors import IdentityError
from agent.protocol import normalise_mac

ARPHRD_ETHER: Final = 1


def _read_text(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace").strip()


def _interface_rank(name: str) -> tuple[int, str]:
    if name.startswith(("eth", "en")):
        return (0, name)
    if name.startswith("wl"):
        return (1, name)
    return (2, name)


def _skip_reason(net_dir: Path, name: str) -> str | None:
    """Why an interface is not a hardware identity, or None if it is usable."""
    entry = net_dir / name
    if name == "lo":
        return "loopback"
    resolved = os.path.realpath(entry)
    sysfs = os.path.realpath(net_dir.parent.parent)
    relative = os.path.relpath(resolved, sysfs)
    # Compare below the sysfs root, so a test tree under any path works; a link
    # that leaves the root is judged on its absolute target.
    if relative.startswith(".."):
        virtual = "/devices/virtual/" in resolved
    else:
        virtual = relative.startswith("devices/virtual/")
    if virtual:
        return "virtual"
    if not os.path.lexists(entry / "device"):
        return "virtual (no device link)"
    type_file = entry / "type"
    if type_file.exists():
        try:
            if int(_read_text(type_file)) != ARPHRD_ETHER:
                return "not Ethernet-like (type != 1)"
        except (OSError, ValueError):
            return "unreadable type"
    try:
        normalise_mac(_read_text(entry / "address"))
    except OSError:
        return "unreadable address"
    except ValueError:
        return "unusable address"
    return None


def read_mac(sysfs_root: Path = Path("/sys"), interface: str | None = None) -> tuple[str, str]:
    """Return ``(interface, MAC)`` with the MAC as ``AA:BB:CC:DD:EE:FF``.

    With ``interface`` set, that interface's address is used as is. Without it,
    the choice is deterministic: from ``<sysfs>/class/net/*`` skip ``lo``,
    virtual interfaces (the entry resolves under ``devices/virtual/`` or has no
    ``device`` link), interfaces whose ``type`` is not 1 (ARPHRD_ETHER) and
    all-zero, broadcast or unreadable addresses; then take the first by name,
    ``eth*``/``en*`` before ``wl*`` before the rest, alphabetical in each group.
    """
    net_dir = Path(sysfs_root) / "class" / "net"
    if interface is not None:
        entry = net_dir / interface
        if not os.path.lexists(entry):
            raise IdentityError(
                f"network interface {interface!r} not found ({entry} does not exist); "
                "fix `interface` in the config"
            )
        try:
            return interface, normalise_mac(_read_text(entry / "address"))
        except OSError as exc:
            raise IdentityError(
                f"cannot read {entry / 'address'}: {exc.strerror}; fix `interface` in the config"
            ) from None
        except ValueError as exc:
            raise IdentityError(
                f"{entry / 'address'}: {exc}; set `interface` in the config to another interface"
            ) from None
    try:
        names = sorted(os.listdir(net_dir), key=_interface_rank)
    except OSError as exc:
        raise IdentityError(
            f"cannot list {net_dir}: {exc.strerror}; set `interface` in the config"
        ) from None
    skipped = []
    for name in names:
        reason = _skip_reason(net_dir, name)
        if reason is None:
            return name, normalise_mac(_read_text(net_dir / name / "address"))
        skipped.append(f"{name}: {reason}")
    raise IdentityError(
        f"no physical network interface with a usable MAC under {net_dir} "
        f"(skipped {', '.join(skipped) or 'nothing, the directory is empty'}); "
        "set `interface` in the config"
    )


def _usable_serial(raw: str) -> str | None:
    text = raw.replace("\x00", "").strip()
    if not text or set(text) == {"0"} or text == "uninitialized":
        return None
    return text


def board_serial(root: Path = Path("/")) -> str:
    """The board's serial: device-tree ``serial-number``, else ``/etc/machine-id``.

    All-zero serials (some SoCs) and systemd's ``uninitialized`` marker count as missing.
    """
    candidates = [
        Path(root) / "proc" / "device-tree" / "serial-number",
        Path(root) / "etc" / "machine-id",
    ]
    for path in candidates:
        try:
            serial = _usable_serial(path.read_bytes().decode("ascii", errors="replace"))
        except OSError:
            continue
        if serial is not None:
            return serial
    raise IdentityError(
        f"no board serial number: neither {candidates[0]} nor {candidates[1]} holds one"
    )


def default_client_id(mac: str) -> str:
    """``dev-`` + the 12 lowercase hex digits of the MAC (the server applies the same rule)."""
    try:
        return protocol.default_client_id(mac)
    except ValueError as exc:
        raise IdentityError(str(exc)) from None

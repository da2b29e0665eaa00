"""What the harness verifies inside a booted board VM (through the guest agent).

Each check reads the guest as it is: systemd's view of the agent unit, the
unit file on disk, sysfs, the journal, the owners and modes of the key files.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Final

from harness.guest_agent import GuestAgent
from server.errors import ServerError

AGENT_UNIT: Final = "provision-agent.service"
CONSOLE_UNIT: Final = "provision-factory-console.service"
STATE_DIR: Final = "/var/lib/provision-agent"
CONFIG_DIR: Final = "/etc/provision-agent"
AGENT_USER: Final = "provision-agent"
SHIPPED_UNITS: Final = Path(__file__).resolve().parent.parent / "systemd"


class BoardCheckFailed(ServerError):
    """The board VM is not in the state the scenario expects."""


def unit_properties(guest: GuestAgent, unit: str) -> dict[str, str]:
    names = (
        "ActiveState,SubState,StatusText,WatchdogTimestampMonotonic,WatchdogUSec,"
        "NRestarts,MainPID,FragmentPath,DropInPaths,User,Type"
    )
    out = guest.check(f"systemctl show {unit} -p {names}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_unit_active(guest: GuestAgent, unit: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        props = unit_properties(guest, unit)
        if props.get("ActiveState") == "active":
            return props
        if time.monotonic() > deadline:
            raise BoardCheckFailed(f"{unit} is not active after {timeout:.0f} s: {props}")
        time.sleep(1.0)


def guest_mac(guest: GuestAgent) -> str:
    """The MAC of the guest's one physical NIC, from the guest's real sysfs."""
    script = 'for d in /sys/class/net/*; do if [ -e "$d/device" ]; then cat "$d/address"; fi; done'
    macs = guest.check(script).split()
    if len(macs) != 1:
        raise BoardCheckFailed(f"expected one physical NIC in the guest, found {macs}")
    return macs[0].upper()


def check_factory_console(guest: GuestAgent, port: str) -> None:
    """The factory image runs the console on the factory UART, not the agent."""
    props = wait_unit_active(guest, CONSOLE_UNIT, 120)
    if props.get("User") != AGENT_USER:
        raise BoardCheckFailed(f"{CONSOLE_UNIT} runs as {props.get('User')!r}")
    agent = unit_properties(guest, AGENT_UNIT)
    if agent.get("ActiveState") == "active":
        raise BoardCheckFailed(f"{AGENT_UNIT} runs in factory mode")
    guest.check(f"test -c {port}")
    # Type=exec is active at exec; Python needs a while before it holds the port.
    wait_journal(guest, CONSOLE_UNIT, "event=listening", 120)


def check_shipped_unit(guest: GuestAgent) -> None:
    """The agent runs under the packaged unit, byte for byte, with no drop-in."""
    props = unit_properties(guest, AGENT_UNIT)
    if props.get("DropInPaths"):
        raise BoardCheckFailed(f"{AGENT_UNIT} has drop-ins: {props['DropInPaths']}")
    fragment = props.get("FragmentPath", "")
    guest_sha = guest.check(f"sha256sum {fragment}").split()[0]
    shipped = hashlib.sha256((SHIPPED_UNITS / AGENT_UNIT).read_bytes()).hexdigest()
    if guest_sha != shipped:
        raise BoardCheckFailed(f"{fragment} in the guest differs from systemd/{AGENT_UNIT}")
    if props.get("Type") != "notify" or props.get("User") != AGENT_USER:
        raise BoardCheckFailed(f"{AGENT_UNIT}: unexpected Type/User: {props}")


def check_notify(guest: GuestAgent, expect_state: str, timeout: float = 60.0) -> dict[str, str]:
    """READY (active under Type=notify), ``STATUS=state=...``, a watchdog ping: systemd saw them."""
    deadline = time.monotonic() + timeout
    first = wait_unit_active(guest, AGENT_UNIT, timeout)
    while True:
        props = unit_properties(guest, AGENT_UNIT)
        pinged = int(props.get("WatchdogTimestampMonotonic", "0")) > int(
            first.get("WatchdogTimestampMonotonic", "0")
        )
        if pinged and props.get("StatusText") == f"state={expect_state}":
            return props
        if time.monotonic() > deadline:
            raise BoardCheckFailed(
                f"{AGENT_UNIT}: no watchdog ping or STATUS=state={expect_state} "
                f"within {timeout:.0f} s: {props}"
            )
        time.sleep(2.0)


def journal_count(guest: GuestAgent, unit: str, needle: str) -> int:
    out = guest.run(f"journalctl -b -u {unit} -o cat --no-pager | grep -c -- '{needle}'").stdout
    return int(out.strip() or "0")


def wait_journal(guest: GuestAgent, unit: str, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while journal_count(guest, unit, needle) == 0:
        if time.monotonic() > deadline:
            tail = guest.run(f"journalctl -b -u {unit} -o cat --no-pager | tail -20").stdout
            raise BoardCheckFailed(
                f"{unit}: no {needle!r} in the journal after {timeout:.0f} s:\n{tail}"
            )
        time.sleep(1.0)


def check_key_files(guest: GuestAgent) -> list[str]:
    """Everything under the state and config directories: owned by the agent user, private.

    Directories 0700, files 0600 (keys, certificates, state): the promise of
    docs/systemd.md and hw/README.md. Returns the listing.
    """
    listing = guest.check(
        f"find {STATE_DIR} {CONFIG_DIR} -printf '%u:%g %m %y %p\\n' | sort -k4"
    ).splitlines()
    bad: list[str] = []
    paths = set()
    for line in listing:
        owner, mode, kind, path = line.split(" ", 3)
        want = "700" if kind == "d" else "600"
        if owner != f"{AGENT_USER}:{AGENT_USER}" or (kind in "df" and mode != want):
            bad.append(line)
        paths.add(path)
    birth_key = f"{STATE_DIR}/keys/birth.key"
    live_key = any(
        p.startswith(f"{STATE_DIR}/certs/archive/") and p.endswith("/key.pem") for p in paths
    )
    if bad or birth_key not in paths or not live_key:
        raise BoardCheckFailed(f"key files missing or with wrong owner/mode: {bad or listing}")
    return listing


def check_doctor(guest: GuestAgent) -> str:
    """``provision-agent doctor`` in the guest, as root: every check passes.

    What a field technician runs on a board (hw/README.md): as root it reads the
    system locations (/etc/provision-agent, /var/lib/provision-agent) and checks the
    keys against the state directory's owner, the agent's user. Returns its report.
    """
    result = guest.run("provision-agent doctor", timeout=120)
    if result.exit_code != 0 or any(
        not line.startswith("PASS") for line in result.stdout.splitlines()
    ):
        raise BoardCheckFailed(
            f"provision-agent doctor on the board (exit {result.exit_code}):\n"
            f"{result.stdout}{result.stderr[-1500:]}"
        )
    return result.stdout


def diagnostics(guest: GuestAgent) -> str:
    """The last journal lines of both units, for a failure message."""
    result = guest.run(
        f"journalctl -b -u {AGENT_UNIT} -u {CONSOLE_UNIT} -o short-monotonic --no-pager | tail -40",
        timeout=20,
    )
    return result.stdout + result.stderr

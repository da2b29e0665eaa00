"""The shipped systemd units: required settings, and systemd's own security rating."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
AGENT = UNIT_DIR / "provision-agent.service"
CONSOLE = UNIT_DIR / "provision-factory-console.service"
SERVER = UNIT_DIR / "provision-server.service"
MAX_EXPOSURE = 2.0

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """systemd's INI dialect: repeated keys accumulate, ``#``/``;`` lines are comments."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            section = unit.setdefault(stripped[1:-1], {})
            continue
        assert section is not None, f"{path.name}:{number}: setting outside a section"
        assert "=" in stripped, f"{path.name}:{number}: not KEY=value"
        key, value = stripped.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def test_parser_keeps_repeated_keys(tmp_path: Path) -> None:
    path = tmp_path / "x.service"
    path.write_text("[Service]\n# c\nDeviceAllow=a r\nDeviceAllow=b rw\n", encoding="utf-8")
    assert parse_unit(path) == {"Service": {"DeviceAllow": ["a r", "b rw"]}}


def test_agent_unit_is_a_watchdogged_notify_service_with_its_own_user() -> None:
    unit = parse_unit(AGENT)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/bin/provision-agent run",
        "WatchdogSec": "90",
        "Restart": "on-failure",
        "RestartSec": "5",
        "User": "provision-agent",
        "Group": "provision-agent",
        "StateDirectory": "provision-agent",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "provision-agent",
        "ConfigurationDirectoryMode": "0700",
        "UMask": "0077",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert one(unit, "Service", key) == value, key
    assert "DynamicUser" not in unit["Service"]
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # /proc/device-tree (board serial) must stay visible.
    assert "ProcSubset" not in unit["Service"]
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in one(unit, "Unit", "After")
    # Field units never run in factory mode, and vice versa (see the console).
    assert one(unit, "Unit", "ConditionPathExists") == "!/etc/provision-agent/factory-mode"
    assert one(unit, "Unit", "ConditionKernelCommandLine") == "!provision.factory=1"


def test_factory_console_runs_only_in_factory_images_with_tty_access_only() -> None:
    unit = parse_unit(CONSOLE)
    assert one(unit, "Unit", "ConditionPathExists") == "|/etc/provision-agent/factory-mode"
    assert one(unit, "Unit", "ConditionKernelCommandLine") == "|provision.factory=1"
    # Mutual exclusion by the negated conditions alone: a Conflicts= between two
    # units the same target wants drops one start job from the boot transaction.
    assert "Conflicts" not in unit["Unit"]
    service = unit["Service"]
    assert one(unit, "Service", "User") == "provision-agent"
    assert one(unit, "Service", "SupplementaryGroups") == "dialout"
    assert one(unit, "Service", "DevicePolicy") == "closed"
    allowed = {entry.split()[0] for entry in service["DeviceAllow"]}
    assert {"char-ttyS", "char-ttyGS", "char-ttyAMA", "char-ttymxc"} <= allowed
    assert all(entry.startswith("char-tty") for entry in allowed)
    assert one(unit, "Service", "PrivateNetwork") == "yes"
    assert one(unit, "Service", "RestrictAddressFamilies") == "AF_UNIX"
    assert one(unit, "Service", "StateDirectory") == "provision-agent"


def test_server_unit_runs_unprivileged_with_its_own_state() -> None:
    unit = parse_unit(SERVER)
    assert one(unit, "Service", "User") == "provision-server"
    assert one(unit, "Service", "StateDirectory") == "provision-server"
    assert one(unit, "Service", "StateDirectoryMode") == "0711"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"


def _security(path: Path) -> tuple[float, str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stderr


@pytest.mark.parametrize("path", [AGENT, CONSOLE, SERVER], ids=lambda p: p.name)
def test_systemd_analyze_rates_the_unit_low_and_knows_every_key(path: Path) -> None:
    exposure, warnings = _security(path)
    # A misspelt key is only a warning to systemd, so a typo'd hardening
    # option would silently vanish; treat it as a failure.
    assert "Unknown key" not in warnings, warnings
    assert "Unknown section" not in warnings, warnings
    assert exposure <= MAX_EXPOSURE, f"{path.name} exposure {exposure}"


def test_the_rating_catches_a_weakened_unit(tmp_path: Path) -> None:
    weakened = tmp_path / "weak.service"
    kept = [
        line
        for line in AGENT.read_text(encoding="utf-8").splitlines()
        if not line.startswith(("Protect", "Private", "SystemCall", "Restrict", "Capability"))
    ]
    weakened.write_text("\n".join(kept) + "\n", encoding="utf-8")
    exposure, _ = _security(weakened)
    assert exposure > MAX_EXPOSURE


def test_server_unit_reads_the_packaged_config_and_the_passphrase_credential() -> None:
    unit = parse_unit(SERVER)
    exec_start = one(unit, "Service", "ExecStart")
    assert exec_start == "/usr/bin/provision-server run --config /etc/provision-server/server.toml"
    credential = one(unit, "Service", "LoadCredential")
    assert credential == "ca-passphrase:/etc/provision-server/ca-passphrase"
    assert "PROVISION_SERVER_CA_PASSPHRASE_FILE=%d/ca-passphrase" in unit["Service"]["Environment"]


@pytest.mark.parametrize("path", [AGENT, CONSOLE, SERVER], ids=lambda p: p.name)
def test_exec_start_names_a_real_command(path: Path) -> None:
    """The unit's command line parses (docs once named a `serve` that does not exist)."""
    from click.testing import CliRunner

    from agent.cli import main as agent_main
    from server.cli.main import main as server_main

    binary, *args = one(parse_unit(path), "Service", "ExecStart").split()
    entry = {"/usr/bin/provision-agent": agent_main, "/usr/bin/provision-server": server_main}
    result = CliRunner().invoke(entry[binary], [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output

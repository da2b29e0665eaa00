"""load_config / write_config on real files: defaults, overrides, validation, round trip."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import platformdirs
import pytest

from agent.config import (
    SYSTEM_CONFIG_PATH,
    SYSTEM_STATE_DIR,
    AgentConfig,
    default_config_path,
    default_state_dir,
    env_variable,
    load_config,
    to_toml,
    write_config,
)
from agent.errors import ConfigError

FULL = """
[broker]
provisioning_host = "broker.example.net"
provisioning_port = 9883
operational_host = "mqtt.example.net"
operational_port = 9884
ca_bundle = "/etc/ssl/fleet-ca.pem"

[device]
interface = "eth0"
sysfs_root = "sim/sys"
client_id = "board-0001"
state_dir = "/srv/agent-state"

[timing]
request_timeout_s = 5
backoff_initial_s = 0.5
backoff_max_s = 120
heartbeat_s = 30
renew_fraction = 0.75
keepalive_s = 45

[serial]
port = "/dev/ttyGS0"
baud = 921600
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment like systemd's: config and state dirs inside tmp_path."""
    return {
        "CONFIGURATION_DIRECTORY": str(tmp_path / "etc"),
        "STATE_DIRECTORY": str(tmp_path / "state"),
        **extra,
    }


def _write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_default_file_gives_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(env=_env(tmp_path))
    assert cfg.source is None
    assert cfg.broker.provisioning_host is None
    assert cfg.broker.operational_host is None
    assert (cfg.broker.provisioning_port, cfg.broker.operational_port) == (8883, 8884)
    assert cfg.device.state_dir == tmp_path / "state"
    assert cfg.broker.ca_bundle == tmp_path / "state" / "ca-chain.pem"
    assert cfg.device.sysfs_root == Path("/sys")
    assert cfg.device.interface is None and cfg.device.client_id is None
    assert cfg.timing.request_timeout_s == 10
    assert (cfg.timing.backoff_initial_s, cfg.timing.backoff_max_s) == (1, 300)
    assert cfg.timing.heartbeat_s == 60 and cfg.timing.keepalive_s == 60
    assert cfg.timing.renew_fraction == pytest.approx(2 / 3)
    assert cfg.serial.port is None and cfg.serial.baud == 115200


def test_full_file_is_read_with_relative_paths_against_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL)
    cfg = load_config(path, env={})
    assert cfg.source == path
    assert cfg.broker.provisioning_host == "broker.example.net"
    assert cfg.broker.provisioning_port == 9883
    assert cfg.broker.operational_host == "mqtt.example.net"
    assert cfg.broker.operational_port == 9884
    assert cfg.broker.ca_bundle == Path("/etc/ssl/fleet-ca.pem")
    assert cfg.device.interface == "eth0"
    assert cfg.device.sysfs_root == tmp_path / "sim" / "sys"
    assert cfg.device.client_id == "board-0001"
    assert cfg.device.state_dir == Path("/srv/agent-state")
    assert cfg.timing.request_timeout_s == 5.0
    assert isinstance(cfg.timing.request_timeout_s, float)
    assert cfg.timing.backoff_initial_s == 0.5
    assert cfg.timing.renew_fraction == 0.75
    assert cfg.timing.keepalive_s == 45
    assert cfg.serial.port == "/dev/ttyGS0" and cfg.serial.baud == 921600


def test_operational_host_defaults_to_provisioning_host(tmp_path: Path) -> None:
    path = _write(tmp_path, '[broker]\nprovisioning_host = "10.0.0.5"\n')
    cfg = load_config(path, env=_env(tmp_path))
    assert cfg.broker.operational_host == "10.0.0.5"


def test_ca_bundle_follows_a_configured_state_dir(tmp_path: Path) -> None:
    path = _write(tmp_path, '[device]\nstate_dir = "/data/agent"\n')
    cfg = load_config(path, env=_env(tmp_path))
    assert cfg.broker.ca_bundle == Path("/data/agent/ca-chain.pem")


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: config file does not exist"):
        load_config(missing, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env=_env(tmp_path, PROVISION_AGENT_CONFIG=str(missing)))


def test_env_config_path_and_default_directory_are_used(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    _write(tmp_path / "etc", "[serial]\nbaud = 9600\n")
    assert load_config(env=_env(tmp_path)).serial.baud == 9600
    other = _write(tmp_path, "[serial]\nbaud = 57600\n", name="other.toml")
    env = _env(tmp_path, PROVISION_AGENT_CONFIG=str(other))
    assert load_config(env=env).serial.baud == 57600
    assert load_config(env=env).source == other


def test_explicit_path_wins_over_env_path(tmp_path: Path) -> None:
    given = _write(tmp_path, "[serial]\nbaud = 19200\n", name="given.toml")
    env = {"PROVISION_AGENT_CONFIG": str(tmp_path / "absent.toml")}
    assert load_config(given, env=env).serial.baud == 19200


def test_environment_overrides_single_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL)
    env = {
        "PROVISION_AGENT_BROKER_PROVISIONING_HOST": "override.local",
        "PROVISION_AGENT_BROKER_OPERATIONAL_PORT": "1884",
        "PROVISION_AGENT_TIMING_RENEW_FRACTION": "0.5",
        "PROVISION_AGENT_DEVICE_STATE_DIR": "rel/state",
        "PROVISION_AGENT_SERIAL_PORT": "",  # empty: not set, the file value stays
    }
    cfg = load_config(path, env=env)
    assert cfg.broker.provisioning_host == "override.local"
    assert cfg.broker.operational_port == 1884
    assert cfg.timing.renew_fraction == 0.5
    assert cfg.device.state_dir == Path.cwd() / "rel" / "state"
    assert cfg.serial.port == "/dev/ttyGS0"


def test_every_key_has_an_environment_variable() -> None:
    assert env_variable("timing", "keepalive_s") == "PROVISION_AGENT_TIMING_KEEPALIVE_S"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[broker]\nprovisioning_prot = 1\n", r"unknown key \[broker\] provisioning_prot"),
        ("[brokers]\nx = 1\n", r"unknown section \[brokers\]"),
        ("broker = 1\n", r"broker must be a \[broker\] table"),
        ("[broker]\nprovisioning_port = 0\n", r"\[broker\] provisioning_port: expected a TCP port"),
        ("[broker]\noperational_port = 70000\n", r"operational_port: expected a TCP port"),
        ('[broker]\nprovisioning_port = "8883"\n', r"provisioning_port: expected an integer"),
        ("[broker]\nprovisioning_port = true\n", r"provisioning_port: expected an integer"),
        ('[broker]\nprovisioning_host = "mqtts://x"\n', r"provisioning_host: expected a host"),
        ("[timing]\nheartbeat_s = 0\n", r"\[timing\] heartbeat_s: expected a positive number"),
        ("[timing]\nrequest_timeout_s = -1\n", r"request_timeout_s: expected a positive"),
        ("[timing]\nrenew_fraction = 1.0\n", r"renew_fraction: expected a fraction"),
        ("[timing]\nrenew_fraction = 0\n", r"renew_fraction: expected a fraction"),
        ("[timing]\nbackoff_max_s = inf\n", r"backoff_max_s: expected a finite number"),
        ("[timing]\nkeepalive_s = 1.5\n", r"keepalive_s: expected an integer"),
        ("[timing]\nbackoff_initial_s = 600\n", r"backoff_initial_s: expected at most"),
        ('[device]\nclient_id = "has space"\n', r"\[device\] client_id: expected a client id"),
        ('[device]\ninterface = "../../etc"\n', r"interface: expected a network interface"),
        ("[device]\nstate_dir = 5\n", r"state_dir: expected a string"),
        ('[serial]\nport = "ttyS0"\n', r"\[serial\] port: expected an absolute device path"),
        ("[serial]\nbaud = 0\n", r"baud: expected a baud rate"),
        ("[serial\nbaud = 1\n", r"invalid TOML"),
    ],
)
def test_invalid_files_name_the_file_the_key_and_the_expectation(
    tmp_path: Path, text: str, message: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(path) in caught.value.message
    assert caught.value.code.value == "INTERNAL"
    assert re.search(message, caught.value.message), caught.value.message


def test_non_utf8_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[broker]\nprovisioning_host = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PROVISION_AGENT_BROKER_PROVISIONING_PORT", "88x3", "expected an integer"),
        ("PROVISION_AGENT_TIMING_HEARTBEAT_S", "nan", "expected a finite number"),
        ("PROVISION_AGENT_TIMING_HEARTBEAT_S", "-3", "expected a positive number"),
        ("PROVISION_AGENT_PROVISIONING_HOST", "x", "unknown setting"),
    ],
)
def test_invalid_environment_names_the_variable(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(env=_env(tmp_path, **{name: value}))
    assert name in caught.value.message


def test_unreadable_file_is_an_error_even_when_implicit(tmp_path: Path) -> None:
    (tmp_path / "etc" / "agent.toml").mkdir(parents=True)  # a directory: read fails
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(env=_env(tmp_path))


def test_default_locations_for_root_and_for_a_user() -> None:
    assert default_config_path({}, euid=0) == SYSTEM_CONFIG_PATH
    assert default_state_dir({}, euid=0) == SYSTEM_STATE_DIR
    user_config = Path(platformdirs.user_config_dir("provision-agent")) / "agent.toml"
    assert default_config_path({}, euid=1000) == user_config
    assert default_state_dir({}, euid=1000) == Path(platformdirs.user_state_dir("provision-agent"))
    systemd_env = {"STATE_DIRECTORY": "/var/lib/provision-agent:/var/lib/other"}
    assert default_state_dir(systemd_env, euid=1000) == Path("/var/lib/provision-agent")
    assert default_config_path({"CONFIGURATION_DIRECTORY": "/etc/pa"}, euid=1000) == Path(
        "/etc/pa/agent.toml"
    )


def test_write_config_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, FULL), env={})
    target = tmp_path / "out" / "agent.toml"
    target.parent.mkdir()
    target.write_text("old", encoding="utf-8")
    write_config(target, cfg)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(target.parent) == ["agent.toml"]  # no temp file left behind
    again = load_config(target, env={})
    assert again == cfg
    assert again.source == target


def test_to_toml_escapes_awkward_paths(tmp_path: Path) -> None:
    cfg = load_config(env=_env(tmp_path))
    odd = tmp_path / 'quote" back\\slash tab\t del\x7f ü 😀'
    weird = AgentConfig(
        broker=cfg.broker,
        device=type(cfg.device)(
            interface=None, sysfs_root=odd, client_id=None, state_dir=cfg.device.state_dir
        ),
        timing=cfg.timing,
        serial=cfg.serial,
    )
    path = _write(tmp_path, to_toml(weird), name="weird.toml")
    assert load_config(path, env={}).device.sysfs_root == odd

"""The agent's configuration: one TOML file, environment overrides, strict validation.

Everything the agent can be told lives in ``AgentConfig`` and is read in one
place, ``load_config``. Unknown keys, sections and ``PROVISION_AGENT_*``
variables are errors, because a typo that is silently ignored becomes a board
that talks to the wrong broker. The file format is documented in
``docs/agent-config.md``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import platformdirs

from agent import config_values as checks
from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

APP_NAME: Final = "provision-agent"
CONFIG_FILENAME: Final = "agent.toml"
ENV_PREFIX: Final = "PROVISION_AGENT_"
ENV_CONFIG: Final = ENV_PREFIX + "CONFIG"
SYSTEM_CONFIG_PATH: Final = Path("/etc/provision-agent") / CONFIG_FILENAME
SYSTEM_STATE_DIR: Final = Path("/var/lib/provision-agent")
CA_BUNDLE_FILENAME: Final = "ca-chain.pem"


@dataclass(frozen=True)
class BrokerConfig:
    provisioning_host: str | None
    provisioning_port: int
    operational_host: str | None
    operational_port: int
    ca_bundle: Path


@dataclass(frozen=True)
class DeviceConfig:
    interface: str | None
    sysfs_root: Path
    client_id: str | None
    state_dir: Path


@dataclass(frozen=True)
class TimingConfig:
    request_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    heartbeat_s: float
    renew_fraction: float
    keepalive_s: int


@dataclass(frozen=True)
class SerialConfig:
    port: str | None
    baud: int


@dataclass(frozen=True)
class AgentConfig:
    broker: BrokerConfig
    device: DeviceConfig
    timing: TimingConfig
    serial: SerialConfig
    # The file the values came from (None: defaults only); not part of equality.
    source: Path | None = field(default=None, compare=False)


# --- the schema; the value checks live in agent/config_values.py ---


_Check = Callable[[object, bool], Any]

# section -> key -> (checker, default). A default of None means "optional";
# the three path defaults that depend on the environment are filled in later.
_SCHEMA: Final[dict[str, dict[str, tuple[_Check, object]]]] = {
    "broker": {
        "provisioning_host": (checks.host, None),
        "provisioning_port": (checks.port, 8883),
        "operational_host": (checks.host, None),
        "operational_port": (checks.port, 8884),
        "ca_bundle": (checks.path, None),
    },
    "device": {
        "interface": (checks.interface, None),
        "sysfs_root": (checks.path, Path("/sys")),
        "client_id": (checks.client_id, None),
        "state_dir": (checks.path, None),
    },
    "timing": {
        "request_timeout_s": (checks.positive_seconds, 10.0),
        "backoff_initial_s": (checks.positive_seconds, 1.0),
        "backoff_max_s": (checks.positive_seconds, 300.0),
        "heartbeat_s": (checks.positive_seconds, 60.0),
        "renew_fraction": (checks.fraction, 2 / 3),
        "keepalive_s": (checks.keepalive, 60),
    },
    "serial": {
        "port": (checks.device_path, None),
        "baud": (checks.baud, 115200),
    },
}


def env_variable(section: str, key: str) -> str:
    """The environment variable that overrides ``[section] key``."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


_ENV_KEYS: Final = {
    env_variable(section, key): (section, key) for section, keys in _SCHEMA.items() for key in keys
}


# --- default locations ---------------------------------------------------------


def _is_root(euid: int | None) -> bool:
    return (os.geteuid() if euid is None else euid) == 0


def _systemd_dir(env: Mapping[str, str], name: str) -> Path | None:
    # systemd sets these from StateDirectory=/ConfigurationDirectory=; a
    # service user has no usable home, so they take precedence.
    value = env.get(name, "").split(":")[0]
    return Path(value) if value.startswith("/") else None


def default_config_path(env: Mapping[str, str] = os.environ, euid: int | None = None) -> Path:
    """Where the config file is looked for when no path is given."""
    configured = _systemd_dir(env, "CONFIGURATION_DIRECTORY")
    if configured is not None:
        return configured / CONFIG_FILENAME
    if _is_root(euid):
        return SYSTEM_CONFIG_PATH
    return Path(platformdirs.user_config_dir(APP_NAME)) / CONFIG_FILENAME


def default_state_dir(env: Mapping[str, str] = os.environ, euid: int | None = None) -> Path:
    """Where keys, certificates and state live when ``[device] state_dir`` is unset."""
    configured = _systemd_dir(env, "STATE_DIRECTORY")
    if configured is not None:
        return configured
    if _is_root(euid):
        return SYSTEM_STATE_DIR
    return Path(platformdirs.user_state_dir(APP_NAME))


# --- loading -------------------------------------------------------------------


def _read_file(path: Path, explicit: bool) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: config file does not exist") from None
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        document: dict[str, Any] = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return document


def _collect_file_values(document: Mapping[str, Any], path: Path) -> dict[tuple[str, str], object]:
    values: dict[tuple[str, str], object] = {}
    for section, table in document.items():
        if section not in _SCHEMA:
            known = ", ".join(f"[{name}]" for name in _SCHEMA)
            raise ConfigError(f"{path}: unknown section [{section}] (expected one of {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a [{section}] table")
        for key, raw in table.items():
            if key not in _SCHEMA[section]:
                known = ", ".join(_SCHEMA[section])
                raise ConfigError(
                    f"{path}: unknown key [{section}] {key} (expected one of {known})"
                )
            values[(section, key)] = raw
    return values


def _check(
    section: str, key: str, raw: object, origin: str, from_env: bool, base: Path | None
) -> object:
    checker, _ = _SCHEMA[section][key]
    try:
        value = checker(raw, from_env)
    except checks.InvalidValue as exc:
        raise ConfigError(f"{origin}: [{section}] {key}: expected {exc}, got {raw!r}") from None
    if isinstance(value, Path) and not value.is_absolute():
        # File values are relative to the file; environment values to the cwd.
        value = (base / value) if base is not None else value.absolute()
    return value


def load_config(path: Path | None = None, env: Mapping[str, str] = os.environ) -> AgentConfig:
    """Load, override from ``env`` and validate; raises ``ConfigError``.

    The path is ``path`` (from ``--config``), else ``$PROVISION_AGENT_CONFIG``,
    else ``default_config_path(env)``. A missing file is an error only when it
    was named explicitly; otherwise the defaults apply.
    """
    explicit = path is not None or bool(env.get(ENV_CONFIG))
    if path is None:
        path = Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else default_config_path(env)
    path = path.absolute()

    values: dict[tuple[str, str], object] = {}
    document = _read_file(path, explicit)
    if document is not None:
        for (section, key), raw in _collect_file_values(document, path).items():
            values[(section, key)] = _check(section, key, raw, str(path), False, path.parent)

    for name, raw_env in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        if name not in _ENV_KEYS:
            raise ConfigError(
                f"environment variable {name}: unknown setting "
                f"(see docs/agent-config.md for the {ENV_PREFIX}* names)"
            )
        if raw_env == "":
            continue  # Environment=NAME= in a drop-in means "not set"
        section, key = _ENV_KEYS[name]
        origin = f"environment variable {name}"
        values[(section, key)] = _check(section, key, raw_env, origin, True, None)

    return _build(values, env, source=path if document is not None else None)


def _build(
    values: Mapping[tuple[str, str], object], env: Mapping[str, str], source: Path | None
) -> AgentConfig:
    def get(section: str, key: str) -> Any:
        return values.get((section, key), _SCHEMA[section][key][1])

    state_dir = get("device", "state_dir") or default_state_dir(env)
    provisioning_host = get("broker", "provisioning_host")
    timing = TimingConfig(**{key: get("timing", key) for key in _SCHEMA["timing"]})
    where = str(source) if source is not None else "defaults and environment"
    if timing.backoff_initial_s > timing.backoff_max_s:
        raise ConfigError(
            f"{where}: [timing] backoff_initial_s: expected at most backoff_max_s "
            f"({timing.backoff_max_s}), got {timing.backoff_initial_s!r}"
        )
    return AgentConfig(
        broker=BrokerConfig(
            provisioning_host=provisioning_host,
            provisioning_port=get("broker", "provisioning_port"),
            # One broker with two listeners is the common layout.
            operational_host=get("broker", "operational_host") or provisioning_host,
            operational_port=get("broker", "operational_port"),
            ca_bundle=get("broker", "ca_bundle") or state_dir / CA_BUNDLE_FILENAME,
        ),
        device=DeviceConfig(
            interface=get("device", "interface"),
            sysfs_root=get("device", "sysfs_root"),
            client_id=get("device", "client_id"),
            state_dir=state_dir,
        ),
        timing=timing,
        serial=SerialConfig(port=get("serial", "port"), baud=get("serial", "baud")),
        source=source,
    )


# --- writing -------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):  # pragma: no cover - the schema has no booleans
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string is a valid TOML basic string, except that TOML also
    # forbids a raw DEL; non-ASCII stays UTF-8 (no surrogate-pair escapes).
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def to_toml(cfg: AgentConfig) -> str:
    """The config as a TOML document that ``load_config`` reads back equal."""
    lines = ["# provision-agent configuration (docs/agent-config.md)"]
    for section in _SCHEMA:
        part = getattr(cfg, section)
        lines.append("")
        lines.append(f"[{section}]")
        for item in fields(part):
            value = getattr(part, item.name)
            if value is not None:
                lines.append(f"{item.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_config(path: Path, cfg: AgentConfig, mode: int = 0o640) -> None:
    """Atomically replace ``path`` with ``to_toml(cfg)`` (temp file, fsync, rename)."""
    text = to_toml(cfg)
    directory = path.parent
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

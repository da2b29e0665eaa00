"""The station's config file (TOML), validated on load with errors naming key and file.

    [station]
    client_id_pattern = "dev-{mac}"   # {mac} 12 lowercase hex, {MAC} uppercase, {serial}
    [ca]
    dir = "/etc/provision-server/ca"  # needs the factory CA key
    passphrase_file = "/etc/provision-station/ca.pass"   # optional
    [database]
    uri = "mongodb://…/device_provisioning"   # env MONGODB_URI wins
    [endpoints]
    provisioning_host = "mqtt.example.com"
    provisioning_port = 8883
    operational_host = "mqtt.example.com"
    operational_port = 8884
    [serial]
    baud = 115200
    timeout_s = 1.0
    retries = 5

The path is ``--config``, else ``$PROVISION_STATION_CONFIG``, else
``/etc/provision-station/station.toml``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from agent.birth import Endpoints
from agent.protocol import CLIENT_ID_RE, normalise_mac
from server.config import read_passphrase
from server.errors import ConfigError

ENV_CONFIG: Final = "PROVISION_STATION_CONFIG"
DEFAULT_CONFIG_PATH: Final = Path("/etc/provision-station/station.toml")
_KNOWN: Final = {
    "station": {"client_id_pattern"},
    "ca": {"dir", "passphrase_file"},
    "database": {"uri"},
    "endpoints": {"provisioning_host", "provisioning_port", "operational_host", "operational_port"},
    "serial": {"baud", "timeout_s", "retries"},
}


@dataclass(frozen=True)
class StationConfig:
    ca_dir: Path
    mongodb_uri: str
    endpoints: Endpoints
    client_id_pattern: str = "dev-{mac}"
    ca_passphrase_file: Path | None = None
    baud: int = 115200
    timeout_s: float = 1.0
    retries: int = 5

    def client_id(self, mac: str, serial: str) -> str:
        """The clientId the pattern gives this board; ValueError if it is not a valid one."""
        hex_mac = normalise_mac(mac).replace(":", "")
        client_id = self.client_id_pattern.format(
            mac=hex_mac.lower(), MAC=hex_mac.upper(), serial=serial
        )
        if not CLIENT_ID_RE.match(client_id):
            raise ValueError(
                f"clientId {client_id!r} from pattern {self.client_id_pattern!r} is invalid "
                "(1-64 letters, digits, '_', '.', ':' or '-')"
            )
        return client_id

    def ca_passphrase(self) -> bytes | None:
        return read_passphrase(self.ca_passphrase_file)


def _get(doc: Mapping[str, Any], section: str, key: str, where: Path) -> Any:
    value = doc.get(section, {}).get(key)
    if value is None:
        raise ConfigError(f"{where}: [{section}] {key} is required")
    return value


def _typed(value: Any, kind: type, section: str, key: str, where: Path) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where}: [{section}] {key} must be a {kind.__name__}")
    return value


def load_station_config(
    path: Path | None = None, env: Mapping[str, str] = os.environ
) -> StationConfig:
    """Read and validate the station config; ConfigError names the file and the key."""
    if path is None:
        path = Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else DEFAULT_CONFIG_PATH
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read station config {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for section, body in doc.items():
        if section not in _KNOWN or not isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        unknown = set(body) - _KNOWN[section]
        if unknown:
            raise ConfigError(f"{path}: unknown key [{section}] {sorted(unknown)[0]}")

    def typed(section: str, key: str, kind: type, default: Any = None) -> Any:
        raw = doc.get(section, {}).get(key, default)
        if raw is None:
            raw = _get(doc, section, key, path)
        return _typed(raw, kind, section, key, path)

    passphrase = doc.get("ca", {}).get("passphrase_file")
    uri = env.get("MONGODB_URI") or typed("database", "uri", str)
    endpoints = Endpoints(
        provisioning_host=typed("endpoints", "provisioning_host", str),
        provisioning_port=typed("endpoints", "provisioning_port", int),
        operational_host=typed("endpoints", "operational_host", str),
        operational_port=typed("endpoints", "operational_port", int),
    )
    for key in ("provisioning_port", "operational_port"):
        if not 0 < getattr(endpoints, key) < 65536:
            raise ConfigError(f"{path}: [endpoints] {key} must be 1-65535")
    config = StationConfig(
        ca_dir=Path(typed("ca", "dir", str)),
        mongodb_uri=uri,
        endpoints=endpoints,
        client_id_pattern=typed("station", "client_id_pattern", str, "dev-{mac}"),
        ca_passphrase_file=Path(_typed(passphrase, str, "ca", "passphrase_file", path))
        if passphrase is not None
        else None,
        baud=typed("serial", "baud", int, 115200),
        timeout_s=typed("serial", "timeout_s", float, 1.0),
        retries=typed("serial", "retries", int, 5),
    )
    if config.timeout_s <= 0 or config.retries < 0 or config.baud <= 0:
        raise ConfigError(f"{path}: [serial] timeout_s, baud must be > 0 and retries >= 0")
    try:
        config.client_id("00:00:00:00:00:01", "SERIAL0")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{path}: [station] client_id_pattern {config.client_id_pattern!r} is unusable "
            f"({exc}); use {{mac}}, {{MAC}} or {{serial}}"
        ) from None
    return config


def write_station_config(path: Path, config: StationConfig) -> None:
    """Write ``config`` as TOML (used by tests and the laptop demo)."""
    ep = config.endpoints
    lines = [
        "[station]",
        f"client_id_pattern = {_quote(config.client_id_pattern)}",
        "[ca]",
        f"dir = {_quote(str(config.ca_dir))}",
    ]
    if config.ca_passphrase_file is not None:
        lines.append(f"passphrase_file = {_quote(str(config.ca_passphrase_file))}")
    lines += [
        "[database]",
        f"uri = {_quote(config.mongodb_uri)}",
        "[endpoints]",
        f"provisioning_host = {_quote(ep.provisioning_host)}",
        f"provisioning_port = {ep.provisioning_port}",
        f"operational_host = {_quote(ep.operational_host)}",
        f"operational_port = {ep.operational_port}",
        "[serial]",
        f"baud = {config.baud}",
        f"timeout_s = {config.timeout_s}",
        f"retries = {config.retries}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

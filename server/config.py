"""Server configuration: one TOML file plus environment overrides, validated once.

Keys (all optional; section.key):

    database.uri                 MongoDB URI (env MONGODB_URI wins)
    ca.dir                       CA directory written by `provision-server ca init`
    ca.passphrase_file           file holding the CA keys' passphrase
    broker.host / broker.port    the broker's loopback listener for the server identity
    broker.config_dir            directory of `provision-server broker-config`; enables
                                 ACL/CRL sync with the running broker
    policy.token_lifetime_s      300
    policy.token_min_interval_s  1    (a device gets at most one token per interval)
    policy.certificate_validity_days   90
    policy.not_allocated_retry_s 60
    policy.offline_timeout_s     180  (an ACTIVE device silent this long becomes OFFLINE)
    policy.status_write_interval_s     30  (heartbeat writes per device, at most)
    policy.reprovision           "approval" | "offline" | "always" (docs/server.md)
    policy.reprovision_offline_after_s 3600 (policy "offline": OFFLINE this long)
    policy.reprovision_retry_s   60   (retryAfter of REPROVISION_NOT_APPROVED)
    policy.renew_min_interval_s  60   (a device gets at most one certificate per interval)
    service.workers              32   (requests in flight; they share database round
                                 trips through group commit, so more wait cheaply)
    service.db_batches_in_flight 3    (group-commit batches out at once: more for a
                                 database far away, 1 for one that is CPU-bound beside
                                 the server: fewer, larger batches; docs/performance.md)
    metrics.port                 none (no metrics); `run --metrics-port` serves Prometheus
                                 metrics on http://<metrics.host>:<port>/metrics
    metrics.host                 127.0.0.1 (loopback: put a reverse proxy or the scraper
                                 on the same host before exposing it)

Every key can be overridden with PROVISION_SERVER_<SECTION>_<KEY>.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from agent.storage import fsync_dir, temp_name, write_new_file
from server.errors import ConfigError

ENV_PREFIX: Final = "PROVISION_SERVER_"
PASSPHRASE_BYTES: Final = 32
# server.service.policy.ReprovisionPolicy's values (config does not import the service).
REPROVISION_POLICIES: Final = ("approval", "offline", "always")


def read_passphrase(path: Path | None) -> bytes | None:
    """The CA keys' passphrase from ``path`` (surrounding whitespace stripped), None without a file.

    ConfigError (naming the file) when it cannot be read or holds nothing.
    """
    if path is None:
        return None
    try:
        passphrase = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read CA passphrase file {path}: {exc.strerror}") from None
    if not passphrase:
        raise ConfigError(f"CA passphrase file {path} is empty")
    return passphrase


def create_passphrase_file(path: Path) -> bool:
    """Write a new random passphrase to ``path`` (mode 0600) unless it exists; True if written.

    The file is written under a temporary name and linked into place, so a crash leaves
    no file or a whole one, and an existing passphrase is never replaced.
    """
    if path.exists():
        return False
    passphrase = secrets.token_urlsafe(PASSPHRASE_BYTES).encode() + b"\n"
    temporary = temp_name(path)
    try:
        write_new_file(temporary, passphrase, 0o600)
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot create CA passphrase file {path}: {exc.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


@dataclass(frozen=True)
class ServerConfig:
    mongodb_uri: str = "mongodb://127.0.0.1:27017/device_provisioning"
    ca_dir: Path = Path("/etc/provision-server/ca")
    ca_passphrase_file: Path | None = None
    broker_host: str = "127.0.0.1"
    broker_port: int = 8885
    broker_config_dir: Path | None = None
    token_lifetime_s: float = 300.0
    token_min_interval_s: float = 1.0
    certificate_validity_days: float = 90.0
    not_allocated_retry_s: float = 60.0
    offline_timeout_s: float = 180.0
    status_write_interval_s: float = 30.0
    reprovision: str = "approval"
    reprovision_offline_after_s: float = 3600.0
    reprovision_retry_s: float = 60.0
    renew_min_interval_s: float = 60.0
    workers: int = 32
    db_batches_in_flight: int = 3
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.reprovision not in REPROVISION_POLICIES:
            raise ConfigError(
                f"policy.reprovision: expected one of {', '.join(REPROVISION_POLICIES)}, "
                f"got {self.reprovision!r}"
            )

    def ca_passphrase(self) -> bytes | None:
        return read_passphrase(self.ca_passphrase_file)


# section.key in the file -> dataclass field
_KEYS: Final = {
    ("database", "uri"): "mongodb_uri",
    ("ca", "dir"): "ca_dir",
    ("ca", "passphrase_file"): "ca_passphrase_file",
    ("broker", "host"): "broker_host",
    ("broker", "port"): "broker_port",
    ("broker", "config_dir"): "broker_config_dir",
    ("policy", "token_lifetime_s"): "token_lifetime_s",
    ("policy", "token_min_interval_s"): "token_min_interval_s",
    ("policy", "certificate_validity_days"): "certificate_validity_days",
    ("policy", "not_allocated_retry_s"): "not_allocated_retry_s",
    ("policy", "offline_timeout_s"): "offline_timeout_s",
    ("policy", "status_write_interval_s"): "status_write_interval_s",
    ("policy", "reprovision"): "reprovision",
    ("policy", "reprovision_offline_after_s"): "reprovision_offline_after_s",
    ("policy", "reprovision_retry_s"): "reprovision_retry_s",
    ("policy", "renew_min_interval_s"): "renew_min_interval_s",
    ("service", "workers"): "workers",
    ("service", "db_batches_in_flight"): "db_batches_in_flight",
    ("metrics", "port"): "metrics_port",
    ("metrics", "host"): "metrics_host",
}
_TYPES: Final = {f.name: f.type for f in fields(ServerConfig)}


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = str(_TYPES[name])
    try:
        if "Path" in kind:
            if not isinstance(value, str) or not value:
                raise ValueError("a non-empty path")
            return Path(value)
        if kind in ("int", "int | None"):
            number = int(value)
            if isinstance(value, float) or number <= 0 or number > 65535:
                raise ValueError("a positive integer up to 65535")
            return number
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("a positive number")
            real = float(value)
            if not real > 0:
                raise ValueError("a positive number")
            return real
        if not isinstance(value, str) or not value:
            raise ValueError("a non-empty string")
        return value
    except (TypeError, ValueError) as exc:
        expected = exc.args[0] if exc.args and " " in str(exc.args[0]) else kind
        raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None


def load_server_config(
    path: Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> ServerConfig:
    """Defaults < file < PROVISION_SERVER_* env < MONGODB_URI < explicit overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: {section!r} must be a [section]")
            for key, value in table.items():
                name = _KEYS.get((section, key))
                if name is None:
                    raise ConfigError(f"{path}: unknown key {section}.{key}")
                base = path.parent
                coerced = _coerce(name, value, f"{path}: {section}.{key}")
                if isinstance(coerced, Path) and not coerced.is_absolute():
                    coerced = base / coerced
                values[name] = coerced
    known_env = {ENV_PREFIX + f"{s}_{k}".upper(): n for (s, k), n in _KEYS.items()}
    for var, value in env.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        name = known_env.get(var)
        if name is None:
            raise ConfigError(f"environment variable {var} is not a server setting")
        values[name] = _coerce(name, value, f"environment {var}")
    if env.get("MONGODB_URI"):
        values["mongodb_uri"] = env["MONGODB_URI"]
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(
                name, str(value) if isinstance(value, Path) else value, f"option {name}"
            )
    return ServerConfig(**values)

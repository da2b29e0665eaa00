"""Mosquitto configuration: three mTLS listeners, per-listener ACLs, the CRLs, the plugin.

Everything the broker reads lives in one directory (``BrokerLayout.directory``), so
Mosquitto, which drops root to its own user before it reads anything, needs read access
to this directory only (never to the CA's)::

    mosquitto.conf        listeners, TLS, the server listener's ACL file, the plugin
    acl-server            the server identity: provisioning/#, devices/#, fleet/#, control
    acl-operational       operational certificates: tier patterns + per-device user blocks,
                          read by the plugin (plugin_opt_rights_file), not by Mosquitto
    crl.pem               device CA CRL, loaded by the server and operational listeners
    factory-crl.pem       factory CA CRL, loaded by the provisioning listener
    broker.pem, broker.key, device-ca-chain.pem, factory-ca-chain.pem
                          copies of the CA's files (server/broker/broker_assets.py)
    provisioning_guard.so the plugin (server/broker/guard_plugin.py): SUBSCRIBE checks,
                          the birth and operational certificates' ACLs, rights changes,
                          reload and kick over MQTT

Files are mode 0640 in a setgid 0750 directory whose group is Mosquitto's: nothing in it
is world-readable. Mosquitto's pid and log files go to ``runtime_dir`` when one is set
(the local harness); under systemd there is none (main PID, journal).
The ACL file is rendered by server/broker/acl_rules.py from ``device_acls`` documents
(validated rule by rule, so no database write can inject an ACL line).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.storage import atomic_write
from server.broker.acl_rules import InvalidRule as InvalidRule  # "X as X": re-exported for tests
from server.broker.acl_rules import render_operational_acl as render_operational_acl
from server.broker.acl_rules import render_server_acl
from server.broker.acl_rules import validate_rule as validate_rule
from server.broker.guard_plugin import PLUGIN_NAME
from server.errors import ServerError
from server.pki.ca import CaPaths

log = logging.getLogger(__name__)

MAX_PACKET_BYTES: Final = 1024 * 1024
BROKER_FILE_MODE: Final = 0o640
"""Readable by Mosquitto's group, by nobody else (the broker key is one of these files)."""
BROKER_DIR_MODE: Final = 0o2750
"""setgid: files created in it (the sync's atomic replacements) get the directory's group."""
DEFAULT_BROKER_USER: Final = "mosquitto"


class BrokerError(ServerError):
    """The broker's files cannot be written or the broker cannot be reloaded."""


@dataclass(frozen=True)
class BrokerLayout:
    """Where the broker's files live and which ports it listens on."""

    directory: Path
    ca: CaPaths
    provisioning_port: int
    operational_port: int
    server_port: int
    device_bind: str = "0.0.0.0"  # noqa: S104 (devices connect from the network)
    run_as: str | None = None
    """Mosquitto's ``user`` option (it drops root to this user; default ``mosquitto``)."""
    runtime_dir: Path | None = None
    """Where Mosquitto writes its pid and log files (it must be able to); None: neither."""

    @property
    def conf_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def acl_server(self) -> Path:
        return self.directory / "acl-server"

    @property
    def acl_operational(self) -> Path:
        return self.directory / "acl-operational"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def factory_crl_path(self) -> Path:
        return self.directory / "factory-crl.pem"

    @property
    def broker_cert(self) -> Path:
        return self.directory / "broker.pem"

    @property
    def broker_key(self) -> Path:
        return self.directory / "broker.key"

    @property
    def device_ca_chain(self) -> Path:
        return self.directory / "device-ca-chain.pem"

    @property
    def factory_ca_chain(self) -> Path:
        return self.directory / "factory-ca-chain.pem"

    @property
    def guard_plugin(self) -> Path:
        return self.directory / PLUGIN_NAME

    @property
    def pid_path(self) -> Path:
        return (self.runtime_dir or self.directory) / "mosquitto.pid"

    @property
    def log_path(self) -> Path:
        return (self.runtime_dir or self.directory) / "mosquitto.log"

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.server_port, self.provisioning_port, self.operational_port)


# --- mosquitto.conf -----------------------------------------------------------


def _conf_value(value: object) -> str:
    text = str(value)
    if any(c in text for c in "\r\n\0") or text != text.strip():
        raise BrokerError(f"{text!r} cannot be written into mosquitto.conf")
    return text


def render_mosquitto_conf(layout: BrokerLayout) -> str:
    """The whole ``mosquitto.conf``: three TLS listeners, each with its ACL and the plugin."""
    v = _conf_value
    lines = [
        "# Generated by server.broker.mosquitto_conf; rewritten on every sync, do not edit.",
        "per_listener_settings true",
        "persistence false",
    ]
    if layout.runtime_dir is not None:
        lines += [f"pid_file {v(layout.pid_path)}", f"log_dest file {v(layout.log_path)}"]
    else:
        lines.append("log_dest stderr")  # systemd: the journal
    lines += [
        *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"max_packet_size {MAX_PACKET_BYTES}",
        # Nagle's algorithm held small responses up to 40 ms behind delayed ACKs:
        # first boot to ACTIVE 406 -> 210 ms with this line (docs/performance.md).
        "set_tcp_nodelay true",
    ]
    if layout.run_as:
        lines.append(f"user {v(layout.run_as)}")

    def listener(name: str, title: str, port: int, bind: str, cafile: Path, crl: Path) -> list[str]:
        return [
            "",
            f"# {title}",
            f"listener {int(port)} {v(bind)}",
            f"certfile {v(layout.broker_cert)}",
            f"keyfile {v(layout.broker_key)}",
            f"cafile {v(cafile)}",
            f"crlfile {v(crl)}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "allow_anonymous false",
            f"plugin {v(layout.guard_plugin)}",
            f"plugin_opt_listener {name}",
        ]

    # Both chains end at the same root, so a cafile alone would let a birth certificate
    # (sent with its factory CA) onto a device-CA listener and vice versa. Every listener
    # therefore loads a CRL: OpenSSL then refuses any leaf whose issuer has no CRL in the
    # file. The device CA's CRL keeps birth certificates off the server and operational
    # listeners; the factory CA's keeps operational certificates off the provisioning one.
    lines += listener(
        "server", "server: the provisioning server's own identity (device CA), loopback only",
        layout.server_port, "127.0.0.1", layout.device_ca_chain, layout.crl_path,
    )  # fmt: skip
    # Several server processes share one identity: their client ids stay their own.
    lines += ["use_identity_as_username true", f"acl_file {v(layout.acl_server)}"]
    lines += listener(
        "provisioning", "provisioning: birth certificates (factory CA) + factory CRL",
        layout.provisioning_port, layout.device_bind, layout.factory_ca_chain,
        layout.factory_crl_path,
    )  # fmt: skip
    # Username "CN=<clientId>" (the whole subject): never equal to an operational username,
    # so a birth session cannot take over (or inherit the rights of) an operational one.
    # The plugin is this listener's whole ACL.
    lines += ["use_subject_as_username true", "use_username_as_clientid true"]
    lines += listener(
        "operational", "operational: operational certificates (device CA) + device CRL",
        layout.operational_port, layout.device_bind, layout.device_ca_chain, layout.crl_path,
    )  # fmt: skip
    lines += [
        "use_identity_as_username true",
        "use_username_as_clientid true",  # a certificate cannot take another client id
        # No acl_file: the plugin is this listener's whole ACL. It reads the same generated
        # file into a hash table (at start and at every reload) and takes single devices'
        # changes over its control topic, so a rule change needs no reload.
        f"plugin_opt_rights_file {v(layout.acl_operational)}",
    ]
    return "\n".join(lines) + "\n"


# --- the directory Mosquitto reads ----------------------------------------------


def broker_group(layout: BrokerLayout) -> int | None:
    """The gid of Mosquitto's user (``run_as``, else ``mosquitto``); None if no such user."""
    try:
        return pwd.getpwnam(layout.run_as or DEFAULT_BROKER_USER).pw_gid
    except KeyError:
        return None


def prepare_broker_directory(layout: BrokerLayout, *, enforce: bool = False) -> None:
    """Create the directory: mode 2750, group = Mosquitto's (its files inherit the group).

    An existing directory is left as it is unless ``enforce`` (broker-config): the sync
    may run where it cannot see Mosquitto's group (systemd's PrivateUsers=).
    """
    directory = layout.directory
    if directory.is_dir() and not enforce:
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    gid = broker_group(layout)
    st = directory.stat()
    try:
        if gid is not None and st.st_gid != gid:
            os.chown(directory, -1, gid)
        if stat.S_IMODE(st.st_mode) != BROKER_DIR_MODE:
            os.chmod(directory, BROKER_DIR_MODE)
    except PermissionError:
        group = grp.getgrgid(gid).gr_name if gid is not None else "?"
        raise BrokerError(
            f"cannot give group {group} read access to {directory}: run broker-config as root "
            f"or as a member of {group}"
        ) from None


# --- writing and reloading -------------------------------------------------------


def replace_if_changed(path: Path, data: bytes, mode: int = BROKER_FILE_MODE) -> bool:
    """Atomically replace ``path`` unless it already holds ``data``; True if written.

    Unchanged files keep their mtime, so callers can skip the broker reload.
    """
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == data and stat.S_IMODE(path.stat().st_mode) == mode:
            return False
    atomic_write(path, data, mode)
    return True


def write_broker_files(
    layout: BrokerLayout,
    acl_docs: Iterable[Mapping[str, Any]],
    revoked_device_ids: Iterable[str],
    crl_pem: bytes | None,
    factory_crl_pem: bytes | None = None,
    *,
    operational_acl: str | None = None,
) -> bool:
    """Write conf, ACLs and (unless ``None``) the two CRLs; True if any file changed.

    Callers reload the broker only when this returns True. A CRL given as ``None`` keeps
    the file already there (it must exist). ``operational_acl``, when given, is the
    rendered ACL (the sync renders it incrementally) and the two iterables are ignored.
    """
    return bool(
        update_broker_files(
            layout, acl_docs, revoked_device_ids, crl_pem, factory_crl_pem,
            operational_acl=operational_acl,
        )
    )  # fmt: skip


def update_broker_files(
    layout: BrokerLayout,
    acl_docs: Iterable[Mapping[str, Any]],
    revoked_device_ids: Iterable[str],
    crl_pem: bytes | None,
    factory_crl_pem: bytes | None = None,
    *,
    operational_acl: str | None = None,
) -> frozenset[Path]:
    """``write_broker_files``, returning the paths it replaced (the sync changes rights
    without a reload when only the operational ACL changed)."""
    prepare_broker_directory(layout)
    if operational_acl is None:
        operational_acl = render_operational_acl(acl_docs, revoked_device_ids)
    files: list[tuple[Path, bytes]] = [
        (layout.conf_path, render_mosquitto_conf(layout).encode()),
        (layout.acl_server, render_server_acl().encode()),
        (layout.acl_operational, operational_acl.encode()),
    ]
    for path, pem in ((layout.crl_path, crl_pem), (layout.factory_crl_path, factory_crl_pem)):
        if pem is not None:
            files.append((path, pem))
        elif not path.exists():
            raise BrokerError(f"{path} is missing and no CRL was given for it")
    try:
        return frozenset(path for path, data in files if replace_if_changed(path, data))
    except OSError as exc:
        raise BrokerError(f"cannot write broker files in {layout.directory}: {exc}") from None

"""Mosquitto configuration: three mTLS listeners, per-listener ACL files, the CRL.

Everything the broker reads lives in one directory (``BrokerLayout.directory``)::

    mosquitto.conf      listeners, TLS, one acl_file per listener (per_listener_settings)
    acl-server          the server identity: provisioning/# and devices/# (127.0.0.1 only)
    acl-provisioning    birth certificates: only their own request/response topics
    acl-operational     operational certificates: tier patterns + per-device user blocks
    crl.pem             device CA CRL, loaded by the server and operational listeners
    factory-crl.pem     factory CA CRL, loaded by the provisioning listener
    mosquitto.pid       written by Mosquitto; ``reload_broker`` sends SIGHUP to it
    mosquitto.log

The ACL files are generated from ``device_acls`` documents (see docs/broker.md for the
tiers and rules). A rule the web app stored is never copied into the file unchecked:
topics are validated (no newline, no ``%`` substitution, wildcards only as whole levels,
allow rules stay out of other devices' and the provisioning namespace) and invalid rules
are skipped and logged, so no database write can inject an ACL line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.protocol import CLIENT_ID_RE, DEVICES_PREFIX, PROVISIONING_PREFIX
from agent.storage import atomic_write
from server.ca import SERVER_CLIENT_CN, CaPaths, CertificateAuthority
from server.errors import ServerError
from server.local_services import MosquittoBroker, free_port
from server.schema import DeviceTier

if TYPE_CHECKING:
    from server.db import Database

log = logging.getLogger(__name__)

MAX_TOPIC_BYTES: Final = 256
MAX_RULES_PER_DEVICE: Final = 64
MAX_PACKET_BYTES: Final = 1024 * 1024
LOCAL_READY_TIMEOUT_S: Final = 10.0
BROKER_FILE_MODE: Final = 0o644  # Mosquitto may run as another user after dropping root

RULE_ACTIONS: Final = {"publish": "write", "subscribe": "read", "both": "readwrite"}
"""``device_acls.rules[].action`` -> Mosquitto access keyword."""

# Rights of every operational certificate (ACL ``pattern`` lines, %u = CN = clientId).
# Tier '1' is the default tier, so its rights are part of the baseline.
BASE_PATTERNS: Final = (
    ("write", f"{DEVICES_PREFIX}/%u/status"),
    ("write", f"{DEVICES_PREFIX}/%u/cert/renew"),
    ("read", f"{DEVICES_PREFIX}/%u/cert/renew/response"),
    ("write", f"{DEVICES_PREFIX}/%u/telemetry/#"),
    ("read", f"{DEVICES_PREFIX}/%u/commands/#"),
)
PROVISIONING_PATTERNS: Final = (
    ("write", f"{PROVISIONING_PREFIX}/%u/request"),
    ("read", f"{PROVISIONING_PREFIX}/%u/response"),
)
SERVER_TOPICS: Final = (
    ("readwrite", f"{PROVISIONING_PREFIX}/#"),
    ("readwrite", f"{DEVICES_PREFIX}/#"),
    ("readwrite", "fleet/#"),
)


def _tier_topics(client_id: str, tier: DeviceTier) -> list[tuple[str, str]]:
    """Rights above the baseline, as literal topics for the device's user block."""
    topics: list[tuple[str, str]] = []
    if tier in (DeviceTier.TIER_2, DeviceTier.TIER_3):
        topics.append(("readwrite", f"{DEVICES_PREFIX}/{client_id}/#"))
    if tier is DeviceTier.TIER_3:
        topics.append(("read", "fleet/#"))
    return topics


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

    @property
    def conf_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def acl_server(self) -> Path:
        return self.directory / "acl-server"

    @property
    def acl_provisioning(self) -> Path:
        return self.directory / "acl-provisioning"

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
    def pid_path(self) -> Path:
        return self.directory / "mosquitto.pid"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

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
    """The whole ``mosquitto.conf``: three TLS listeners, each with its own ACL file."""
    v = _conf_value
    lines = [
        "# Generated by server.broker_config; rewritten on every sync, do not edit.",
        "per_listener_settings true",
        "persistence false",
        f"pid_file {v(layout.pid_path)}",
        f"log_dest file {v(layout.log_path)}",
        *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"max_packet_size {MAX_PACKET_BYTES}",
    ]
    if layout.run_as:
        lines.append(f"user {v(layout.run_as)}")

    def listener(title: str, port: int, bind: str, cafile: Path, acl: Path, crl: Path) -> list[str]:
        block = [
            "",
            f"# {title}",
            f"listener {int(port)} {v(bind)}",
            f"certfile {v(layout.ca.broker_cert)}",
            f"keyfile {v(layout.ca.broker_key)}",
            f"cafile {v(cafile)}",
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
            f"acl_file {v(acl)}",
            f"crlfile {v(crl)}",
        ]
        return block

    # Both chains end at the same root, so a cafile alone would let a birth certificate
    # (sent with its factory CA) onto a device-CA listener and vice versa. Every listener
    # therefore loads a CRL: OpenSSL then refuses any leaf whose issuer has no CRL in the
    # file. The device CA's CRL keeps birth certificates off the server and operational
    # listeners; the factory CA's keeps operational certificates off the provisioning one.
    lines += listener(
        "server: the provisioning server's own identity (device CA), loopback only",
        layout.server_port, "127.0.0.1", layout.ca.device_ca_chain, layout.acl_server,
        layout.crl_path,
    )  # fmt: skip
    lines += listener(
        "provisioning: birth certificates (factory CA) + factory CRL",
        layout.provisioning_port, layout.device_bind, layout.ca.factory_ca_chain,
        layout.acl_provisioning, layout.factory_crl_path,
    )  # fmt: skip
    lines += listener(
        "operational: operational certificates (device CA) + device CRL",
        layout.operational_port, layout.device_bind, layout.ca.device_ca_chain,
        layout.acl_operational, layout.crl_path,
    )  # fmt: skip
    return "\n".join(lines) + "\n"


# --- ACL files ----------------------------------------------------------------

_HEADER: Final = "# Generated by server.broker_config from device_acls; do not edit.\n"


@dataclass(frozen=True)
class AclRule:
    """One validated explicit rule: Mosquitto access keyword (or ``deny``) and topic."""

    access: str
    topic: str


class InvalidRule(ValueError):
    """An explicit ACL rule that is not written into the ACL file."""


def validate_topic_filter(topic: object) -> str:
    """A topic filter safe to write after ``topic <access> `` in an ACL file."""
    if not isinstance(topic, str) or not topic:
        raise InvalidRule("topic must be a non-empty string")
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise InvalidRule(f"topic longer than {MAX_TOPIC_BYTES} bytes")
    for char in topic:
        # isprintable() is False for newlines, NUL, other controls and line separators.
        if not char.isprintable() or char.isspace():
            raise InvalidRule("topic contains whitespace or a control character")
    if "%" in topic:
        raise InvalidRule("topic contains '%' (ACL substitution is reserved)")
    if topic.startswith("$"):
        raise InvalidRule("topics starting with '$' are reserved for the broker")
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if level == "":
            raise InvalidRule("topic has an empty level")
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise InvalidRule("'#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise InvalidRule("'+' must be a whole level")
    return topic


def validate_rule(rule: object, client_id: str) -> AclRule:
    """Check one ``{action, topic, allow}`` rule of a device; raise InvalidRule if unsafe."""
    if not isinstance(rule, Mapping):
        raise InvalidRule("rule is not an object")
    action, allow = rule.get("action"), rule.get("allow")
    if not isinstance(action, str) or action.lower() not in RULE_ACTIONS:
        raise InvalidRule(f"action must be one of {', '.join(RULE_ACTIONS)}")
    if not isinstance(allow, bool):
        raise InvalidRule("allow must be true or false")
    topic = validate_topic_filter(rule.get("topic"))
    if not allow:
        # A deny only takes rights away (Mosquitto checks denials first); any topic is fine.
        # Mosquitto's deny covers both directions, whatever the action says.
        return AclRule("deny", topic)
    levels = topic.split("/")
    if levels[0] in ("+", "#", PROVISIONING_PREFIX):
        raise InvalidRule("an allow rule may not reach the provisioning namespace")
    if levels[0] == DEVICES_PREFIX and (len(levels) < 2 or levels[1] != client_id):
        raise InvalidRule(f"an allow rule under {DEVICES_PREFIX}/ must stay in the device's own")
    return AclRule(RULE_ACTIONS[action.lower()], topic)


def _tier(value: object, client_id: str) -> DeviceTier:
    try:
        return DeviceTier(str(value)) if value is not None else DeviceTier.TIER_1
    except ValueError:
        log.warning("event=acl_bad_tier device_id=%s tier=%r using=1", client_id, value)
        return DeviceTier.TIER_1


def _device_block(doc: Mapping[str, Any], client_id: str) -> list[str]:
    rules: list[AclRule] = []
    raw_rules = doc.get("rules") or []
    if not isinstance(raw_rules, list):
        log.warning("event=acl_rules_not_a_list device_id=%s", client_id)
        raw_rules = []
    for index, raw in enumerate(raw_rules):
        if index >= MAX_RULES_PER_DEVICE:
            log.warning("event=acl_too_many_rules device_id=%s kept=%d", client_id, index)
            break
        try:
            rules.append(validate_rule(raw, client_id))
        except InvalidRule as exc:
            log.warning(
                "event=acl_rule_skipped device_id=%s index=%d reason=%s", client_id, index, exc
            )
    grants = _tier_topics(client_id, _tier(doc.get("tier"), client_id))
    grants += [(r.access, r.topic) for r in rules if r.access != "deny"]
    denies = [("deny", r.topic) for r in rules if r.access == "deny"]
    entries = list(dict.fromkeys(denies + grants))  # order kept, duplicates dropped
    return [f"topic {access} {topic}" for access, topic in entries]


def render_operational_acl(
    acl_docs: Iterable[Mapping[str, Any]], revoked_device_ids: Iterable[str]
) -> str:
    """ACL of the operational listener.

    Baseline (tier '1') rights are ``pattern`` lines, which apply to every user. Tiers '2'
    and '3' and explicit rules become a ``user <clientId>`` block after them. A device
    whose current certificate is revoked gets ``topic deny #`` instead: Mosquitto checks
    a user's denials before any grant, so its live session loses every right at reload.
    """
    revoked = {d for d in revoked_device_ids if isinstance(d, str) and CLIENT_ID_RE.match(d)}
    blocks: dict[str, list[str]] = {}
    for doc in acl_docs:
        client_id = doc.get("device_id")
        if not isinstance(client_id, str) or not CLIENT_ID_RE.match(client_id):
            log.warning("event=acl_doc_skipped reason=bad_device_id device_id=%r", client_id)
            continue
        if client_id == SERVER_CLIENT_CN:
            log.warning("event=acl_doc_skipped reason=reserved_device_id device_id=%s", client_id)
            continue
        if client_id in revoked or client_id in blocks:
            continue
        lines = _device_block(doc, client_id)
        if lines:
            blocks[client_id] = lines
    for client_id in revoked - {SERVER_CLIENT_CN}:
        blocks[client_id] = ["topic deny #"]
    out = [_HEADER, *(f"pattern {access} {topic}\n" for access, topic in BASE_PATTERNS)]
    for client_id in sorted(blocks):
        out.append(f"\nuser {client_id}\n")
        out.extend(line + "\n" for line in blocks[client_id])
    return "".join(out)


def render_provisioning_acl() -> str:
    """Birth certificates: write their own request topic, read their own response topic."""
    return _HEADER + "".join(f"pattern {a} {t}\n" for a, t in PROVISIONING_PATTERNS)


def render_server_acl() -> str:
    return (
        _HEADER
        + f"user {SERVER_CLIENT_CN}\n"
        + "".join(f"topic {a} {t}\n" for a, t in SERVER_TOPICS)
    )


# --- writing and reloading -------------------------------------------------------


def _replace_if_changed(path: Path, data: bytes) -> bool:
    """Atomically replace ``path`` (mode 0644) unless it already holds ``data``.

    Unchanged files keep their mtime, so callers can skip the broker reload.
    """
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == data:
            return False
    atomic_write(path, data, BROKER_FILE_MODE)
    return True


def write_broker_files(
    layout: BrokerLayout,
    acl_docs: Iterable[Mapping[str, Any]],
    revoked_device_ids: Iterable[str],
    crl_pem: bytes | None,
    factory_crl_pem: bytes | None = None,
) -> bool:
    """Write conf, ACLs and (unless ``None``) the two CRLs; True if any file changed.

    Callers SIGHUP the broker only when this returns True. A CRL given as ``None``
    keeps the file already there (it must exist).
    """
    layout.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    files: list[tuple[Path, bytes]] = [
        (layout.conf_path, render_mosquitto_conf(layout).encode()),
        (layout.acl_server, render_server_acl().encode()),
        (layout.acl_provisioning, render_provisioning_acl().encode()),
        (layout.acl_operational, render_operational_acl(acl_docs, revoked_device_ids).encode()),
    ]
    for path, pem in ((layout.crl_path, crl_pem), (layout.factory_crl_path, factory_crl_pem)):
        if pem is not None:
            files.append((path, pem))
        elif not path.exists():
            raise BrokerError(f"{path} is missing and no CRL was given for it")
    try:
        changed = [_replace_if_changed(path, data) for path, data in files]
    except OSError as exc:
        raise BrokerError(f"cannot write broker files in {layout.directory}: {exc}") from None
    return any(changed)


def _broker_pid(layout: BrokerLayout) -> int:
    try:
        text = layout.pid_path.read_text().strip()
    except FileNotFoundError:
        raise BrokerError(
            f"no pid file {layout.pid_path}: is Mosquitto running with this configuration?"
        ) from None
    if not text.isdigit() or int(text) <= 1:
        raise BrokerError(f"pid file {layout.pid_path} holds {text[:20]!r}, not a process id")
    pid = int(text)
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        raise BrokerError(f"pid file {layout.pid_path} is stale: no process {pid}") from None
    except OSError:
        return pid  # no /proc: os.kill in reload_broker still reports a missing process
    if "mosquitto" not in name:
        raise BrokerError(f"pid file {layout.pid_path} is stale: process {pid} is {name!r}")
    return pid


def reload_broker(layout: BrokerLayout) -> None:
    """SIGHUP Mosquitto: it re-reads the ACL files and the CRL, clients stay connected.

    The reload is asynchronous (it takes effect a moment later); callers that need it
    applied retry their operation.
    """
    pid = _broker_pid(layout)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise BrokerError(f"pid file {layout.pid_path} is stale: no process {pid}") from None
    except PermissionError:
        raise BrokerError(f"not allowed to signal Mosquitto (pid {pid})") from None
    log.info("event=broker_reloaded pid=%d", pid)


# --- a local broker for tests and the demo ----------------------------------------


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def start_local_broker(
    workdir: Path,
    ca: CertificateAuthority,
    database: Database | None = None,
    *,
    ports: Sequence[int] | None = None,
) -> tuple[MosquittoBroker, BrokerLayout]:
    """Mosquitto on 127.0.0.1 free ports with files generated from ``database`` (if any).

    Returns once all three listeners accept connections.
    """
    server_port, provisioning_port, operational_port = ports or _distinct_free_ports(3)
    layout = BrokerLayout(
        directory=Path(workdir),
        ca=ca.paths,
        provisioning_port=provisioning_port,
        operational_port=operational_port,
        server_port=server_port,
        device_bind="127.0.0.1",
        run_as=pwd.getpwuid(os.getuid()).pw_name,  # keep our files readable after root drops
    )
    factory_crl = ca.build_crl([], issuer="factory")
    if database is None:
        write_broker_files(layout, [], [], ca.build_crl([]), factory_crl)
    else:
        # Imported here: acl_sync builds on this module.
        from server.acl_sync import read_broker_state

        state = read_broker_state(database)
        write_broker_files(
            layout, state.acl_docs, state.revoked_device_ids, state.crl_pem(ca), factory_crl
        )
    broker = MosquittoBroker(layout.directory, layout.conf_path, layout.ports)
    broker.start(timeout=LOCAL_READY_TIMEOUT_S)
    return broker, layout

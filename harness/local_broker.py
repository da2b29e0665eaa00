"""A local Mosquitto for tests, benchmarks and the demo: free loopback ports, generated files."""

from __future__ import annotations

import logging
import os
import pwd
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from harness.local_services import MosquittoBroker, free_port
from server.broker.acl_sync import read_broker_state
from server.broker.broker_assets import install_broker_assets
from server.broker.guard_plugin import cached_guard_plugin
from server.broker.mosquitto_conf import BrokerError, BrokerLayout, write_broker_files
from server.pki.ca import CertificateAuthority
from server.store.db import Database

log = logging.getLogger(__name__)

LOCAL_READY_TIMEOUT_S: Final = 10.0


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

    Returns once all three listeners accept connections. The provisioning_guard plugin is
    built once per source version into the user's cache (needs gcc and mosquitto-dev).
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
        runtime_dir=Path(workdir),  # same user: Mosquitto may write its pid and log here
    )
    install_broker_assets(layout, cached_guard_plugin())
    if database is None:
        write_broker_files(layout, [], [], ca.build_crl([]), ca.build_crl([], issuer="factory"))
    else:
        state = read_broker_state(database)
        write_broker_files(
            layout, state.acl_docs, state.revoked_device_ids, state.crl_pem(ca),
            state.factory_crl_pem(ca),
        )  # fmt: skip
    broker = MosquittoBroker(layout.directory, layout.conf_path, layout.ports)
    broker.start(timeout=LOCAL_READY_TIMEOUT_S)
    return broker, layout


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


def _handles_sighup(pid: int) -> bool:
    """Whether ``pid`` has a SIGHUP handler (``SigCgt`` in /proc); True where /proc cannot say."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return True


def reload_broker(layout: BrokerLayout) -> None:
    """SIGHUP Mosquitto through its pid file (only with a ``runtime_dir``, as here).

    It re-reads the ACL files and the CRLs, clients stay connected. The reload is
    asynchronous; ``BrokerControl.reload`` (over MQTT, no pid file or signal rights
    needed) waits until it is applied and is what ``AclSync`` uses.
    """
    pid = _broker_pid(layout)
    if not _handles_sighup(pid):
        # Mosquitto writes its pid file before it sets up its signal handlers; a SIGHUP in
        # that window takes the default action and kills the broker. Callers retry.
        raise BrokerError(f"Mosquitto (pid {pid}) is still starting; the reload is retried")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise BrokerError(f"pid file {layout.pid_path} is stale: no process {pid}") from None
    except PermissionError:
        raise BrokerError(f"not allowed to signal Mosquitto (pid {pid})") from None
    log.info("event=broker_reloaded pid=%d", pid)

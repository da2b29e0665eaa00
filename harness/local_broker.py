"""A local Mosquitto for tests, benchmarks and the demo: free loopback ports, generated files."""

from __future__ import annotations

import os
import pwd
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from harness.local_services import MosquittoBroker, free_port
from server.broker.acl_sync import read_broker_state
from server.broker.broker_assets import install_broker_assets
from server.broker.guard_plugin import cached_guard_plugin
from server.broker.mosquitto_conf import BrokerLayout, write_broker_files
from server.pki.ca import CertificateAuthority
from server.store.db import Database

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

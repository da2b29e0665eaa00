"""The backend a board VM provisions against: on host processes, or deployed as documented.

- ``host``: ``LocalStack`` (the MongoDB-wire server or ``MONGODB_URI``,
  Mosquitto with generated TLS on free loopback ports, ``provision-server run``).
- ``deployed``: docs/server.md "Deploy" run by ``scripts/deploy-backend.sh`` in a
  booted Debian 12 container (harness/deployed_backend.py): the server .deb,
  Debian's ``mosquitto.service`` as user ``mosquitto``, ``provision-server.service``
  as shipped; its database is the host's MongoDB-wire server.

Either way the broker's certificate names ``BROKER_HOSTNAME`` (the name the
board's ``/etc/hosts`` resolves to the guestfwd address) and the station gets
the backend's own CA directory (and passphrase file) to sign birth certificates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.board_image import BROKER_HOSTNAME
from harness.deployed_backend import BROKER_PORTS, DeployedBackend
from harness.local_services import MongoWireServer
from harness.simulated_fleet import LocalStack
from server.pki.ca import CertificateAuthority
from server.store.db import Database

DATABASE_NAME = "board_vm"


@dataclass
class BoardBackend:
    """What the scenario needs of a backend; ``stop()`` ends what it started."""

    kind: str
    database: Database
    mongodb_uri: str
    ca_dir: Path
    passphrase_file: Path | None
    provisioning_port: int  # host loopback ports of the device listeners
    operational_port: int
    stoppers: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        for stop in reversed(self.stoppers):
            stop()
        self.stoppers.clear()


def host_backend(workdir: Path) -> BoardBackend:
    ca_dir = workdir / "ca"
    if not (ca_dir / "root.pem").exists():
        CertificateAuthority.init(ca_dir, server_names=(BROKER_HOSTNAME, "localhost"))
    stack = LocalStack.start(workdir, os.environ.get("MONGODB_URI"), DATABASE_NAME)
    try:
        stack.start_server()
    except BaseException:
        stack.stop()
        raise
    return BoardBackend(
        "host",
        stack.database,
        stack.mongodb_uri,
        stack.ca.paths.directory,
        None,
        stack.layout.provisioning_port,
        stack.layout.operational_port,
        [stack.stop],
    )


def deployed_backend(workdir: Path, server_deb: Path) -> BoardBackend:
    stoppers: list[Callable[[], None]] = []
    try:
        uri = os.environ.get("MONGODB_URI")
        if uri is None:
            mongo = MongoWireServer(workdir / "mongo").start()
            stoppers.append(mongo.stop)
            uri = mongo.database_uri(DATABASE_NAME)
        backend = DeployedBackend.start(
            workdir / "deployed", uri, server_deb, broker_name=BROKER_HOSTNAME
        )
        stoppers.append(backend.stop)
        database = Database(uri)
        stoppers.append(database.close)
    except BaseException:
        for stop in reversed(stoppers):
            stop()
        raise
    return BoardBackend(
        "deployed",
        database,
        uri,
        backend.ca_dir,
        backend.rootfs / "etc/provision-server/ca-passphrase",
        BROKER_PORTS[0],
        BROKER_PORTS[1],
        stoppers,
    )

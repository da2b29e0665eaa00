"""A starting server is not replayed the fleet's retained statuses (issue 14).

Mosquitto 2.0.11 sends every retained ``devices/<id>/status`` to each server that
subscribes; the server wrote each one to the database, so its start cost a write per
device of the fleet (100,000 at fleet scale). It now subscribes with retain handling
"do not send": the start costs the same whatever the fleet's size, and a status that
changed while no server listened converges through the device's next heartbeat or the
offline sweep.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bson import ObjectId

from agent import protocol
from harness.local_broker import start_local_broker
from harness.local_services import MosquittoBroker
from server.broker.mosquitto_conf import BrokerLayout
from server.pki.ca import CertificateAuthority
from server.service.mqtt_transport import BrokerEndpoint, ProvisioningServer
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.db import Database, Document
from server.store.devices import DeviceRepository
from server.store.schema import DEVICES, USERS
from tests.device_kit import DeviceKit
from tests.mqtt_device import MqttDevice


@pytest.fixture
def local_broker(tmp_path: Path, ca: CertificateAuthority) -> Iterator[BrokerLayout]:
    broker: MosquittoBroker
    broker, layout = start_local_broker(tmp_path / "broker", ca)
    try:
        yield layout
    finally:
        broker.stop()


def _start_server(database: Database, ca: CertificateAuthority, port: int) -> ProvisioningServer:
    service = ProvisioningService(database, ca, ServicePolicy(status_write_interval=0.0))
    server = ProvisioningServer(service, ca, BrokerEndpoint("127.0.0.1", port))
    server.start()
    assert server.wait_connected(10)
    return server


def _device(database: Database, n: int) -> Document:
    return database.collection(DEVICES).find_one({"clientId": f"start-{n}"}) or {}


def _provisioned(
    database: Database, ca: CertificateAuthority, layout: BrokerLayout, n: int
) -> tuple[DeviceKit, str]:
    """An allocated device taken through token and CSR; returns its kit and certificate."""
    kit = DeviceKit(f"start-{n}", f"02:00:00:00:5A:{n:02X}", ca)
    repo = DeviceRepository(database)
    repo.add(kit.mac, kit.client_id)
    user = ObjectId()
    database.collection(USERS).insert_one({"_id": user, "email": f"s{n}@example.com"})
    repo.allocate(kit.client_id, str(user))
    birth = MqttDevice(
        kit.client_id, layout.provisioning_port, ca.paths.root_cert, kit.birth_pem, kit.birth_key
    ).connect()
    birth.subscribe(protocol.response_topic(kit.client_id))
    token = birth.request(kit.token_request())
    issued = birth.request(kit.csr_request(token["token"]))
    birth.close()
    assert issued["ok"], issued
    return kit, str(issued["certificate"])


def _publish_status(
    kit: DeviceKit, certificate: str, layout: BrokerLayout, ca: CertificateAuthority, status: str
) -> None:
    session = MqttDevice(
        kit.client_id, layout.operational_port, ca.paths.root_cert, certificate, kit.key
    ).connect()
    code = session.publish(
        protocol.status_topic(kit.client_id), protocol.encode({"status": status}), retain=True
    )
    assert not code.is_failure
    session.close()


def _wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_a_starting_server_is_not_replayed_the_retained_statuses(
    database: Database, ca: CertificateAuthority, local_broker: BrokerLayout
) -> None:
    layout = local_broker
    first = _start_server(database, ca, layout.server_port)
    quiet, quiet_cert = _provisioned(database, ca, layout, 1)
    live, live_cert = _provisioned(database, ca, layout, 2)
    _publish_status(quiet, quiet_cert, layout, ca, "online")
    _wait_for(lambda: _device(database, 1).get("status") == "ACTIVE")
    first.stop()

    # While no server listens, the device's retained status becomes "offline".
    _publish_status(quiet, quiet_cert, layout, ca, "offline")
    before = _device(database, 1)
    second = _start_server(database, ca, layout.server_port)
    try:
        # A live status after the start (again until the subscription is in place):
        # the one status worker handles messages in arrival order, so a replay, sent
        # right after the SUBACK, would be written before it.
        deadline = time.monotonic() + 20
        while _device(database, 2).get("status") != "ACTIVE":
            assert time.monotonic() < deadline, "the live status was never handled"
            _publish_status(live, live_cert, layout, ca, "online")
            time.sleep(0.3)
    finally:
        second.stop()
    assert _device(database, 1) == before  # still ACTIVE, lastSeenAt untouched

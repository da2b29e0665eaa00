"""Factory to field: the station programs a board over serial, the agent takes it to ACTIVE.

Every hop is real: the factory console and the agent are processes on the
board's state directory, the station talks to the console over a pty cable,
the allocation is the admin CLI, and the server answers through Mosquitto.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from bson import ObjectId
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.birth import BirthIdentity, Endpoints
from agent.factory import commands as fc
from agent.runner import certs_dir
from agent.storage import CertificateStore
from harness.serial_pair import LineProxy
from server.broker.acl_sync import AclSync
from server.pki.ca import CertificateAuthority, serial_hex
from server.service.mqtt_transport import BrokerEndpoint, ProvisioningServer
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.station.config import StationConfig
from server.station.programmer import BoardProgrammer
from server.store.db import Database
from server.store.schema import DEVICE_CERTIFICATES, DEVICES
from server.store.users import UserRepository
from tests.broker_fixture import LocalBroker
from tests.test_agent_provisioning import wait_for
from tests.test_factory_console import make_board
from tests.test_station import start_console

pytestmark = pytest.mark.slow

MAC = "02:00:00:5E:0F:01"
CLIENT_ID = "plant7-0200005e0f01"  # the station's pattern "plant7-{mac}"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def provisioning_server(
    database: Database, broker: LocalBroker, ca: CertificateAuthority
) -> Iterator[ProvisioningServer]:
    policy = ServicePolicy(not_allocated_retry_after=0.3, status_write_interval=0.0)
    server = ProvisioningServer(
        ProvisioningService(database, ca, policy),
        ca,
        BrokerEndpoint("127.0.0.1", broker.layout.server_port),
    )
    server.start()
    assert server.wait_connected(10)
    sync = AclSync(database, ca, broker.layout, interval=0.2).start()
    try:
        yield server
    finally:
        sync.stop()
        server.stop()


def test_station_then_allocation_then_agent_reaches_active(
    tmp_path: Path,
    database: Database,
    mongodb_uri: str,
    broker: LocalBroker,
    ca: CertificateAuthority,
    provisioning_server: ProvisioningServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="provision.server")
    layout = broker.layout
    endpoints = Endpoints(
        "127.0.0.1", layout.provisioning_port, "127.0.0.1", layout.operational_port
    )
    config = StationConfig(
        ca_dir=ca.paths.directory,
        mongodb_uri=mongodb_uri,
        endpoints=endpoints,
        client_id_pattern="plant7-{mac}",
    )
    board = make_board(tmp_path / "board", mac=MAC)

    # 1. Factory: the console runs as a process on the board end of a pty cable.
    with LineProxy() as cable:
        console = start_console(board, cable.board_path, tmp_path / "console.log")
        try:
            station = BoardProgrammer(
                ca,
                database,
                client_id_for=config.client_id,
                endpoints_json=fc.encode(endpoints.to_json()),
            )
            result = station.program(cable.station_path)
        finally:
            console.send_signal(signal.SIGTERM)
            console.wait(10)
    assert result.result == "programmed", result
    assert result.client_id == CLIENT_ID and result.mac == MAC
    birth_pem = (board.state_dir / "birth" / "cert.pem").read_bytes()
    birth = x509.load_pem_x509_certificate(birth_pem)
    assert serial_hex(birth) == result.certificate_serial
    identity = BirthIdentity.load(board.state_dir)
    assert identity is not None and identity.finalized and identity.endpoints == endpoints
    registered = database.collection(DEVICES).find_one({"clientId": CLIENT_ID})
    assert registered is not None and registered["status"] == "UNALLOCATED"

    # 2. The board boots into its agent: it waits while nobody owns it.
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text(
        f'[device]\nstate_dir = "{board.state_dir}"\nsysfs_root = "{board.sysfs}"\n'
        "[timing]\nbackoff_initial_s = 0.1\nbackoff_max_s = 1.0\nrequest_timeout_s = 3\n"
        "heartbeat_s = 1\nkeepalive_s = 5\n"
    )
    agent_log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_AGENT_")}
    with agent_log.open("ab") as sink:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(agent_config)],
            stdout=sink, stderr=sink, cwd=REPO, env=env,
        )  # fmt: skip
    try:
        wait_for(
            lambda: "event=waiting_for_allocation" in agent_log.read_text(),
            30,
            "the agent to wait for allocation",
        )

        # 3. The operator allocates it with the admin CLI.
        owner = UserRepository(database).add("owner@plant7.example", "Plant 7")
        allocate = subprocess.run(
            [str(Path(sys.executable).with_name("provision-server")), "--mongodb-uri", mongodb_uri,
             "device", "allocate", CLIENT_ID, "--user", str(owner["_id"])],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
        assert allocate.returncode == 0, allocate.stderr

        # 4. The agent provisions and goes live.
        def active() -> bool:
            doc = database.collection(DEVICES).find_one({"clientId": CLIENT_ID})
            return doc is not None and doc["status"] == "ACTIVE"

        try:
            wait_for(active, 30, "the device ACTIVE in MongoDB")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{agent_log.read_text()[-4000:]}") from None
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(20)

    device = database.collection(DEVICES).find_one({"clientId": CLIENT_ID})
    assert device is not None
    live = CertificateStore(certs_dir(board.state_dir)).live_paths()
    cert_pem = live.cert.read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    # Steps 3-5 of the seed (token issued, CSR signed, device connected) and allocation.
    assert device["macID"] == MAC and device["userId"] == owner["_id"]
    assert isinstance(device["userId"], ObjectId)
    assert device["provisioningToken"].startswith("sha256:") and device["tokenUsed"] is True
    assert device["crt"] == cert_pem.decode()
    assert device["ca_certificate"]
    assert device["certificateSerial"] == format(cert.serial_number, "X")
    for field in ("allocatedAt", "tokenExpiresAt", "provisionedAt", "certificateExpiresAt",
                  "lastSeenAt"):  # fmt: skip
        assert isinstance(device.get(field), datetime), field
    records = list(database.collection(DEVICE_CERTIFICATES).find({"device_id": CLIENT_ID}))
    assert len(records) == 1 and records[0]["private_key"] == ""
    assert records[0]["user_id"] == owner["_id"]
    assert cert.not_valid_after_utc > birth.not_valid_before_utc
    # The operational key is not the birth key, and the birth certificate is the station's:
    # the server accepted the token request that carried it.
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*spki) != birth.public_key().public_bytes(*spki)
    assert (board.state_dir / "birth" / "cert.pem").read_bytes() == birth_pem
    token_ok = [
        r.getMessage()
        for r in caplog.records
        if f"op=token device={CLIENT_ID} result=ok" in r.getMessage()
    ]
    assert len(token_ok) == 1, [r.getMessage() for r in caplog.records]

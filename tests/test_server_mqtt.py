"""The provisioning server on a real Mosquitto with real TLS, and a real database."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId

from agent import protocol
from harness.local_broker import reload_broker, start_local_broker
from harness.local_services import MosquittoBroker
from server.broker.mosquitto_conf import BrokerLayout, write_broker_files
from server.pki.ca import CertificateAuthority
from server.service.mqtt_transport import BrokerEndpoint, ProvisioningServer
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.certificates import CertificateRecords
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.schema import DEVICE_CERTIFICATES, DEVICES, USERS
from tests.device_kit import DeviceKit
from tests.mqtt_device import MqttDevice, write_identity


@pytest.fixture(scope="module")
def mqtt_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture
def local_broker(
    tmp_path: Path, mqtt_ca: CertificateAuthority
) -> Iterator[tuple[MosquittoBroker, BrokerLayout]]:
    broker, layout = start_local_broker(tmp_path / "broker", mqtt_ca)
    try:
        yield broker, layout
    finally:
        broker.stop()


@contextlib.contextmanager
def running_server(
    database: Database, ca: CertificateAuthority, layout: BrokerLayout, policy: ServicePolicy
) -> Iterator[ProvisioningServer]:
    service = ProvisioningService(database, ca, policy)
    running = ProvisioningServer(service, ca, BrokerEndpoint("127.0.0.1", layout.server_port))
    running.start()
    assert running.wait_connected(10)
    time.sleep(0.2)  # SUBACK
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def server(
    database: Database,
    mqtt_ca: CertificateAuthority,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
) -> Iterator[ProvisioningServer]:
    policy = ServicePolicy(status_write_interval=0.0)
    with running_server(database, mqtt_ca, local_broker[1], policy) as running:
        yield running


def allocated_device(database: Database, ca: CertificateAuthority, n: int) -> DeviceKit:
    kit = DeviceKit(f"board-{n}", f"02:00:00:00:01:{n:02X}", ca)
    repo = DeviceRepository(database)
    repo.add(kit.mac, kit.client_id)
    user = ObjectId()
    database.collection(USERS).insert_one({"_id": user, "email": f"u{n}@example.com"})
    repo.allocate(kit.client_id, str(user))
    return kit


def birth_session(kit: DeviceKit, layout: BrokerLayout, ca: CertificateAuthority) -> MqttDevice:
    device = MqttDevice(
        kit.client_id, layout.provisioning_port, ca.paths.root_cert, kit.birth_pem, kit.birth_key
    )
    device.connect()
    device.subscribe(protocol.response_topic(kit.client_id))
    return device


def operational_session(
    kit: DeviceKit, layout: BrokerLayout, ca: CertificateAuthority, will: bytes | None = None
) -> tuple[MqttDevice, dict[str, Any]]:
    """Provision ``kit`` over its birth session; its operational session, connected."""
    device = birth_session(kit, layout, ca)
    token = device.request(kit.token_request())
    assert token["ok"], token
    issued = device.request(kit.csr_request(token["token"]))
    assert issued["ok"], issued
    device.close()
    operational = MqttDevice(
        kit.client_id, layout.operational_port, ca.paths.root_cert, issued["certificate"],
        kit.key, will=will,
    )  # fmt: skip
    return operational.connect(), issued


def status_of(database: Database, client_id: str) -> object:
    doc = database.collection(DEVICES).find_one({"clientId": client_id})
    return None if doc is None else doc.get("status")


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_device_provisions_goes_active_and_is_refused_after_revocation(
    database: Database,
    mqtt_ca: CertificateAuthority,
    server: ProvisioningServer,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
    tmp_path: Path,
) -> None:
    broker, layout = local_broker
    kit = allocated_device(database, mqtt_ca, 1)
    will = protocol.encode({"status": "offline"})
    operational, issued = operational_session(kit, layout, mqtt_ca, will)
    code = operational.publish(
        protocol.status_topic(kit.client_id), protocol.encode({"status": "online"}), retain=True
    )
    assert not code.is_failure
    wait_for(lambda: status_of(database, kit.client_id) == "ACTIVE")
    # The will (an unclean end: the socket is dropped) makes it OFFLINE.
    operational.client.socket().close()  # type: ignore[union-attr]
    wait_for(lambda: status_of(database, kit.client_id) == "OFFLINE")
    operational.close()

    # A client other than ours connects with the issued certificate ...
    cert_path, key_path = write_identity(tmp_path / "pub", issued["certificate"], kit.key)
    mosquitto_pub = [
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        str(layout.operational_port),
        "--cafile",
        str(mqtt_ca.paths.root_cert),
        "--cert",
        str(cert_path),
        "--key",
        str(key_path),
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        protocol.status_topic(kit.client_id),
        "-m",
        '{"v":1,"status":"online"}',
    ]
    assert subprocess.run(mosquitto_pub, capture_output=True, timeout=20).returncode == 0
    # ... and is refused once the certificate is revoked and the broker reloaded.
    records = CertificateRecords(database)
    assert records.revoke_current(kit.client_id, "test") == issued["serial"]
    write_broker_files(layout, [], [kit.client_id], mqtt_ca.build_crl(records.revoked_serials()))
    reload_broker(layout)
    deadline = time.monotonic() + 10
    while True:
        refused = subprocess.run(mosquitto_pub, capture_output=True, timeout=20)
        if refused.returncode != 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert refused.returncode != 0, broker.log_text()


def test_request_on_another_devices_topic_is_refused_by_the_broker(
    database: Database,
    mqtt_ca: CertificateAuthority,
    server: ProvisioningServer,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
) -> None:
    _, layout = local_broker
    kit = allocated_device(database, mqtt_ca, 2)
    victim = allocated_device(database, mqtt_ca, 3)
    device = birth_session(kit, layout, mqtt_ca)
    before = database.collection(DEVICES).find_one({"clientId": victim.client_id})
    code = device.publish(
        protocol.request_topic(victim.client_id),
        victim.token_request(),
        response_topic=protocol.response_topic(victim.client_id),
    )
    assert code.value == 135, code  # Not authorized
    time.sleep(0.3)
    assert database.collection(DEVICES).find_one({"clientId": victim.client_id}) == before
    device.close()


def test_garbage_on_the_wire_gets_an_error_and_the_server_survives(
    database: Database,
    mqtt_ca: CertificateAuthority,
    server: ProvisioningServer,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
) -> None:
    _, layout = local_broker
    kit = allocated_device(database, mqtt_ca, 4)
    device = birth_session(kit, layout, mqtt_ca)
    for payload, code in (
        (b"\x00\xff", "BAD_REQUEST"),
        (b"[]", "BAD_REQUEST"),
        (b'{"v":1,"op":"x"}', "UNKNOWN_OP"),
    ):
        answer = device.request(payload)
        assert answer["error"]["code"] == code
    assert device.request(kit.token_request())["ok"]
    device.close()


def run_server_process(
    ca: CertificateAuthority, layout: BrokerLayout, uri: str, log: Path
) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("provision-server")
    argv = [
        str(exe),
        "--mongodb-uri",
        uri,
        "run",
        "--ca-dir",
        str(ca.paths.directory),
        "--broker-host",
        "127.0.0.1",
        "--broker-port",
        str(layout.server_port),
    ]
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)


def wait_subscribed(*logs: Path, timeout: float = 30.0) -> None:
    """Until every server process logged its broker connection, then its SUBACK's time.

    A fixed sleep was too short on a loaded machine: a request published before any
    server subscribed reaches nobody.
    """
    deadline = time.monotonic() + timeout
    for log in logs:
        while "event=broker-connect result=ok" not in (
            log.read_text(errors="replace") if log.exists() else ""
        ):
            assert time.monotonic() < deadline, f"{log.name}: server never connected"
            time.sleep(0.05)
    time.sleep(0.3)  # the SUBSCRIBE goes out from the CONNACK callback


def test_two_server_processes_answer_each_request_once(
    database: Database,
    mongodb_uri: str,
    mqtt_ca: CertificateAuthority,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
    tmp_path: Path,
) -> None:
    _, layout = local_broker
    procs = [
        run_server_process(mqtt_ca, layout, mongodb_uri, tmp_path / f"s{i}.log") for i in range(2)
    ]
    try:
        kits = [allocated_device(database, mqtt_ca, 10 + i) for i in range(6)]
        wait_subscribed(tmp_path / "s0.log", tmp_path / "s1.log")
        for kit in kits:
            device = birth_session(kit, layout, mqtt_ca)
            token = device.request(kit.token_request(), timeout=15)
            assert token["ok"], token
            assert device.request(kit.csr_request(token["token"]), timeout=15)["ok"]
            time.sleep(0.3)
            assert device.responses.empty(), "a request was answered twice"
            device.close()
        logs = [(tmp_path / f"s{i}.log").read_text() for i in range(2)]
        handled = [log.count("event=request op=") for log in logs]
        assert sum(handled) == 12 and all(h > 0 for h in handled), handled
        for log in logs:
            assert "sha256:" not in log
            assert "BEGIN" not in log
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert proc.wait(timeout=30) == 0


def test_server_killed_during_signing_converges_on_one_active_certificate(
    database: Database,
    mongodb_uri: str,
    mqtt_ca: CertificateAuthority,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
    tmp_path: Path,
) -> None:
    _, layout = local_broker
    kits = [allocated_device(database, mqtt_ca, 20 + i) for i in range(8)]
    proc = run_server_process(mqtt_ca, layout, mongodb_uri, tmp_path / "a.log")
    wait_subscribed(tmp_path / "a.log")
    sessions = [birth_session(kit, layout, mqtt_ca) for kit in kits]
    tokens = [
        s.request(k.token_request(), timeout=15)["token"]
        for s, k in zip(sessions, kits, strict=True)
    ]
    # Fire all CSRs, then SIGKILL the server while it works through them.
    for session, kit, token in zip(sessions, kits, tokens, strict=True):
        session.client.publish(protocol.request_topic(kit.client_id), kit.csr_request(token), qos=1)
    time.sleep(0.05)
    proc.kill()
    proc.wait()
    proc = run_server_process(mqtt_ca, layout, mongodb_uri, tmp_path / "b.log")
    try:
        wait_subscribed(tmp_path / "b.log")
        for session, kit, token in zip(sessions, kits, tokens, strict=True):
            answer = session.request(kit.csr_request(token), timeout=15)  # the device retries
            assert answer["ok"], answer
            doc = database.collection(DEVICES).find_one({"clientId": kit.client_id})
            assert doc is not None and doc["crt"] == answer["certificate"]
            records = list(
                database.collection(DEVICE_CERTIFICATES).find(
                    {"device_id": kit.client_id, "status": "active"}
                )
            )
            assert len(records) == 1 and records[0]["serial"] == answer["serial"]
            session.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_200_concurrent_csrs_over_the_broker_yield_one_certificate(
    database: Database,
    mqtt_ca: CertificateAuthority,
    server: ProvisioningServer,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
) -> None:
    _, layout = local_broker
    kit = allocated_device(database, mqtt_ca, 50)
    device = birth_session(kit, layout, mqtt_ca)
    token = device.request(kit.token_request())["token"]
    payload = kit.csr_request(token)
    correlations = [f"c{i}".encode() for i in range(200)]
    for correlation in correlations:  # all in flight at once, no waiting in between
        device.send(
            protocol.request_topic(kit.client_id),
            payload,
            correlation=correlation,
            response_topic=protocol.response_topic(kit.client_id),
        )
    answers: dict[bytes, dict[str, Any]] = {}
    while len(answers) < 200:
        answered, body = device.responses.get(timeout=30)
        assert answered is not None and answered not in answers
        answers[answered] = body
    device.close()
    assert set(answers) == set(correlations)  # each answered exactly once
    assert all(a["ok"] for a in answers.values())
    assert len({a["certificate"] for a in answers.values()}) == 1
    assert database.collection(DEVICE_CERTIFICATES).count_documents(
        {"device_id": kit.client_id}) == 1  # fmt: skip


def test_sigterm_answers_every_request_it_accepted(
    database: Database,
    mongodb_uri: str,
    mqtt_ca: CertificateAuthority,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
    tmp_path: Path,
) -> None:
    _, layout = local_broker
    kits = [allocated_device(database, mqtt_ca, 60 + i) for i in range(30)]
    log = tmp_path / "server.log"
    proc = run_server_process(mqtt_ca, layout, mongodb_uri, log)
    wait_subscribed(log)
    sessions = [birth_session(kit, layout, mqtt_ca) for kit in kits]
    for session, kit in zip(sessions, kits, strict=True):
        session.send(
            protocol.request_topic(kit.client_id),
            kit.token_request(),
            correlation=b"t",
            response_topic=protocol.response_topic(kit.client_id),
        )
    time.sleep(0.05)
    proc.terminate()  # SIGTERM while requests are in flight
    assert proc.wait(timeout=30) == 0
    handled = log.read_text().count("event=request op=token")
    answered = 0
    for session in sessions:
        try:
            session.responses.get(timeout=2 if answered < handled else 0.2)
        except queue.Empty:
            session.close()  # this request was never accepted (the device retries)
            continue
        answered += 1
        session.close()
    assert handled > 0
    assert answered == handled, (answered, handled)
    # An accepted request is also a complete one in the database.
    provisioning = database.collection(DEVICES).count_documents({"status": "PROVISIONING"})
    assert provisioning == handled


def test_an_announcement_is_written_although_this_process_throttles_heartbeats(
    database: Database,
    mqtt_ca: CertificateAuthority,
    local_broker: tuple[MosquittoBroker, BrokerLayout],
) -> None:
    """Another server process (or the web app) changed the status since this process last
    wrote ACTIVE: the device's next connection announces itself (retained ``online``) and
    that is written at once; its heartbeats (not retained) stay throttled."""
    _, layout = local_broker
    policy = ServicePolicy(status_write_interval=300.0)
    with running_server(database, mqtt_ca, layout, policy):
        kit = allocated_device(database, mqtt_ca, 7)
        operational, _ = operational_session(kit, layout, mqtt_ca)
        online = protocol.encode({"status": "online"})
        topic = protocol.status_topic(kit.client_id)
        assert not operational.publish(topic, online, retain=True).is_failure
        wait_for(lambda: status_of(database, kit.client_id) == "ACTIVE")

        # What a second server process does when the device re-provisions through it.
        devices = database.collection(DEVICES)
        devices.update_one({"clientId": kit.client_id}, {"$set": {"status": "PROVISIONED"}})
        assert not operational.publish(topic, online).is_failure  # a heartbeat: throttled
        time.sleep(1.0)
        assert status_of(database, kit.client_id) == "PROVISIONED"
        assert not operational.publish(topic, online, retain=True).is_failure  # announcement
        wait_for(lambda: status_of(database, kit.client_id) == "ACTIVE", 5.0)
        operational.close()

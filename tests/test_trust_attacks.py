"""Issue #12's observed attacks, each with a real MQTT client on the real broker and database.

Every refusal must leave the database byte-identical (``tests.dbdump.snapshot``); the
one refusal that writes is the probable clone, which adds one ``security_events``
document and nothing else. ``provision-server audit`` is clean after each scenario.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent import protocol
from server.broker.acl_sync import AclSync
from server.broker.mosquitto_conf import BrokerLayout
from server.cli.main import main as server_cli
from server.pki.ca import CertificateAuthority
from server.service.mqtt_transport import BrokerEndpoint, ProvisioningServer
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.db import Database
from server.store.devices import DeviceRepository, utcnow
from server.store.issuances import IssuanceLedger
from server.store.schema import CERTIFICATE_REVOCATIONS, DEVICES, SECURITY_EVENTS, USERS
from tests.broker_fixture import LocalBroker, can_connect, write_identity
from tests.dbdump import snapshot
from tests.device_kit import DeviceKit
from tests.mqtt_device import MqttDevice
from tests.test_server_mqtt import status_of, wait_for

RENEW_INTERVAL = 2.0  # long enough that 30 renewals in flight land inside one interval under load


@pytest.fixture
def server(
    database: Database, ca: CertificateAuthority, broker: LocalBroker
) -> Iterator[ProvisioningService]:
    # Default status_write_interval (30 s): heartbeats are throttled as in production.
    policy = ServicePolicy(token_min_interval=0.0, renew_min_interval=RENEW_INTERVAL)
    service = ProvisioningService(database, ca, policy)
    running = ProvisioningServer(
        service, ca, BrokerEndpoint("127.0.0.1", broker.layout.server_port)
    )
    running.start()
    assert running.wait_connected(10)
    time.sleep(0.2)  # SUBACK
    try:
        yield service
    finally:
        running.stop()


def cli(database: Database, *args: str) -> Any:
    result = CliRunner().invoke(server_cli, ["--mongodb-uri", database.uri, *args])
    return result


@dataclass
class Board:
    """One device: its kit and (once provisioned) its operational session.

    Birth sessions are opened only for a request. (The broker binds client ids to the
    certificate and gives birth sessions their own, ``CN=<clientId>`` (#11): a birth
    session no longer closes the device's operational session.)
    """

    kit: DeviceKit
    layout: BrokerLayout
    root: Path
    operational: MqttDevice | None = None
    certificate: str = ""
    serial: str = ""

    def open_birth(self) -> MqttDevice:
        session = MqttDevice(
            self.kit.client_id, self.layout.provisioning_port, self.root,
            self.kit.birth_pem, self.kit.birth_key,
        ).connect()  # fmt: skip
        session.subscribe(protocol.response_topic(self.kit.client_id))
        return session

    def birth_request(self, payload: bytes) -> dict[str, Any]:
        session = self.open_birth()
        try:
            return session.request(payload)
        finally:
            session.close()

    def token(self) -> dict[str, Any]:
        return self.birth_request(self.kit.token_request())

    def connect_operational(self) -> MqttDevice:
        if self.operational is not None:
            self.operational.close()
        self.operational = MqttDevice(
            self.kit.client_id, self.layout.operational_port, self.root,
            self.certificate, self.kit.key, will=protocol.encode({"status": "offline"}),
        ).connect()  # fmt: skip
        self.operational.subscribe(protocol.renew_response_topic(self.kit.client_id))
        return self.operational

    def renew(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.operational is not None
        cid = self.kit.client_id
        return self.operational.request(
            protocol.encode(body),
            topic=protocol.renew_topic(cid),
            reply_to=protocol.renew_response_topic(cid),
        )

    def say(self, status: str) -> None:
        assert self.operational is not None
        self.operational.publish(
            protocol.status_topic(self.kit.client_id),
            protocol.encode({"status": status}),
            retain=True,
        )

    def close(self) -> None:
        if self.operational is not None:
            self.operational.close()


def new_board(database: Database, ca: CertificateAuthority, broker: LocalBroker, n: int) -> Board:
    kit = DeviceKit(f"trust-{n}", f"02:00:00:00:12:{n:02X}", ca)
    repo = DeviceRepository(database)
    repo.add(kit.mac, kit.client_id)
    user = ObjectId()
    database.collection(USERS).insert_one({"_id": user, "email": f"t{n}@example.com"})
    repo.allocate(kit.client_id, str(user))
    IssuanceLedger(database).record_birth(kit.client_id, kit.birth_cert)  # as the station does
    return Board(kit, broker.layout, ca.paths.root_cert)


def provision(board: Board, database: Database) -> None:
    """Token + CSR over a birth session, then an operational session that says online."""
    session = board.open_birth()
    try:
        token = session.request(board.kit.token_request())
        assert token["ok"], token
        issued = session.request(board.kit.csr_request(token["token"]))
        assert issued["ok"], issued
    finally:
        session.close()
    board.certificate, board.serial = issued["certificate"], issued["serial"]
    board.connect_operational()
    board.say("online")
    wait_for(lambda: status_of(database, board.kit.client_id) == "ACTIVE")


@pytest.fixture
def active(
    database: Database, ca: CertificateAuthority, broker: LocalBroker, server: ProvisioningService
) -> Iterator[Board]:
    board = new_board(database, ca, broker, 1)
    provision(board, database)
    try:
        yield board
    finally:
        board.close()


def assert_audit_clean(database: Database) -> None:
    result = cli(database, "audit")
    assert result.exit_code == 0, result.output
    assert "audit clean" in result.output


def proof(key: ec.EllipticCurvePrivateKey, client_id: str, serial: str, nonce: str) -> str:
    message = protocol.renewal_proof_message(client_id, serial, nonce)
    return base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def key_of(
    issued: dict[str, Any], keys: list[ec.EllipticCurvePrivateKey]
) -> ec.EllipticCurvePrivateKey:
    """The key among ``keys`` that ``issued["certificate"]`` certifies."""
    public = x509.load_pem_x509_certificate(issued["certificate"].encode()).public_key()
    return next(k for k in keys if k.public_key() == public)


# --- 1. every operation only on its own topic -------------------------------------------


def test_operations_on_the_wrong_topic_are_refused_and_change_nothing(
    database: Database, active: Board
) -> None:
    kit = active.kit
    new_key = ec.generate_private_key(ec.SECP256R1())
    from agent.keystore import build_csr

    renew = {"op": "renew", "csr": build_csr(new_key, kit.client_id, kit.mac).decode()}
    confirm = {"op": "renew-confirm", "serial": active.serial, "signature": "AAAA"}
    # The operational session cannot ask for a token or send a CSR on the renew topic ...
    before = snapshot(database)
    token = json.loads(kit.token_request())
    csr = json.loads(kit.csr_request("x" * 43))
    for body in (token, csr):
        answer = active.renew({k: v for k, v in body.items() if k != "v"})
        assert answer["error"]["code"] == "WRONG_TOPIC", answer
    assert snapshot(database) == before
    # ... and the birth certificate cannot renew or confirm on the provisioning topic.
    attacker = active.open_birth()
    try:
        before = snapshot(database)
        for body in (renew, confirm):
            answer = attacker.request(protocol.encode(body))
            assert answer["error"]["code"] == "WRONG_TOPIC", answer
        assert snapshot(database) == before
    finally:
        attacker.close()
    assert_audit_clean(database)


# --- 2. renewal: one pending certificate, rate-limited, revocable ------------------------


def test_a_renewal_storm_gets_one_pending_certificate_and_revocation_covers_it(
    database: Database, ca: CertificateAuthority, broker: LocalBroker, active: Board
) -> None:
    from agent.keystore import build_csr

    kit, op = active.kit, active.operational
    assert op is not None
    time.sleep(RENEW_INTERVAL)  # the first certificate is older than the renewal interval
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(30)]
    for index, key in enumerate(keys):  # all in flight at once
        body = {"op": "renew", "csr": build_csr(key, kit.client_id, kit.mac).decode()}
        op.send(protocol.renew_topic(kit.client_id), protocol.encode(body),
                correlation=f"r{index}".encode(),
                response_topic=protocol.renew_response_topic(kit.client_id))  # fmt: skip
    answers = [op.responses.get(timeout=20)[1] for _ in keys]
    granted = [a for a in answers if a.get("ok")]
    assert len(granted) == 1, answers
    assert {a["error"]["code"] for a in answers if not a.get("ok")} == {"RATE_LIMITED"}
    assert all(a["error"].get("retryAfter", 0) > 0 for a in answers if not a.get("ok"))
    ledger = IssuanceLedger(database)
    pending = [r for r in ledger.history(kit.client_id) if r["state"] == "pending"]
    assert [r["serial"] for r in pending] == [granted[0]["serial"]]
    first_pending = granted[0]
    # A newer renewal (after the interval) replaces the pending one, which is revoked at once.
    time.sleep(RENEW_INTERVAL)
    second_key = ec.generate_private_key(ec.SECP256R1())
    second = active.renew(
        {"op": "renew", "csr": build_csr(second_key, kit.client_id, kit.mac).decode()}
    )
    assert second["ok"], second
    revocations = database.collection(CERTIFICATE_REVOCATIONS)
    assert revocations.find_one({"serial": first_pending["serial"]}) is not None
    assert_audit_clean(database)
    # The operator revokes the device: current and pending certificates go on the CRL.
    result = cli(database, "device", "revoke", kit.client_id)
    assert result.exit_code == 0, result.output
    for serial in (active.serial, second["serial"]):
        assert revocations.find_one({"serial": serial}) is not None
    AclSync(database, ca, broker.layout).sync_now()
    identities = broker.workdir / "pending"
    for n, (pem, key) in enumerate(
        (
            (first_pending["certificate"], key_of(first_pending, keys)),
            (second["certificate"], second_key),
        )
    ):
        cert = x509.load_pem_x509_certificate(pem.encode())
        files = write_identity(identities, f"p{n}", cert, key)
        assert not can_connect(broker, files, broker.layout.operational_port), broker.log_text()
    assert_audit_clean(database)


# --- 3. no takeover of a device in service -------------------------------------------------


def test_token_for_a_device_in_service_is_a_probable_clone(
    database: Database, active: Board
) -> None:
    cid = active.kit.client_id
    # The attacker holds the birth certificate (TLS 1.2 sends it in clear). The device's
    # session stays up (the broker keeps birth and operational client ids apart, #11).
    attacker = active.open_birth()
    try:
        assert active.operational is not None and active.operational.client.is_connected()
        before = snapshot(database)
        answer = attacker.request(active.kit.token_request())
    finally:
        attacker.close()
    assert answer["error"]["code"] == "CLONE_SUSPECTED", answer
    assert answer["error"]["retryAfter"] > 0
    after = snapshot(database)
    events = after.pop(SECURITY_EVENTS)
    before.pop(SECURITY_EVENTS, None)
    assert after == before and len(events) == 1
    event = database.collection(SECURITY_EVENTS).find_one({})
    assert event is not None and event["device_id"] == cid
    assert event["kind"] == "probable-clone"
    # The real device reconnects and is served as before: ACTIVE, heartbeats applied.
    active.connect_operational()
    active.say("online")
    wait_for(lambda: status_of(database, cid) == "ACTIVE")
    # Long after its last word, a device in service still needs the operator's approval.
    active.say("offline")
    wait_for(lambda: status_of(database, cid) == "OFFLINE")
    active.close()
    long_ago = utcnow() - timedelta(hours=1)
    database.collection(DEVICES).update_one({"clientId": cid}, {"$set": {"lastSeenAt": long_ago}})
    before = snapshot(database)
    answer = active.token()
    assert answer["error"]["code"] == "REPROVISION_NOT_APPROVED", answer
    assert answer["error"]["retryAfter"] > 0
    assert snapshot(database) == before
    assert_audit_clean(database)


def test_a_revoked_device_reprovisions_only_after_approval_and_goes_active_at_once(
    database: Database, ca: CertificateAuthority, broker: LocalBroker, active: Board
) -> None:
    cid = active.kit.client_id
    old_serial = active.serial
    assert cli(database, "device", "revoke", cid).exit_code == 0
    assert status_of(database, cid) == "ERROR"
    before = snapshot(database)
    answer = active.token()
    assert answer["error"]["code"] == "REPROVISION_NOT_APPROVED", answer
    assert snapshot(database) == before
    result = cli(database, "device", "reprovision", cid)
    assert result.exit_code == 0, result.output
    assert status_of(database, cid) == "ALLOCATED"
    active.kit.new_key()
    provision(active, database)  # token, CSR, online -> ACTIVE within seconds
    assert active.serial != old_serial
    assert database.collection(CERTIFICATE_REVOCATIONS).find_one({"serial": old_serial})
    records = {r["serial"]: r for r in IssuanceLedger(database).history(cid)}
    assert records[old_serial]["state"] == "revoked"
    assert records[active.serial]["state"] == "current"
    assert records[active.serial]["reason"] == "re-provisioned"
    assert_audit_clean(database)


def test_approval_of_a_device_that_is_online_needs_force(database: Database, active: Board) -> None:
    before = snapshot(database)
    result = cli(database, "device", "reprovision", active.kit.client_id)
    assert result.exit_code == 1 and "online" in result.output
    assert snapshot(database) == before


# --- 4. birth certificates can be revoked ---------------------------------------------------


def test_a_quarantined_birth_certificate_cannot_provision_until_released(
    database: Database, ca: CertificateAuthority, broker: LocalBroker, server: ProvisioningService
) -> None:
    board = new_board(database, ca, broker, 2)
    try:
        result = cli(database, "device", "quarantine", board.kit.client_id)
        assert result.exit_code == 0, result.output
        revocation = database.collection(CERTIFICATE_REVOCATIONS).find_one(
            {"serial": format(board.kit.birth_cert.serial_number, "X")}
        )
        assert revocation is not None and revocation["kind"] == "birth"
        before = snapshot(database)
        answer = board.token()
        assert answer["error"]["code"] == "QUARANTINED", answer
        assert snapshot(database) == before
        assert_audit_clean(database)
        result = cli(database, "device", "release", board.kit.client_id)
        assert result.exit_code == 0, result.output
        assert board.token()["ok"]
        assert_audit_clean(database)
    finally:
        board.close()


# --- renew-confirm proves possession of the new key ---------------------------------------


def test_renew_confirm_needs_the_new_keys_signature_over_the_nonce(
    database: Database, active: Board
) -> None:
    from agent.keystore import build_csr

    kit = active.kit
    time.sleep(RENEW_INTERVAL)
    new_key = ec.generate_private_key(ec.SECP256R1())
    pending = active.renew(
        {"op": "renew", "csr": build_csr(new_key, kit.client_id, kit.mac).decode()}
    )
    assert pending["ok"] and len(pending["nonce"]) >= 32, pending
    serial, nonce = pending["serial"], pending["nonce"]
    before = snapshot(database)
    for signature in (
        proof(kit.key, kit.client_id, serial, nonce),  # the old key
        proof(new_key, kit.client_id, serial, "another nonce"),
        proof(new_key, "trust-other", serial, nonce),
        "not base64!",
    ):
        answer = active.renew({"op": "renew-confirm", "serial": serial, "signature": signature})
        assert answer["error"]["code"] == "PROOF_INVALID", answer
    assert snapshot(database) == before
    answer = active.renew(
        {
            "op": "renew-confirm",
            "serial": serial,
            "signature": proof(new_key, kit.client_id, serial, nonce),
        }
    )
    assert answer["ok"] and answer["serial"] == serial, answer
    device = database.collection(DEVICES).find_one({"clientId": kit.client_id})
    assert device is not None and device["certificateSerial"] == serial
    records = {r["serial"]: r["state"] for r in IssuanceLedger(database).history(kit.client_id)}
    assert records[serial] == "current" and records[active.serial] == "superseded"
    assert database.collection(CERTIFICATE_REVOCATIONS).find_one({"serial": active.serial})
    assert_audit_clean(database)


# --- 5. a full request queue loses nothing -------------------------------------------------


def test_a_full_request_queue_loses_no_accepted_message(
    database: Database, ca: CertificateAuthority, broker: LocalBroker
) -> None:
    service = ProvisioningService(database, ca, ServicePolicy(token_min_interval=0.0))
    running = ProvisioningServer(
        service, ca, BrokerEndpoint("127.0.0.1", broker.layout.server_port),
        workers=1, queue_limit=2,
    )  # fmt: skip
    running.start()
    board = None
    try:
        assert running.wait_connected(10)
        time.sleep(0.2)
        board = new_board(database, ca, broker, 3)
        session = board.open_birth()
        correlations = [f"q{i}".encode() for i in range(300)]
        cid = board.kit.client_id
        for correlation in correlations:
            session.send(
                protocol.request_topic(cid),
                b'{"v":1,"op":"nope"}',
                correlation=correlation,
                response_topic=protocol.response_topic(cid),
            )
        answered = {session.responses.get(timeout=20)[0] for _ in correlations}
        assert answered == set(correlations)
        session.close()
    finally:
        if board is not None:
            board.close()
        running.stop()

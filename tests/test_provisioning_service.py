"""The provisioning decisions on a real database and a real CA (transport-free)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from server.pki.ca import CertificateAuthority
from server.service.device_control import approve_reprovision
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.audit import audit
from server.store.certificates import IssuedCertificate
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.issuances import IssuanceKind, IssuanceLedger, IssuanceState
from server.store.schema import DEVICE_ACLS, DEVICE_CERTIFICATES, DEVICES, USERS
from tests.dbdump import snapshot
from tests.device_kit import DeviceKit


@pytest.fixture(scope="module")
def service_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca")


@pytest.fixture
def service(database: Database, service_ca: CertificateAuthority) -> ProvisioningService:
    return ProvisioningService(
        database, service_ca, ServicePolicy(status_write_interval=0.0, token_min_interval=0.0)
    )


@pytest.fixture
def user_id(database: Database) -> ObjectId:
    uid = ObjectId()
    database.collection(USERS).insert_one({"_id": uid, "email": "u@example.com"})
    return uid


def register(database: Database, kit: DeviceKit, user: ObjectId | None) -> None:
    repo = DeviceRepository(database)
    repo.add(kit.mac, kit.client_id)
    if user is not None:
        repo.allocate(kit.client_id, str(user))


def answer(service: ProvisioningService, client_id: str, payload: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(service.handle_request(client_id, payload))
    return result


def provision(service: ProvisioningService, kit: DeviceKit) -> dict[str, Any]:
    token = answer(service, kit.client_id, kit.token_request())
    assert token["ok"], token
    cert = answer(service, kit.client_id, kit.csr_request(token["token"]))
    assert cert["ok"], cert
    cert["token"] = token["token"]
    return cert


def test_happy_path_writes_every_seed_field(
    database: Database,
    service: ProvisioningService,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
) -> None:
    kit = DeviceKit("board-1", "02:00:00:00:00:01", service_ca)
    register(database, kit, user_id)
    token = answer(service, kit.client_id, kit.token_request())
    assert token["ok"] and token["v"] == 1 and len(token["token"]) >= 40
    doc = database.collection(DEVICES).find_one({"clientId": "board-1"})
    assert doc is not None
    assert doc["status"] == "PROVISIONING" and doc["tokenUsed"] is False
    assert doc["provisioningToken"].startswith("sha256:")
    assert token["token"] not in json.dumps(doc, default=str)  # only the hash at rest
    response = answer(service, kit.client_id, kit.csr_request(token["token"]))
    assert response["ok"], response
    cert = x509.load_pem_x509_certificate(response["certificate"].encode())
    cert.verify_directly_issued_by(service_ca.device_ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "board-1"
    doc = database.collection(DEVICES).find_one({"clientId": "board-1"})
    assert doc is not None
    assert doc["status"] == "PROVISIONED" and doc["tokenUsed"] is True
    assert doc["crt"] == response["certificate"]
    assert doc["ca_certificate"] == service_ca.device_ca_chain_pem.decode()
    assert doc["certificateSerial"] == response["serial"] == format(cert.serial_number, "X")
    assert doc["certificateExpiresAt"] == cert.not_valid_after_utc
    assert doc["provisionedAt"] is not None
    record = database.collection(DEVICE_CERTIFICATES).find_one({"device_id": "board-1"})
    assert record is not None
    assert record["status"] == "active" and record["private_key"] == ""
    assert record["fingerprint"] == cert.fingerprint(hashes.SHA256()).hex()
    assert record["cn"] == "board-1" and record["user_id"] == user_id
    assert record["expires_at"] == cert.not_valid_after_utc and record["created_at"]
    acl = database.collection(DEVICE_ACLS).find_one({"device_id": "board-1"})
    assert acl is not None and acl["tier"] == "1" and acl["user_id"] == user_id
    service.handle_status("board-1", b'{"v":1,"status":"online"}')
    doc = database.collection(DEVICES).find_one({"clientId": "board-1"})
    assert doc is not None and doc["status"] == "ACTIVE" and doc["lastSeenAt"] is not None
    service.handle_status("board-1", b'{"v":1,"status":"offline"}')
    assert database.collection(DEVICES).find_one({"clientId": "board-1"})["status"] == "OFFLINE"  # type: ignore[index]
    service.handle_status("board-1", b'{"v":1,"status":"error","error":"sensor dead"}')
    doc = database.collection(DEVICES).find_one({"clientId": "board-1"})
    assert doc is not None and doc["status"] == "ERROR" and doc["errorMessage"] == "sensor dead"


def test_same_csr_with_same_token_returns_the_same_certificate(
    database: Database,
    service: ProvisioningService,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
) -> None:
    kit = DeviceKit("board-2", "02:00:00:00:00:02", service_ca)
    register(database, kit, user_id)
    first = provision(service, kit)
    again = answer(service, kit.client_id, kit.csr_request(first["token"]))
    assert again["ok"] and again["certificate"] == first["certificate"]
    other_key = DeviceKit("board-2", "02:00:00:00:00:02", service_ca)
    stolen = answer(service, kit.client_id, other_key.csr_request(first["token"]))
    assert stolen["error"]["code"] == "TOKEN_INVALID"


def test_reprovisioning_revokes_the_previous_certificate_and_old_token_replay_fails(
    database: Database,
    service: ProvisioningService,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
) -> None:
    kit = DeviceKit("board-3", "02:00:00:00:00:03", service_ca)
    register(database, kit, user_id)
    first = provision(service, kit)
    old_request = kit.csr_request(first["token"])
    kit.new_key()
    approve_reprovision(database, kit.client_id, offline_timeout=timedelta(seconds=180))
    second = provision(service, kit)
    assert second["serial"] != first["serial"]
    revoked = database.collection("certificate_revocations").find_one({"serial": first["serial"]})
    assert revoked is not None and revoked["device_id"] == "board-3"
    assert database.collection(DEVICE_CERTIFICATES).count_documents({"device_id": "board-3"}) == 1
    before = snapshot(database)
    replay = answer(service, kit.client_id, old_request)
    assert replay["error"]["code"] == "TOKEN_INVALID"
    assert snapshot(database) == before


def test_200_concurrent_csrs_with_one_token_make_one_certificate(
    database: Database,
    service: ProvisioningService,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
) -> None:
    kit = DeviceKit("board-4", "02:00:00:00:00:04", service_ca)
    register(database, kit, user_id)
    token = answer(service, kit.client_id, kit.token_request())["token"]
    payload = kit.csr_request(token)
    results: list[dict[str, Any]] = []
    barrier = threading.Barrier(20)

    def worker() -> None:
        barrier.wait()
        for _ in range(10):
            results.append(answer(service, kit.client_id, payload))

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:3]
    assert len({r["certificate"] for r in results}) == 1
    assert database.collection(DEVICE_CERTIFICATES).count_documents({}) == 1
    # Requests that lost the race signed too: their certificates never left the server,
    # and each is in the ledger as superseded and on the revocation list.
    ledger = IssuanceLedger(database).history(kit.client_id)
    current = [r["serial"] for r in ledger if r["state"] == "current"]
    assert current == [results[0]["serial"]]
    losers = {r["serial"] for r in ledger if r["state"] != "current"}
    assert all(r["state"] == "superseded" for r in ledger if r["serial"] in losers)
    revoked = {d["serial"] for d in database.collection("certificate_revocations").find({})}
    assert revoked == losers
    assert audit(database).clean


def rsa_csr(kit: DeviceKit, bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    from agent.protocol import mac_uri

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kit.client_id)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(mac_uri(kit.mac))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def ca_true_csr(kit: DeviceKit) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kit.client_id)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(kit.key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def bad_signature_csr(kit: DeviceKit) -> str:
    der = bytearray(
        x509.load_pem_x509_csr(kit.csr().encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


Case = Callable[[DeviceKit, DeviceKit, str, str], tuple[str, bytes]]
# (device kit, another device's kit, device token, other device's token) -> (topic id, payload)
BAD_INPUT: dict[str, tuple[Case, str]] = {
    "not json": (lambda k, o, t, ot: (k.client_id, b"\xff{not json"), "BAD_REQUEST"),
    "json array": (lambda k, o, t, ot: (k.client_id, b"[1,2]"), "BAD_REQUEST"),
    "wrong v": (lambda k, o, t, ot: (k.client_id, b'{"v":2,"op":"token"}'), "UNSUPPORTED_VERSION"),
    "unknown op": (lambda k, o, t, ot: (k.client_id, b'{"v":1,"op":"reboot"}'), "UNKNOWN_OP"),
    "oversized": (
        lambda k, o, t, ot: (k.client_id, b'{"v":1,"x":"' + b"a" * 17000 + b'"}'),
        "PAYLOAD_TOO_LARGE",
    ),
    "missing field": (
        lambda k, o, t, ot: (k.client_id, b'{"v":1,"op":"csr","token":"x"}'),
        "BAD_REQUEST",
    ),
    "wrong type": (
        lambda k, o, t, ot: (k.client_id, b'{"v":1,"op":"token","mac":5,"cert":"x"}'),
        "BAD_REQUEST",
    ),
    "unknown device": (
        lambda k, o, t, ot: (
            "ghost-1",
            DeviceKit("ghost-1", "02:00:00:00:00:55", k.ca).token_request(),
        ),
        "UNKNOWN_DEVICE",
    ),
    "birth cert of another cn": (lambda k, o, t, ot: ("ghost-1", k.token_request()), "BAD_REQUEST"),
    "unallocated": (
        lambda k, o, t, ot: (
            "board-u",
            DeviceKit("board-u", "02:00:00:00:00:99", k.ca).token_request(),
        ),
        "NOT_ALLOCATED",
    ),
    "mac mismatch": (
        lambda k, o, t, ot: (k.client_id, k.token_request("02:00:00:00:00:77")),
        "MAC_MISMATCH",
    ),
    "other's birth cert": (
        lambda k, o, t, ot: (
            k.client_id,
            o.token_request().replace(o.mac.encode(), k.mac.encode()),
        ),
        "BAD_REQUEST",
    ),
    "token of another device": (
        lambda k, o, t, ot: (k.client_id, k.csr_request(ot)),
        "TOKEN_INVALID",
    ),
    "garbage token": (lambda k, o, t, ot: (k.client_id, k.csr_request("nope")), "TOKEN_INVALID"),
    "bad signature": (
        lambda k, o, t, ot: (k.client_id, k.csr_request(t, bad_signature_csr(k))),
        "CSR_INVALID",
    ),
    "csr for another cn": (
        lambda k, o, t, ot: (k.client_id, k.csr_request(t, o.csr())),
        "CSR_INVALID",
    ),
    "rsa 1024": (
        lambda k, o, t, ot: (k.client_id, k.csr_request(t, rsa_csr(k, 1024))),
        "CSR_INVALID",
    ),
    "ca:true extension": (
        lambda k, o, t, ot: (k.client_id, k.csr_request(t, ca_true_csr(k))),
        "CSR_INVALID",
    ),
    "garbage pem": (
        lambda k, o, t, ot: (
            k.client_id,
            k.csr_request(
                t, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
        ),
        "CSR_INVALID",
    ),
}


@pytest.fixture
def two_devices(
    database: Database,
    service: ProvisioningService,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
) -> Iterator[tuple[DeviceKit, DeviceKit, str, str]]:
    kit = DeviceKit("board-5", "02:00:00:00:00:05", service_ca)
    other = DeviceKit("board-6", "02:00:00:00:00:06", service_ca)
    register(database, kit, user_id)
    register(database, other, user_id)
    DeviceRepository(database).add("02:00:00:00:00:99", "board-u")
    token = answer(service, kit.client_id, kit.token_request())["token"]
    other_token = answer(service, other.client_id, other.token_request())["token"]
    yield kit, other, token, other_token


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_its_code_and_changes_nothing(
    database: Database,
    service: ProvisioningService,
    two_devices: tuple[DeviceKit, DeviceKit, str, str],
    case: str,
) -> None:
    build, code = BAD_INPUT[case]
    topic_id, payload = build(*two_devices)
    before = snapshot(database)
    response = answer(service, topic_id, payload)
    assert response["ok"] is False
    assert response["error"]["code"] == code, response
    if code == "NOT_ALLOCATED":
        assert response["error"]["retryAfter"] > 0
    assert snapshot(database) == before


def test_expired_token_and_used_token(
    database: Database,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
) -> None:
    short = ProvisioningService(
        database, service_ca, ServicePolicy(token_lifetime=timedelta(milliseconds=1))
    )
    kit = DeviceKit("board-7", "02:00:00:00:00:07", service_ca)
    register(database, kit, user_id)
    token = answer(short, kit.client_id, kit.token_request())["token"]
    import time

    time.sleep(0.05)
    before = snapshot(database)
    assert answer(short, kit.client_id, kit.csr_request(token))["error"]["code"] == "TOKEN_EXPIRED"
    assert snapshot(database) == before
    normal = ProvisioningService(database, service_ca)
    first = provision(normal, kit)
    kit.new_key()
    used = answer(normal, kit.client_id, kit.csr_request(first["token"]))
    assert used["error"]["code"] == "TOKEN_INVALID"


def test_silent_active_device_is_swept_offline(
    database: Database,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
    tmp_path: Path,
) -> None:
    svc = ProvisioningService(
        database, service_ca, ServicePolicy(offline_timeout=timedelta(milliseconds=10))
    )
    kit = DeviceKit("board-8", "02:00:00:00:00:08", service_ca)
    register(database, kit, user_id)
    provision(svc, kit)
    svc.handle_status(kit.client_id, b'{"v":1,"status":"online"}')
    import time

    time.sleep(0.05)
    assert svc.sweep_silent_devices() == 1
    assert database.collection(DEVICES).find_one({"clientId": "board-8"})["status"] == "OFFLINE"  # type: ignore[index]


def test_token_requests_in_a_loop_are_rate_limited_without_database_writes(
    database: Database, service_ca: CertificateAuthority, user_id: ObjectId
) -> None:
    limited = ProvisioningService(database, service_ca, ServicePolicy(token_min_interval=30.0))
    kit = DeviceKit("board-9", "02:00:00:00:00:09", service_ca)
    register(database, kit, user_id)
    assert answer(limited, kit.client_id, kit.token_request())["ok"]
    before = snapshot(database)
    again = answer(limited, kit.client_id, kit.token_request())
    assert again["error"]["code"] == "RATE_LIMITED"
    assert 0 < again["error"]["retryAfter"] <= 30
    assert snapshot(database) == before
    other = DeviceKit("board-10", "02:00:00:00:00:0A", service_ca)
    register(database, other, user_id)
    assert answer(limited, other.client_id, other.token_request())["ok"]  # per device


def test_batched_status_writes_apply_latest_per_device_and_respect_the_state_guard(
    database: Database, service_ca: CertificateAuthority, user_id: ObjectId
) -> None:
    from server.store.status_writer import StatusBatcher

    writer = StatusBatcher(database, max_batch=7)  # 21 changes: three bulk writes
    batched = ProvisioningService(
        database,
        service_ca,
        ServicePolicy(status_write_interval=0.0, token_min_interval=0.0),
        status_writer=writer,
    )
    kits = [DeviceKit(f"batch-{i}", f"02:00:00:00:0B:{i:02X}", service_ca) for i in range(20)]
    for kit in kits:
        register(database, kit, user_id)
        provision(batched, kit)
    DeviceRepository(database).add("02:00:00:00:0B:FF", "batch-unprovisioned")
    for kit in kits:
        batched.handle_status(kit.client_id, b'{"v":1,"status":"offline"}')
        batched.handle_status(kit.client_id, b'{"v":1,"status":"online"}')  # latest wins
    batched.handle_status("batch-unprovisioned", b'{"v":1,"status":"online"}')
    waiting = database.collection(DEVICES).count_documents({"status": "PROVISIONED"})
    assert waiting == 20  # nothing written until the flush
    assert writer.flush() == 20
    statuses = {
        d["clientId"]: d["status"]
        for d in database.collection(DEVICES).find({"clientId": {"$regex": "^batch-"}})
    }
    assert statuses.pop("batch-unprovisioned") == "UNALLOCATED"  # guard held
    assert set(statuses.values()) == {"ACTIVE"}
    assert writer.written == 21
    assert writer.flush() == 0


def test_birth_certificate_with_an_unknown_x509_version_is_a_bad_request(
    database: Database,
    service: ProvisioningService,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
) -> None:
    """Found by the hostile suite: InvalidVersion is not a ValueError (was INTERNAL)."""
    import base64

    kit = DeviceKit("board-11", "02:00:00:00:00:0B", service_ca)
    register(database, kit, user_id)
    der = x509.load_pem_x509_certificate(kit.birth_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2 (X.509 v3)
    assert v3 in der
    bad = der.replace(v3, bytes.fromhex("a003020105"), 1)
    kit.birth_pem = (
        "-----BEGIN CERTIFICATE-----\n"
        + base64.encodebytes(bad).decode()
        + "-----END CERTIFICATE-----\n"
    )
    before = snapshot(database)
    answer_ = answer(service, kit.client_id, kit.token_request())
    assert answer_["error"]["code"] == "BAD_REQUEST", answer_
    assert snapshot(database) == before


def test_with_group_commit_a_csr_takes_four_round_trips_and_retires_stale_records(
    database: Database, service_ca: CertificateAuthority, user_id: ObjectId
) -> None:
    """The certificate record, its ACL and the read of the ledger share one batch.

    A certificate signed and recorded for the device earlier that never became its own
    (a crash between the ledger insert and the device update) is still found by that
    read and revoked: the audit stays clean.
    """
    database.start_group_commit()
    try:
        service = ProvisioningService(
            database, service_ca, ServicePolicy(status_write_interval=0.0, token_min_interval=0.0)
        )
        kit = DeviceKit("board-gc", "02:00:00:00:0c:01", service_ca)
        register(database, kit, user_id)
        stale = IssuedCertificate.of(
            service_ca.sign_device_certificate(
                kit.key.public_key(), kit.client_id, kit.mac, timedelta(days=30)
            )
        )
        ledger = IssuanceLedger(database)
        ledger.record(
            kit.client_id, stale, IssuanceKind.FIRST, IssuanceState.CURRENT, "provisioned"
        )
        token = answer(service, kit.client_id, kit.token_request())
        group = database.group
        assert group is not None and token["ok"]
        before = group.batches
        cert = answer(service, kit.client_id, kit.csr_request(token["token"]))
        # device read; ledger insert; guarded update; record + ACL + ledger read
        assert cert["ok"] and group.batches - before == 4, cert
    finally:
        database.stop_group_commit()
    states = {r["serial"]: r["state"] for r in ledger.history(kit.client_id)}
    assert states == {stale.serial: "superseded", cert["serial"]: "current"}
    assert database.collection(DEVICE_ACLS).count_documents({"device_id": kit.client_id}) == 1
    record = database.collection(DEVICE_CERTIFICATES).find_one({"device_id": kit.client_id})
    assert record is not None and record["serial"] == cert["serial"]
    assert audit(database).clean


def test_a_repeated_csr_after_a_crash_converges_records_and_ledger(
    database: Database,
    service: ProvisioningService,
    service_ca: CertificateAuthority,
    user_id: ObjectId,
) -> None:
    """A crash after the device update, before the records and the ledger's clean-up.

    The state it leaves: the device holds its certificate (token used), no certificate
    record or ACL yet, and a certificate signed for it by an earlier attempt that also
    crashed (after its ledger insert) still current in the ledger. The device repeats
    its CSR with the same token and key: it gets the same certificate, and the records
    and the ledger converge (the stale certificate revoked): the audit is clean.
    """
    kit = DeviceKit("board-crash", "02:00:00:00:0c:02", service_ca)
    register(database, kit, user_id)
    first = provision(service, kit)
    database.collection(DEVICE_CERTIFICATES).delete_many({"device_id": kit.client_id})
    database.collection(DEVICE_ACLS).delete_many({"device_id": kit.client_id})
    stale = IssuedCertificate.of(
        service_ca.sign_device_certificate(
            kit.key.public_key(), kit.client_id, kit.mac, timedelta(days=30)
        )
    )
    ledger = IssuanceLedger(database)
    ledger.record(kit.client_id, stale, IssuanceKind.FIRST, IssuanceState.CURRENT, "provisioned")
    assert not audit(database).clean

    again = answer(service, kit.client_id, kit.csr_request(first["token"]))

    assert again["ok"] and again["serial"] == first["serial"], again
    states = {r["serial"]: r["state"] for r in ledger.history(kit.client_id)}
    assert states == {stale.serial: "superseded", first["serial"]: "current"}
    record = database.collection(DEVICE_CERTIFICATES).find_one({"device_id": kit.client_id})
    assert record is not None and record["serial"] == first["serial"]
    assert database.collection(DEVICE_ACLS).count_documents({"device_id": kit.client_id}) == 1
    assert audit(database).clean

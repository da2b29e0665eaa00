"""Re-provisioning policy, the issuance ledger and the audit, on the real database and CA.

Transport-free (``ProvisioningService.handle_request``); the attacks over MQTT are in
``tests/test_trust_attacks.py``.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from click.testing import CliRunner

from agent.protocol import RequestChannel
from server.cli.main import main as server_cli
from server.config import load_server_config
from server.errors import ConfigError
from server.pki.ca import CertificateAuthority
from server.service.policy import ReprovisionPolicy, ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.audit import audit
from server.store.certificates import IssuedCertificate
from server.store.db import Database
from server.store.devices import DeviceRepository, utcnow
from server.store.issuances import IssuanceKind, IssuanceLedger, IssuanceState
from server.store.schema import CERTIFICATE_REVOCATIONS, DEVICES, USERS
from tests.dbdump import snapshot
from tests.device_kit import DeviceKit


def service_with(
    database: Database, ca: CertificateAuthority, **policy: Any
) -> ProvisioningService:
    return ProvisioningService(
        database, ca, ServicePolicy(token_min_interval=0.0, status_write_interval=0.0, **policy)
    )


def answer(service: ProvisioningService, kit: DeviceKit, payload: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(service.handle_request(kit.client_id, payload))
    return result


def provisioned(
    database: Database, ca: CertificateAuthority, service: ProvisioningService, n: int
) -> DeviceKit:
    kit = DeviceKit(f"policy-{n}", f"02:00:00:00:13:{n:02X}", ca)
    repo = DeviceRepository(database)
    repo.add(kit.mac, kit.client_id)
    user = ObjectId()
    database.collection(USERS).insert_one({"_id": user, "email": f"p{n}@example.com"})
    repo.allocate(kit.client_id, str(user))
    token = answer(service, kit, kit.token_request())
    assert answer(service, kit, kit.csr_request(token["token"]))["ok"]
    return kit


def set_device(database: Database, kit: DeviceKit, **fields: Any) -> None:
    database.collection(DEVICES).update_one({"clientId": kit.client_id}, {"$set": fields})


@pytest.mark.parametrize(
    ("policy", "status", "seen_ago_s", "expected"),
    [
        ("approval", "OFFLINE", 10_000, "REPROVISION_NOT_APPROVED"),
        ("approval", "PROVISIONED", None, "REPROVISION_NOT_APPROVED"),
        ("approval", "ERROR", 10_000, "REPROVISION_NOT_APPROVED"),
        ("approval", "ACTIVE", 5, "CLONE_SUSPECTED"),
        ("offline", "OFFLINE", 7_200, "ok"),
        ("offline", "OFFLINE", 600, "REPROVISION_NOT_APPROVED"),
        ("offline", "ERROR", 7_200, "REPROVISION_NOT_APPROVED"),
        ("offline", "ACTIVE", 5, "CLONE_SUSPECTED"),
        ("approval", "OFFLINE", 5, "CLONE_SUSPECTED"),  # the will of a session a clone ended
        ("always", "OFFLINE", 5, "CLONE_SUSPECTED"),
        ("always", "OFFLINE", 10_000, "ok"),
        ("always", "PROVISIONED", None, "ok"),
        ("always", "ACTIVE", 5, "CLONE_SUSPECTED"),
        ("always", "ACTIVE", 10_000, "ok"),  # silent past the offline timeout
        ("always", "ERROR", 10_000, "REPROVISION_NOT_APPROVED"),
    ],
)
def test_reprovisioning_policy_decides_from_status_and_last_heartbeat(
    database: Database,
    ca: CertificateAuthority,
    policy: str,
    status: str,
    seen_ago_s: float | None,
    expected: str,
) -> None:
    service = service_with(
        database, ca,
        reprovision=ReprovisionPolicy(policy),
        reprovision_offline_after=timedelta(hours=1),
    )  # fmt: skip
    kit = provisioned(database, ca, service, 1)
    fields: dict[str, Any] = {"status": status}
    if seen_ago_s is not None:
        fields["lastSeenAt"] = utcnow() - timedelta(seconds=seen_ago_s)
    set_device(database, kit, **fields)
    before = snapshot(database)
    result = answer(service, kit, kit.token_request())
    if expected == "ok":
        assert result["ok"], result
        return
    assert result["error"]["code"] == expected, result
    assert result["error"]["retryAfter"] > 0
    after = snapshot(database)
    after.pop("security_events", None)
    before.pop("security_events", None)
    assert after == before


def test_ledger_records_every_signature_and_reprovisioning_supersedes(
    database: Database, ca: CertificateAuthority
) -> None:
    service = service_with(database, ca, reprovision=ReprovisionPolicy.ALWAYS)
    kit = provisioned(database, ca, service, 2)
    ledger = IssuanceLedger(database)
    first = ledger.history(kit.client_id)
    assert [(r["kind"], r["state"], r["reason"]) for r in first] == [
        ("first", "current", "provisioned")
    ]
    record = first[0]
    assert set(record) >= {
        "serial",
        "device_id",
        "kind",
        "issued_at",
        "not_after",
        "reason",
        "state",
    }
    kit.new_key()
    token = answer(service, kit, kit.token_request())
    second = answer(service, kit, kit.csr_request(token["token"]))
    states = {r["serial"]: (r["state"], r["reason"]) for r in ledger.history(kit.client_id)}
    assert states[record["serial"]][0] == "superseded"
    assert states[second["serial"]] == ("current", "re-provisioned")
    assert database.collection(CERTIFICATE_REVOCATIONS).find_one({"serial": record["serial"]})
    assert audit(database).clean


def test_audit_names_a_certificate_that_escaped_the_ledger_and_exits_1(
    database: Database, ca: CertificateAuthority, mongodb_uri: str
) -> None:
    service = service_with(database, ca)
    kit = provisioned(database, ca, service, 3)
    assert audit(database).clean
    # A certificate signed behind the ledger's back, and a stray "current" record.
    stray = ca.sign_device_certificate(kit.key.public_key(), kit.client_id, kit.mac)
    IssuanceLedger(database).record(
        kit.client_id,
        IssuedCertificate.of(stray),
        IssuanceKind.FIRST,
        IssuanceState.CURRENT,
        "test",
    )
    unrecorded = ca.sign_device_certificate(kit.key.public_key(), kit.client_id, kit.mac)
    set_device(database, kit, certificateSerial=format(unrecorded.serial_number, "X"))
    report = audit(database)
    text = "\n".join(report.exceptions)
    assert format(stray.serial_number, "X") in text
    assert format(unrecorded.serial_number, "X") in text and "no issuance record" in text
    result = CliRunner().invoke(server_cli, ["--mongodb-uri", mongodb_uri, "audit"])
    assert result.exit_code == 1
    assert format(unrecorded.serial_number, "X") in result.output


def test_wrong_topic_is_checked_before_anything_else(
    database: Database, ca: CertificateAuthority
) -> None:
    service = service_with(database, ca)
    kit = provisioned(database, ca, service, 4)
    before = snapshot(database)
    reply = json.loads(
        service.handle_request(kit.client_id, kit.token_request(), channel=RequestChannel.RENEWAL)
    )
    assert reply["error"]["code"] == "WRONG_TOPIC"
    assert snapshot(database) == before


def test_a_huge_integer_version_is_a_bad_request(
    database: Database, ca: CertificateAuthority
) -> None:
    service = service_with(database, ca)
    kit = DeviceKit("policy-9", "02:00:00:00:13:09", ca)
    payload = b'{"v":' + b"1" * 5000 + b',"op":"token"}'
    reply = json.loads(service.handle_request(kit.client_id, payload))
    assert reply["error"]["code"] == "BAD_REQUEST"
    service.handle_status(kit.client_id, b'{"v":' + b"9" * 5000 + b',"status":"online"}')


def test_policy_reprovision_is_validated(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[policy]\nreprovision = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"policy\.reprovision.*approval, offline, always"):
        load_server_config(config, env={})
    config.write_text('[policy]\nreprovision = "offline"\nreprovision_offline_after_s = 600\n')
    loaded = load_server_config(config, env={})
    assert loaded.reprovision == "offline" and loaded.reprovision_offline_after_s == 600


def test_refused_operator_decisions_change_nothing(
    database: Database, ca: CertificateAuthority, mongodb_uri: str
) -> None:
    service = service_with(database, ca)
    kit = provisioned(database, ca, service, 5)  # no birth certificate recorded (no station)
    fresh = DeviceKit("policy-6", "02:00:00:00:13:06", ca)
    DeviceRepository(database).add(fresh.mac, fresh.client_id)
    before = snapshot(database)
    refusals = [
        (["device", "quarantine", kit.client_id], "no birth certificate of policy-5 is recorded"),
        (["device", "release", kit.client_id], "is not quarantined"),
        (["device", "revoke", fresh.client_id], "has no active certificate"),
        (["device", "reprovision", fresh.client_id], "is UNALLOCATED"),
        (["device", "reprovision", "nobody"], "no device with clientId 'nobody'"),
    ]
    for args, message in refusals:
        result = CliRunner().invoke(server_cli, ["--mongodb-uri", mongodb_uri, *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
    assert snapshot(database) == before
    IssuanceLedger(database).record_birth(kit.client_id, kit.birth_cert)
    assert (
        CliRunner()
        .invoke(server_cli, ["--mongodb-uri", mongodb_uri, "device", "quarantine", kit.client_id])
        .exit_code
        == 0
    )
    before = snapshot(database)
    again = CliRunner().invoke(
        server_cli, ["--mongodb-uri", mongodb_uri, "device", "quarantine", kit.client_id]
    )
    assert again.exit_code == 1 and "already quarantined" in again.output
    assert snapshot(database) == before

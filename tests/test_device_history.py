"""The audit trail (``operator_actions``) and ``provision-server device history``.

A device goes through its whole life with the real admin CLI and the real provisioning
service on the real database: registered, allocated, provisioned, renewed, revoked by the
operator, approved and provisioned again. Its history must tell that story in order, with
who did what, every certificate issued and revoked, and the refusals that looked like attacks.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from bson import ObjectId
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent import protocol
from server.cli.main import main
from server.pki.ca import CertificateAuthority
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.db import Database
from server.store.operator_actions import (
    OPERATOR_ENV,
    OperatorAction,
    OperatorActionLog,
    current_operator,
)
from server.store.schema import OPERATOR_ACTIONS, USERS
from server.store.security_events import PROBABLE_CLONE, SecurityEvents
from tests.device_kit import DeviceKit


def cli(uri: str, *args: str, operator: str = "alice@ops") -> Result:
    return CliRunner().invoke(
        main, ["--mongodb-uri", uri, *args], env={OPERATOR_ENV: operator}, catch_exceptions=False
    )


def ask(service: ProvisioningService, kit: DeviceKit, payload: dict[str, Any]) -> dict[str, Any]:
    """A renewal request, on the renew topic's channel."""
    answer: dict[str, Any] = json.loads(
        service.handle_request(
            kit.client_id, protocol.encode(payload), protocol.RequestChannel.RENEWAL
        )
    )
    assert answer["ok"], answer
    return answer


def provision(service: ProvisioningService, kit: DeviceKit) -> dict[str, Any]:
    token = json.loads(service.handle_request(kit.client_id, kit.token_request()))
    assert token["ok"], token
    issued: dict[str, Any] = json.loads(
        service.handle_request(kit.client_id, kit.csr_request(token["token"]))
    )
    assert issued["ok"], issued
    return issued


def test_history_of_a_device_through_its_whole_life(
    database: Database, mongodb_uri: str, ca: CertificateAuthority
) -> None:
    kit = DeviceKit("life-1", "02:00:00:00:AA:01", ca)
    user = ObjectId()
    database.collection(USERS).insert_one({"_id": user, "email": "owner@example.com"})
    assert cli(mongodb_uri, "device", "add", "--mac", kit.mac, "--client-id", kit.client_id,
               operator="station").exit_code == 0  # fmt: skip
    assert cli(mongodb_uri, "device", "allocate", kit.client_id, "--user", str(user)).exit_code == 0
    policy = ServicePolicy(token_min_interval=0.001, renew_min_interval=0.0)
    service = ProvisioningService(database, ca, policy)
    first = provision(service, kit)
    kit.new_key()
    renewed = ask(service, kit, {"v": 1, "op": "renew", "csr": kit.csr()})
    proof = kit.key.sign(
        protocol.renewal_proof_message(kit.client_id, renewed["serial"], renewed["nonce"]),
        ec.ECDSA(hashes.SHA256()),
    )
    signature = base64.b64encode(proof).decode()
    ask(service, kit, {"op": "renew-confirm", "serial": renewed["serial"], "signature": signature})
    revoked = cli(mongodb_uri, "device", "revoke", kit.client_id, "--reason", "stolen",
                  operator="bob@ops")  # fmt: skip
    assert revoked.exit_code == 0, revoked.output
    approved = cli(mongodb_uri, "device", "reprovision", kit.client_id, operator="bob@ops")
    assert approved.exit_code == 0, approved.output
    kit.new_key()
    again = provision(service, kit)
    SecurityEvents(database).record(kit.client_id, PROBABLE_CLONE, "token request while online")

    shown = cli(mongodb_uri, "device", "history", kit.client_id, "--json")
    assert shown.exit_code == 0, shown.output
    events = json.loads(shown.stdout)["events"]
    story = [(e["source"], e["event"], e["actor"]) for e in events]
    assert story[:2] == [("device", "registered", "-"), ("operator", "allocate", "alice@ops")]
    assert ("operator", "revoke", "bob@ops") in story
    times = [e["at"] for e in events]
    assert times == sorted(times)
    revocations = [e["details"] for e in events if e["event"] == "certificate-revoked"]
    # The first certificate, replaced by the renewal; the renewed one, revoked by bob.
    assert [r["serial"] for r in revocations] == [first["serial"], renewed["serial"]]
    assert revocations[1]["reason"] == "stolen"
    operator_revoke = next(e for e in events if e["event"] == "revoke")
    assert operator_revoke["details"]["serials"] == [renewed["serial"]]
    assert ("operator", "reprovision-approval", "bob@ops") in story
    allocate = next(e for e in events if e["event"] == "allocate")
    assert allocate["details"]["userId"] == str(user)
    assert json.loads(shown.stdout)["device"]["certificateSerial"] == again["serial"]
    issued = [
        (e["details"]["serial"], e["details"]["kind"], e["details"]["state"])
        for e in events
        if e["event"] == "certificate-issued"
    ]
    assert issued == [
        (first["serial"], "first", "superseded"),
        (renewed["serial"], "renewal", "revoked"),
        (again["serial"], "first", "current"),
    ]
    # Each certificate is issued before it is revoked, and the story ends with the clone.
    position = {(e["event"], e["details"].get("serial")): i for i, e in enumerate(events)}
    for serial in (first["serial"], renewed["serial"]):
        assert position[("certificate-issued", serial)] < position[("certificate-revoked", serial)]
    assert story[-1] == ("security", PROBABLE_CLONE, "-")

    text = cli(mongodb_uri, "device", "history", kit.client_id)
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{kit.client_id} (MAC {kit.mac})")
    assert any("allocate" in line and "alice@ops" in line for line in lines)
    assert any("revoke" in line and "bob@ops" in line and "stolen" in line for line in lines)
    assert any("certificate-issued" in line and again["serial"] in line for line in lines)


def test_a_refused_action_records_nothing(database: Database, mongodb_uri: str) -> None:
    assert cli(mongodb_uri, "device", "add", "--mac", "02:00:00:00:AA:02").exit_code == 0
    refused = cli(mongodb_uri, "device", "allocate", "02:00:00:00:AA:02", "--user", str(ObjectId()))
    assert refused.exit_code == 1
    assert database.collection(OPERATOR_ACTIONS).count_documents({}) == 0
    unknown = cli(mongodb_uri, "device", "history", "no-such-device")
    assert unknown.exit_code == 1
    assert "no device with clientId 'no-such-device'" in unknown.output


def test_the_operator_is_named_or_taken_from_the_login(database: Database) -> None:
    assert current_operator({OPERATOR_ENV: "  carol@example.com "}) == "carol@example.com"
    assert "@" in current_operator({})
    record = OperatorActionLog(database).record(OperatorAction.ALLOCATE, "dev-1", "carol", {"a": 1})
    stored = database.collection(OPERATOR_ACTIONS).find_one({"_id": record["_id"]})
    assert stored is not None
    assert {k: stored[k] for k in ("action", "device_id", "operator", "details")} == {
        "action": "allocate",
        "device_id": "dev-1",
        "operator": "carol",
        "details": {"a": 1},
    }

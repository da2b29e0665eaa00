"""AclSync against a real Mosquitto and the test database: web-app writes reach the broker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from server.broker.acl_sync import AclSync, parse_serial, read_broker_state
from server.pki.ca import serial_hex
from server.store.schema import CERTIFICATE_REVOCATIONS, DEVICE_ACLS, DEVICE_CERTIFICATES
from tests.broker_fixture import (
    ACCEPTED,
    NOT_AUTHORIZED,
    ConnectRefused,
    LocalBroker,
    can_connect,
)

WITHIN_S = 5.0


def _eventually(check: Callable[[], bool], what: str, timeout: float = WITHIN_S) -> float:
    """Poll ``check``; return how long it took (fails after ``timeout``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(params=["change_stream", "polling"])
def sync(request: pytest.FixtureRequest, broker: LocalBroker) -> Iterator[AclSync]:
    assert broker.database is not None
    acl_sync = AclSync(
        broker.database,
        broker.ca,
        broker.layout,
        interval=0.2,
        use_change_streams=request.param == "change_stream",
    ).start()
    try:
        _eventually(lambda: acl_sync.syncs > 0, "first sync")
        assert acl_sync.mode == request.param
        yield acl_sync
    finally:
        acl_sync.stop()


def _acl_doc(device_id: str, tier: str, rules: list[dict[str, object]]) -> dict[str, object]:
    """A document as the web app (Prisma) writes it."""
    return {"device_id": device_id, "tier": tier, "rules": rules, "last_updated": _now()}


def test_web_app_insert_and_update_reach_the_running_broker(
    broker: LocalBroker, sync: AclSync
) -> None:
    assert broker.database is not None
    acls = broker.database.collection(DEVICE_ACLS)
    files, _ = broker.device("web-1")
    with broker.client(files, broker.layout.operational_port) as device:
        assert device.publish("devices/web-1/app/x") == NOT_AUTHORIZED
        reloads, updates = sync.reloads, sync.rights_updates
        acls.insert_one(_acl_doc("web-1", "2", []))
        took = _eventually(lambda: device.publish("devices/web-1/app/x") in ACCEPTED, "insert")
        # Counted after the broker's ack; a rights change needs no reload.
        _eventually(lambda: sync.rights_updates > updates, "rights update counted")
        assert sync.reloads == reloads
        print(f"{sync.mode}: insert applied after {took:.2f} s")

        rule = {"action": "publish", "topic": "apps/web-1/out", "allow": True}
        acls.update_one(
            {"device_id": "web-1"},
            {"$set": {"tier": "1", "rules": [rule], "last_updated": _now()}},
        )
        _eventually(lambda: device.publish("devices/web-1/app/x") == NOT_AUTHORIZED, "update")
        assert device.publish("apps/web-1/out") in ACCEPTED

        acls.delete_one({"device_id": "web-1"})
        _eventually(lambda: device.publish("apps/web-1/out") == NOT_AUTHORIZED, "delete")
        assert device.publish("devices/web-1/status") in ACCEPTED  # the baseline stays


def test_revocation_cuts_the_live_session_and_refuses_the_next_connect(
    broker: LocalBroker, sync: AclSync
) -> None:
    assert broker.database is not None
    port = broker.layout.operational_port
    files, cert = broker.device("rev-1")
    other, _ = broker.device("rev-2")
    with broker.client(files, port) as device:
        assert device.publish("devices/rev-1/status") in ACCEPTED
        # What the server's revocation writes: the revocation record + the certificate's status.
        broker.database.collection(CERTIFICATE_REVOCATIONS).insert_one(
            {"serial": serial_hex(cert), "device_id": "rev-1", "revoked_at": _now(),
             "reason": "keyCompromise"}
        )  # fmt: skip
        broker.database.collection(DEVICE_CERTIFICATES).insert_one(
            {"device_id": "rev-1", "status": "revoked", "fingerprint": "f-rev-1"}
        )
        # The open session is cut (the CRL only applies at the next handshake).
        _eventually(lambda: not device.connected, "cut")

    # A device denied everything is cut before its CRL is signed: until the reload a
    # reconnect has no rights, then its handshake is refused.
    def refused() -> bool:
        try:
            with broker.client(files, port) as again:
                assert again.publish("devices/rev-1/status") == NOT_AUTHORIZED
                return False
        except (ConnectRefused, TimeoutError):
            return True

    _eventually(refused, "handshake refused")
    assert not can_connect(broker, files, port)
    cli = broker.mosquitto_pub(files, port, "devices/rev-1/status")
    assert cli.returncode != 0, cli.stdout + cli.stderr
    # Another device is untouched, with paho and with the CLI.
    assert can_connect(broker, other, port)
    cli = broker.mosquitto_pub(other, port, "devices/rev-2/status")
    assert cli.returncode == 0, cli.stdout + cli.stderr
    crl = x509.load_pem_x509_crl(broker.layout.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def test_reprovisioned_device_gets_its_rights_back(broker: LocalBroker) -> None:
    """device_certificates holds the CURRENT certificate: active again -> no deny block."""
    assert broker.database is not None
    certificates = broker.database.collection(DEVICE_CERTIFICATES)
    old_files, old_cert = broker.device("re-1")
    certificates.insert_one({"device_id": "re-1", "status": "revoked", "fingerprint": "a"})
    broker.database.collection(CERTIFICATE_REVOCATIONS).insert_one(
        {"serial": serial_hex(old_cert), "device_id": "re-1", "revoked_at": _now()}
    )
    acl_sync = AclSync(broker.database, broker.ca, broker.layout)
    assert acl_sync.sync_now() is True
    new_files, _ = broker.device("re-1")
    with broker.client(new_files, broker.layout.operational_port) as device:
        _eventually(lambda: device.publish("devices/re-1/status") == NOT_AUTHORIZED, "deny")
        certificates.update_one({"device_id": "re-1"}, {"$set": {"status": "active"}})
        assert acl_sync.sync_now() is True
        _eventually(lambda: device.publish("devices/re-1/status") in ACCEPTED, "allowed again")
    assert not can_connect(broker, old_files, broker.layout.operational_port)


def test_sync_without_changes_does_not_reload(broker: LocalBroker) -> None:
    assert broker.database is not None
    acl_sync = AclSync(broker.database, broker.ca, broker.layout)
    # The broker fixture wrote the files from the same (empty) database.
    assert acl_sync.sync_now() is False
    assert acl_sync.reloads == 0
    broker.database.collection(DEVICE_ACLS).insert_one(_acl_doc("d-1", "3", []))
    assert acl_sync.sync_now() is True
    assert acl_sync.sync_now() is False
    # The new block went to the broker's rights table; a CRL did not change: no reload.
    assert (acl_sync.rights_updates, acl_sync.reloads) == (1, 0)


def test_crl_is_reissued_before_it_expires(broker: LocalBroker) -> None:
    assert broker.database is not None
    layout = broker.layout
    # A CRL built 2 days ago with 7 days of validity has 5 left: due for its daily refresh.
    old = broker.ca.build_crl([], timedelta(days=5))
    layout.crl_path.write_bytes(old)
    layout.factory_crl_path.write_bytes(
        broker.ca.build_crl([], timedelta(days=5), issuer="factory")
    )
    acl_sync = AclSync(broker.database, broker.ca, broker.layout, crl_validity=timedelta(days=7))
    assert acl_sync.sync_now() is True
    for path in (layout.crl_path, layout.factory_crl_path):
        crl = x509.load_pem_x509_crl(path.read_bytes())
        assert crl.next_update_utc is not None
        assert crl.next_update_utc - _now() > timedelta(days=6, hours=23), path.name
    assert acl_sync.sync_now() is False  # fresh now: left alone
    # The broker took the new CRLs: devices and birth certificates still connect.
    files, _ = broker.device("crl-1")
    assert can_connect(broker, files, layout.operational_port)
    birth, _ = broker.device("crl-1", birth=True)
    assert can_connect(broker, birth, layout.provisioning_port)


def test_state_reader_accepts_serial_spellings_and_skips_garbage(broker: LocalBroker) -> None:
    assert broker.database is not None
    revocations = broker.database.collection(CERTIFICATE_REVOCATIONS)
    revocations.insert_many(
        [
            {"serial": "0A1B", "device_id": "a", "revoked_at": _now()},
            {"serial": "0a:1c", "device_id": "b"},
            {"serial": 77, "device_id": "c"},
            {"serial": "not-hex", "device_id": "d"},
            {"serial": True, "device_id": "e"},
            {"device_id": "f"},
        ]
    )
    state = read_broker_state(broker.database)
    assert sorted(state.serial_set) == [77, 0x0A1B, 0x0A1C]
    assert parse_serial("-5") is None and parse_serial(0) is None


def test_failed_reload_is_retried_and_stop_is_prompt(broker: LocalBroker) -> None:
    """No broker to signal: the files are written, the reload stays pending until it works."""
    assert broker.database is not None
    broker.stop()
    broker.database.collection(DEVICE_ACLS).insert_one(_acl_doc("d-1", "2", []))
    acl_sync = AclSync(broker.database, broker.ca, broker.layout, interval=0.1).start()
    try:
        _eventually(lambda: "user d-1" in broker.layout.acl_operational.read_text(), "written")
        time.sleep(0.3)
        assert acl_sync.reloads == 0
        broker.mosquitto.start()
        _eventually(lambda: acl_sync.reloads == 1, "reload retried once the broker is back")
    finally:
        started = time.monotonic()
        acl_sync.stop()
        assert time.monotonic() - started < 2.0

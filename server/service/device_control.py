"""Operator decisions on one device: revoke, approve re-provisioning, quarantine, release.

One function per decision, each a short sequence of guarded writes that checks
everything it can before the first write (a refused decision changes nothing). The
CLI calls them; the operations tooling records who called them (``operator_actions``).
Revocations go to ``certificate_revocations`` (birth certificates with ``"kind":
"birth"``); the broker's ACL/CRL sync applies them and cuts live sessions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from server.errors import ServerError, WrongState
from server.service.policy import REPROVISION_FROM, live_session_left
from server.store.certificates import CertificateRecords, remove_revocation
from server.store.db import Database
from server.store.devices import DeviceRepository, utcnow
from server.store.issuances import IssuanceKind, IssuanceLedger, IssuanceState
from server.store.schema import CertificateStatus, DeviceStatus

BIRTH = [IssuanceKind.BIRTH.value]


@dataclass(frozen=True)
class Decision:
    client_id: str
    serials: tuple[str, ...] = ()
    status: str | None = None


def revoke_device(database: Database, device_ref: str, reason: str) -> Decision:
    """Revoke the device's current and pending certificates; the device goes to ERROR."""
    devices = DeviceRepository(database)
    client_id = str(devices.find(device_ref)["clientId"])
    records = CertificateRecords(database)
    ledger = IssuanceLedger(database)
    record = records.current(client_id)
    active = record is not None and record.get("status") != CertificateStatus.REVOKED.value
    if not active and not ledger.open_records(client_id):
        raise ServerError(f"device {client_id} has no active certificate")
    serials = set(ledger.retire_open(client_id, IssuanceState.REVOKED, reason))
    for serial in (
        records.revoke_current(client_id, reason),
        records.revoke_pending(client_id, reason),
    ):
        if serial:
            serials.add(serial)
    devices.transition(
        client_id,
        expected=set(DeviceStatus) - {DeviceStatus.UNALLOCATED},
        new=DeviceStatus.ERROR,
        set_fields={"errorMessage": f"certificate {', '.join(sorted(serials))} revoked: {reason}"},
    )
    return Decision(client_id, tuple(sorted(serials)), DeviceStatus.ERROR.value)


def approve_reprovision(
    database: Database,
    device_ref: str,
    *,
    offline_timeout: timedelta,
    force: bool = False,
    now: datetime | None = None,
) -> Decision:
    """Let a provisioned device start again with its birth certificate (status ALLOCATED).

    A device whose operational session looks live (ACTIVE, heard from within
    ``offline_timeout``) is refused unless ``force``: its token request would be
    taken for a clone, and approving a device in service is rarely what was meant.
    """
    devices = DeviceRepository(database)
    doc = devices.find(device_ref)
    client_id, status = str(doc["clientId"]), str(doc.get("status"))
    if status not in {s.value for s in REPROVISION_FROM}:
        raise WrongState(
            f"device {client_id} is {status}; only a PROVISIONED, ACTIVE, OFFLINE or ERROR "
            "device needs approval to re-provision"
        )
    left = live_session_left(doc, now or utcnow(), offline_timeout)
    if left > 0 and not force:
        raise ServerError(
            f"device {client_id} is online (its session counts as live for {left:.0f} s more); "
            "revoke it first (`provision-server device revoke`) or pass --force"
        )
    devices.transition(
        client_id,
        expected={DeviceStatus(status)},
        new=DeviceStatus.ALLOCATED,
        set_fields={"allocatedAt": now or utcnow()},
    )
    return Decision(client_id, status=DeviceStatus.ALLOCATED.value)


def quarantine(database: Database, device_ref: str, reason: str) -> Decision:
    """Put the device's birth certificate on the factory CRL: no provisioning with it."""
    client_id = str(DeviceRepository(database).find(device_ref)["clientId"])
    ledger = IssuanceLedger(database)
    births = ledger.open_records(client_id, BIRTH)
    if not births:
        if any(
            r.get("kind") == IssuanceKind.BIRTH.value and r.get("state") == "revoked"
            for r in ledger.history(client_id)
        ):
            raise ServerError(f"device {client_id} is already quarantined")
        raise ServerError(
            f"no birth certificate of {client_id} is recorded; program the board with "
            "provision-station (it records the birth certificate) and quarantine it then"
        )
    for record in births:
        ledger.retire(record, IssuanceState.REVOKED, f"quarantined: {reason}")
    return Decision(client_id, tuple(str(r["serial"]) for r in births))


def release(database: Database, device_ref: str) -> Decision:
    """Take a quarantined birth certificate off the factory CRL again."""
    client_id = str(DeviceRepository(database).find(device_ref)["clientId"])
    ledger = IssuanceLedger(database)
    births = [r for r in ledger.history(client_id) if r.get("kind") == IssuanceKind.BIRTH.value]
    # Only the newest birth certificate can come back: an older one was replaced.
    if not births or births[-1].get("state") != IssuanceState.REVOKED.value:
        raise ServerError(f"device {client_id} is not quarantined")
    serial = str(births[-1]["serial"])
    # Ledger first: a crash in between leaves a current certificate still on the CRL.
    ledger.set_state(
        serial, IssuanceState.CURRENT, "released", expected=[IssuanceState.REVOKED.value]
    )
    remove_revocation(database, serial)
    return Decision(client_id, (serial,))

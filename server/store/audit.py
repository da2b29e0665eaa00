"""``provision-server audit``: no certificate the CA signed escapes revocation.

The invariant, over the issuance ledger: every serial the CA signed is *current*,
*pending* (at most one per device), *expired*, or *on the CRL* (in
``certificate_revocations``). Also checked: at most one current operational and one
current birth certificate per device, a current operational record is the one the
device uses, and every serial the device documents name has a ledger record (a
certificate without one was signed behind the ledger's back).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from server.store.db import Database, Document
from server.store.issuances import IssuanceKind, IssuanceLedger, IssuanceState
from server.store.schema import CERTIFICATE_REVOCATIONS, DEVICE_CERTIFICATES, DEVICES


@dataclass
class AuditReport:
    certificates: int = 0
    outcome: Counter[str] = field(default_factory=Counter)
    """current / pending / expired / on-crl counts (each serial counted once)."""
    exceptions: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.exceptions

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "certificates": self.certificates,
            **{k: self.outcome[k] for k in ("current", "pending", "expired", "on-crl")},
            "exceptions": self.exceptions,
        }


def _serial_of(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value.replace(":", "").upper().lstrip("0") or "0"
    return None


def _aware(value: object) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def audit(database: Database, now: datetime | None = None) -> AuditReport:
    """Check the ledger against the CRL's source and the device documents."""
    now = now or datetime.now(timezone.utc)
    report = AuditReport()
    revoked = {
        serial
        for doc in database.call(
            lambda: list(database.collection(CERTIFICATE_REVOCATIONS).find({}, {"serial": 1}))
        )
        if (serial := _serial_of(doc.get("serial"))) is not None
    }
    known: set[str] = set()
    pending: defaultdict[str, list[str]] = defaultdict(list)
    current: defaultdict[tuple[str, bool], list[str]] = defaultdict(list)
    for record in IssuanceLedger(database).all():
        serial = _serial_of(record.get("serial")) or "?"
        device, kind, state = record.get("device_id"), record.get("kind"), record.get("state")
        known.add(serial)
        report.certificates += 1
        where = f"serial {serial} (device {device}, {kind})"
        not_after = _aware(record.get("not_after"))
        if not_after is not None and not_after <= now:
            report.outcome["expired"] += 1
        elif serial in revoked:
            report.outcome["on-crl"] += 1
        elif state == IssuanceState.PENDING.value:
            report.outcome["pending"] += 1
            pending[str(device)].append(serial)
        elif state == IssuanceState.CURRENT.value:
            report.outcome["current"] += 1
            current[(str(device), kind == IssuanceKind.BIRTH.value)].append(serial)
        else:
            report.exceptions.append(f"{where} is {state!r} but not on the CRL")
        if not_after is None:
            report.exceptions.append(f"{where} has no not_after")
    for device, serials in sorted(pending.items()):
        if len(serials) > 1:
            report.exceptions.append(
                f"device {device} has {len(serials)} pending renewals: {', '.join(serials)}"
            )
    for (device, birth), serials in sorted(current.items()):
        if len(serials) > 1:
            what = "birth" if birth else "operational"
            report.exceptions.append(
                f"device {device} has {len(serials)} current {what} certificates: "
                f"{', '.join(serials)}"
            )
    _check_devices(database, now, known, revoked, current, report)
    return report


def _check_devices(
    database: Database,
    now: datetime,
    known: set[str],
    revoked: set[str],
    current: dict[tuple[str, bool], list[str]],
    report: AuditReport,
) -> None:
    """Serials the device documents name must be in the ledger; the ledger's current is in use."""
    in_use: dict[str, str] = {}
    devices = database.call(
        lambda: list(
            database.collection(DEVICES).find(
                {"certificateSerial": {"$exists": True}},
                {"clientId": 1, "certificateSerial": 1, "certificateExpiresAt": 1},
            )
        )
    )
    for doc in devices:
        serial = _serial_of(doc.get("certificateSerial"))
        if serial is None:
            continue
        in_use[str(doc.get("clientId"))] = serial
        _must_be_known(serial, doc.get("certificateExpiresAt"), f"device {doc.get('clientId')}",
                       now, known, revoked, report)  # fmt: skip
    records: list[Document] = database.call(
        lambda: list(
            database.collection(DEVICE_CERTIFICATES).find(
                {}, {"device_id": 1, "serial": 1, "expires_at": 1, "renewal": 1}
            )
        )
    )
    for doc in records:
        serial = _serial_of(doc.get("serial"))
        where = f"device_certificates of {doc.get('device_id')}"
        if serial is not None:
            _must_be_known(serial, doc.get("expires_at"), where, now, known, revoked, report)
        renewal = doc.get("renewal")
        if isinstance(renewal, dict) and (pending := _serial_of(renewal.get("serial"))):
            _must_be_known(
                pending, renewal.get("expires_at"), f"{where} (pending renewal)",
                now, known, revoked, report,
            )  # fmt: skip
    for (device, birth), serials in sorted(current.items()):
        used = in_use.get(device)
        if birth or used is None:
            continue
        for serial in serials:
            if serial != used:
                report.exceptions.append(
                    f"serial {serial} (device {device}) is current in the ledger but the "
                    f"device uses {used}; it is neither in use nor on the CRL"
                )


def _must_be_known(
    serial: str,
    expires: object,
    where: str,
    now: datetime,
    known: set[str],
    revoked: set[str],
    report: AuditReport,
) -> None:
    if serial in known or serial in revoked:
        return
    expiry = _aware(expires)
    if expiry is not None and expiry <= now:
        return
    report.exceptions.append(f"serial {serial} named by {where} has no issuance record")

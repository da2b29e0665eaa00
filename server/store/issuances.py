"""The issuance ledger, ``certificate_issuances`` (ours): one record per certificate the CA signs.

A record is written *before* the certificate leaves the server (the response to the
device, the station's PUT to the board), so every serial the CA ever signed can be found
and revoked; ``provision-server audit`` checks that over this collection. The fields are
few and flat because other tools read them (``device history``, the web app):

    serial      upper-case hex without colons (the ``certificateSerial`` spelling), unique
    device_id   the device's clientId
    kind        birth (factory CA) | first (token + CSR) | renewal (operational session)
    issued_at   when it was signed;  not_after: when it expires
    reason      why it was signed: factory, provisioned, re-provisioned, renewal
    state       current | pending | superseded | revoked
    state_reason, updated_at   why and when it last changed state (absent until then)

``current``: the certificate in use (at most one birth and one operational per device);
``pending``: a renewal signed but not yet confirmed (at most one per device);
``superseded``: replaced (re-provisioning, renewal, re-birth) and revoked;
``revoked``: revoked by an operator (device revoke, quarantine).
A record leaves current/pending only after its serial is in ``certificate_revocations``,
so a crash between the two writes leaves a revoked certificate, never a loose one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Final

import pymongo
import pymongo.errors
from cryptography import x509

from server.store.certificates import IssuedCertificate, add_revocation
from server.store.db import Database, Document
from server.store.devices import utcnow
from server.store.schema import CERTIFICATE_ISSUANCES


class IssuanceKind(str, Enum):
    BIRTH = "birth"
    FIRST = "first"
    RENEWAL = "renewal"


class IssuanceState(str, Enum):
    CURRENT = "current"
    PENDING = "pending"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


OPEN_STATES: Final = (IssuanceState.CURRENT.value, IssuanceState.PENDING.value)
OPERATIONAL_KINDS: Final = (IssuanceKind.FIRST.value, IssuanceKind.RENEWAL.value)


def _issued_at(record: Document) -> datetime:
    issued = record.get("issued_at")
    return issued if isinstance(issued, datetime) else datetime.min.replace(tzinfo=timezone.utc)


class IssuanceLedger:
    """Records, looks up and retires issued certificates."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.collection = database.collection(CERTIFICATE_ISSUANCES)

    def record(
        self,
        device_id: str,
        cert: IssuedCertificate,
        kind: IssuanceKind,
        state: IssuanceState,
        reason: str,
    ) -> None:
        """Insert the record of a newly signed certificate (the same serial again: no-op)."""
        doc: Document = {
            "serial": cert.serial,
            "device_id": device_id,
            "kind": kind.value,
            "issued_at": utcnow(),
            "not_after": cert.expires_at,
            "reason": reason,
            "state": state.value,
        }
        self.database.insert_new(CERTIFICATE_ISSUANCES, doc)  # False: recorded before

    def find(self, serial: str) -> Document | None:
        return self.database.call(lambda: self.collection.find_one({"serial": serial}))

    @staticmethod
    def by_device(device_id: str) -> tuple[str, tuple[str, Any]]:
        """The lookup of all the device's records (``Database.find_all_by`` arguments)."""
        return CERTIFICATE_ISSUANCES, ("device_id", device_id)

    def open_records(
        self,
        device_id: str,
        kinds: Iterable[str] = OPERATIONAL_KINDS,
        records: list[Document] | None = None,
    ) -> list[Document]:
        """The device's current and pending records of ``kinds``, oldest first.

        All of the device's records by ``device_id`` (a handful), filtered here: one
        lookup that group commit shares with the other requests in flight. ``records``:
        that lookup's answer, read already (in another batch); otherwise read now.
        """
        wanted = set(kinds)
        if records is None:
            records = self.database.find_all_by(*self.by_device(device_id))
        found = [
            record
            for record in records
            if record.get("device_id") == device_id
            and record.get("kind") in wanted
            and record.get("state") in OPEN_STATES
        ]
        return sorted(found, key=_issued_at)

    def history(self, device_id: str) -> list[Document]:
        """Every record of the device, oldest first."""
        return self.database.call(
            lambda: list(
                self.collection.find({"device_id": device_id}).sort("issued_at", pymongo.ASCENDING)
            )
        )

    def all(self) -> Iterator[Document]:
        projection = {"_id": 0, "serial": 1, "device_id": 1, "kind": 1, "state": 1, "not_after": 1}
        return iter(self.database.call(lambda: list(self.collection.find({}, projection))))

    def set_state(
        self, serial: str, state: IssuanceState, reason: str, *, expected: Iterable[str]
    ) -> bool:
        """Move ``serial`` from one of ``expected`` to ``state``; False if it was not there."""
        result = self.database.call(
            lambda: self.collection.update_one(
                {"serial": serial, "state": {"$in": list(expected)}},
                {"$set": {"state": state.value, "state_reason": reason, "updated_at": utcnow()}},
            )
        )
        return result.matched_count == 1

    def retire(self, record: Document, state: IssuanceState, reason: str) -> None:
        """Revoke ``record``'s certificate, then mark it ``state`` (superseded or revoked)."""
        not_after = record.get("not_after")
        add_revocation(
            self.database,
            str(record["device_id"]),
            str(record["serial"]),
            reason,
            not_after if isinstance(not_after, datetime) else None,
            birth=record.get("kind") == IssuanceKind.BIRTH.value,
        )
        self.set_state(str(record["serial"]), state, reason, expected=OPEN_STATES)

    def retire_open(
        self,
        device_id: str,
        state: IssuanceState,
        reason: str,
        *,
        keep: str | None = None,
        kinds: Iterable[str] = OPERATIONAL_KINDS,
        records: list[Document] | None = None,
    ) -> list[str]:
        """Retire every current/pending record of the device but ``keep``; their serials.

        ``records``: the device's records read already (``by_device``), else read now.
        """
        retired = []
        for record in self.open_records(device_id, kinds, records):
            if record.get("serial") != keep:
                self.retire(record, state, reason)
                retired.append(str(record["serial"]))
        return retired

    def record_birth(self, device_id: str, cert: x509.Certificate) -> str:
        """Record a birth certificate the station signed; older ones of the device are revoked."""
        issued = IssuedCertificate.of(cert)
        self.record(device_id, issued, IssuanceKind.BIRTH, IssuanceState.CURRENT, "factory")
        self.retire_open(
            device_id,
            IssuanceState.SUPERSEDED,
            f"re-birthed as {issued.serial}",
            keep=issued.serial,
            kinds=[IssuanceKind.BIRTH.value],
        )
        return issued.serial

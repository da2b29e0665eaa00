"""One device's history: registration, operator actions, certificates issued and revoked,
refusals that looked like attacks.

``provision-server device history`` shows it; the web app can build the same view
from the collections named here (docs/schema.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pymongo
from bson import ObjectId

from server.store.db import Database, Document
from server.store.issuances import IssuanceLedger
from server.store.operator_actions import OperatorActionLog
from server.store.schema import CERTIFICATE_REVOCATIONS
from server.store.security_events import SecurityEvents


@dataclass(frozen=True)
class HistoryEvent:
    """One line of a device's history."""

    at: datetime
    source: str  # "device", "operator", "issuance", "revocation", "security"
    event: str
    actor: str
    details: Mapping[str, Any]

    def to_json(self) -> Document:
        return {
            "at": self.at,
            "source": self.source,
            "event": self.event,
            "actor": self.actor,
            "details": dict(self.details),
        }


def _aware(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.min.replace(tzinfo=timezone.utc)


def _operator_events(docs: Iterable[Document]) -> Iterable[HistoryEvent]:
    for doc in docs:
        yield HistoryEvent(
            _aware(doc.get("at")),
            "operator",
            str(doc.get("action", "?")),
            str(doc.get("operator", "?")),
            doc.get("details") or {},
        )


def _revocation_events(docs: Iterable[Document]) -> Iterable[HistoryEvent]:
    for doc in docs:
        yield HistoryEvent(
            _aware(doc.get("revoked_at")),
            "revocation",
            "certificate-revoked",
            "-",
            {"serial": doc.get("serial"), "reason": doc.get("reason"), "kind": doc.get("kind")},
        )


def device_history(database: Database, device: Mapping[str, Any]) -> list[HistoryEvent]:
    """Registration, operator actions, issued and revoked certificates, oldest first."""
    device_id = str(device["clientId"])
    events: list[HistoryEvent] = []
    if isinstance(device.get("_id"), ObjectId):  # the ObjectId holds its creation second
        registered = device["_id"].generation_time
        events.append(
            HistoryEvent(registered, "device", "registered", "-", {"macID": device.get("macID")})
        )
    events += _operator_events(OperatorActionLog(database).for_device(device_id))
    events += issuance_events(database, device_id)
    events += security_events(database, device_id)
    revocations = database.call(
        lambda: list(
            database.collection(CERTIFICATE_REVOCATIONS)
            .find({"device_id": device_id})
            .sort("revoked_at", pymongo.ASCENDING)
        )
    )
    events += _revocation_events(revocations)
    return sorted(events, key=lambda e: e.at)  # stable: registration stays first


def issuance_events(database: Database, device_id: str) -> list[HistoryEvent]:
    """Certificates the CAs signed for the device, from the issuance ledger."""
    return [
        HistoryEvent(
            _aware(doc.get("issued_at")),
            "issuance",
            "certificate-issued",
            "-",
            {
                "serial": doc.get("serial"),
                "kind": doc.get("kind"),
                "reason": doc.get("reason"),
                "not_after": doc.get("not_after"),
                "state": doc.get("state"),
            },
        )
        for doc in IssuanceLedger(database).history(device_id)
    ]


def security_events(database: Database, device_id: str) -> list[HistoryEvent]:
    """Refusals that looked like attacks on the device (e.g. a probable clone)."""
    return [
        HistoryEvent(
            _aware(doc.get("at")),
            "security",
            str(doc.get("kind", "?")),
            "-",
            {"detail": doc.get("detail")},
        )
        for doc in SecurityEvents(database).of(device_id)
    ]

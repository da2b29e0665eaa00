"""What the broker's files are made of, kept in memory and updated document by document.

``FleetState`` mirrors three collections by ``_id``: ``device_acls`` (rendered into one
ACL block per device, cached), ``device_certificates`` (whose current certificate is
revoked) and ``certificate_revocations`` (the two CRLs). A change stream names the ``_id``s
that changed; ``refresh`` re-reads just those, so one change costs a few indexed reads and
no rescan of 100,000 devices. ``changes`` tells which devices to cut after a refresh.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Final

from server.broker.acl_rules import device_block, effective_blocks, render_effective
from server.store.db import Database, Document
from server.store.schema import (
    CERTIFICATE_REVOCATIONS,
    DEVICE_ACLS,
    DEVICE_CERTIFICATES,
    CertificateStatus,
)

log = logging.getLogger(__name__)

WATCHED: Final = (DEVICE_ACLS, DEVICE_CERTIFICATES, CERTIFICATE_REVOCATIONS)
BIRTH_KIND: Final = "birth"
"""``certificate_revocations.kind`` of a birth certificate (factory CRL); absent: device CA."""
CRL_EXPIRY_GRACE: Final = timedelta(days=1)
"""An expired certificate is refused by TLS anyway; it leaves the CRL a day after expiry."""

_ACL_FIELDS: Final = {"_id": 1, "device_id": 1, "tier": 1, "rules": 1}
_CERT_FIELDS: Final = {"_id": 1, "device_id": 1, "status": 1, "serial": 1}


def parse_serial(value: object) -> int | None:
    """A revocation's ``serial``: hex string (``certificateSerial`` spelling, colons ok) or int."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str):
        text = value.replace(":", "").strip()
        try:
            number = int(text, 16)
        except ValueError:
            return None
        return number if number > 0 else None
    return None


def _aware(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return None


@dataclass(frozen=True)
class Revocation:
    serial: int
    revoked_at: datetime
    device_id: str | None
    birth: bool
    expires_at: datetime | None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Revocation | None:
        serial = parse_serial(doc.get("serial"))
        if serial is None:
            log.warning("event=revocation_skipped reason=bad_serial serial=%r", doc.get("serial"))
            return None
        revoked_at = _aware(doc.get("revoked_at")) or _aware(doc.get("created_at"))
        device_id = doc.get("device_id")
        return cls(
            serial=serial,
            revoked_at=revoked_at or datetime.now(timezone.utc),
            device_id=device_id if isinstance(device_id, str) else None,
            birth=doc.get("kind") == BIRTH_KIND,
            expires_at=_aware(doc.get("expires_at")),
        )


@dataclass(frozen=True)
class Cuts:
    """Devices whose sessions a refresh asks to cut."""

    devices: frozenset[str] = frozenset()
    """A device certificate revoked, or the current one marked revoked: every session."""
    births: frozenset[str] = frozenset()
    """A birth certificate revoked: the birth sessions only."""

    def __bool__(self) -> bool:
        return bool(self.devices or self.births)


@dataclass
class FleetState:
    acl_docs: dict[Any, Document] = field(default_factory=dict)
    blocks: dict[Any, tuple[str, list[str]] | None] = field(default_factory=dict)
    certificates: dict[Any, tuple[str, str, int | None]] = field(default_factory=dict)
    """``_id -> (device_id, status, serial)`` of each device's current certificate."""
    revocations: dict[Any, Revocation] = field(default_factory=dict)
    _acl_text: str | None = field(default=None, repr=False)
    _effective: dict[str, tuple[str, ...]] | None = field(default=None, repr=False)
    _revoked: frozenset[str] | None = field(default=None, repr=False)

    # -- reading --

    @classmethod
    def load(cls, database: Database) -> FleetState:
        """Everything, in three scans (start, full resync, polling mode)."""
        state = cls()
        database.call(lambda: state._load_all(database))
        return state

    def _load_all(self, database: Database) -> None:
        for doc in database.collection(DEVICE_ACLS).find({}, _ACL_FIELDS):
            self._set_acl(doc["_id"], doc)
        for doc in database.collection(DEVICE_CERTIFICATES).find({}, _CERT_FIELDS):
            self._set_certificate(doc["_id"], doc)
        for doc in database.collection(CERTIFICATE_REVOCATIONS).find({}):
            self._set_revocation(doc["_id"], doc)

    def refresh(self, database: Database, dirty: Mapping[str, Iterable[Any]]) -> Cuts:
        """Re-read the documents named in ``dirty`` (collection -> ``_id``s); who to cut."""
        before_revoked = self.revoked_device_ids
        new_revocations: list[Revocation] = []

        def read() -> None:
            for collection, ids in dirty.items():
                wanted = list(ids)
                if not wanted or collection not in WATCHED:
                    continue
                projection = {
                    DEVICE_ACLS: _ACL_FIELDS, DEVICE_CERTIFICATES: _CERT_FIELDS,
                }.get(collection)  # fmt: skip
                found = {
                    doc["_id"]: doc
                    for doc in database.collection(collection).find(
                        {"_id": {"$in": wanted}}, projection
                    )
                }
                for _id in wanted:
                    doc = found.get(_id)
                    if collection == DEVICE_ACLS:
                        self._set_acl(_id, doc)
                    elif collection == DEVICE_CERTIFICATES:
                        self._set_certificate(_id, doc)
                    else:
                        known = _id in self.revocations
                        self._set_revocation(_id, doc)
                        if not known and _id in self.revocations:
                            new_revocations.append(self.revocations[_id])

        database.call(read)
        return self._cuts(before_revoked, new_revocations)

    def changes_since(self, before: FleetState) -> Cuts:
        """Cuts between two full loads (polling mode, full resync)."""
        new = [r for _id, r in self.revocations.items() if _id not in before.revocations]
        return self._cuts(before.revoked_device_ids, new)

    def changes_since_files(
        self, crl_serials: frozenset[int], factory_serials: frozenset[int], denied: frozenset[str]
    ) -> Cuts:
        """Cuts against what the broker enforces now (its CRLs and deny blocks): at start,
        a revocation written while no sync ran still cuts its device's sessions."""
        new = [
            r for r in self.revocations.values()
            if r.serial not in (factory_serials if r.birth else crl_serials)
        ]  # fmt: skip
        return self._cuts(denied, new)

    def _cuts(self, before_revoked: frozenset[str], new: list[Revocation]) -> Cuts:
        devices = set(self.revoked_device_ids - before_revoked)
        births: set[str] = set()
        for revocation in new:
            if revocation.device_id is not None:
                (births if revocation.birth else devices).add(revocation.device_id)
        return Cuts(frozenset(devices), frozenset(births - devices))

    # -- one document --

    def _set_acl(self, _id: Any, doc: Document | None) -> None:
        before = self.blocks.get(_id)
        if doc is None:
            self.acl_docs.pop(_id, None)
            self.blocks.pop(_id, None)
        else:
            self.acl_docs[_id] = doc
            self.blocks[_id] = device_block(doc)
        if self.blocks.get(_id) != before:
            self._acl_text = self._effective = None

    def _set_certificate(self, _id: Any, doc: Document | None) -> None:
        device_id = doc.get("device_id") if doc else None
        before = self.certificates.get(_id)
        if doc is None or not isinstance(device_id, str):
            self.certificates.pop(_id, None)
        else:
            self.certificates[_id] = (
                device_id,
                str(doc.get("status")),
                parse_serial(doc.get("serial")),
            )
        if self.certificates.get(_id) != before:
            self._acl_text = self._effective = self._revoked = None

    def _set_revocation(self, _id: Any, doc: Document | None) -> None:
        revocation = Revocation.of(doc) if doc is not None else None
        before = self.revocations.get(_id)
        if revocation is None:
            self.revocations.pop(_id, None)
        else:
            self.revocations[_id] = revocation
        if self.revocations.get(_id) != before:
            self._acl_text = self._effective = self._revoked = None

    # -- what the files say --

    @property
    def revoked_device_ids(self) -> frozenset[str]:
        """Devices whose current certificate is revoked: marked so, or its serial is on the
        device CRL (a revocation written before, or without, the status update)."""
        if self._revoked is None:
            revoked = CertificateStatus.REVOKED.value
            listed = {r.serial for r in self.revocations.values() if not r.birth}
            self._revoked = frozenset(
                device_id
                for device_id, status, serial in self.certificates.values()
                if status == revoked or serial in listed
            )
        return self._revoked

    def serials(self, *, birth: bool, now: datetime | None = None) -> dict[int, datetime]:
        """``serial -> revocation date`` for the device CRL (or the factory CRL)."""
        horizon = (now or datetime.now(timezone.utc)) - CRL_EXPIRY_GRACE
        return {
            r.serial: r.revoked_at
            for r in self.revocations.values()
            if r.birth == birth and (r.expires_at is None or r.expires_at > horizon)
        }

    def device_blocks(self) -> dict[str, tuple[str, ...]]:
        """clientId -> its ``user`` block lines, for the devices that have one (what the
        broker's rights table must hold); computed again only after a change that alters it.
        The result is never changed in place (the sync keeps it as "what the broker has")."""
        if self._effective is None:
            # A device_id held by two documents (no unique index on a foreign database):
            # the first one read wins, as in a full render.
            by_device: dict[str, list[str]] = {}
            for found in self.blocks.values():
                if found is not None:
                    by_device.setdefault(found[0], found[1])
            self._effective = effective_blocks(by_device, self.revoked_device_ids)
        return self._effective

    def operational_acl(self) -> str:
        """The ACL file's text; rendered again only after a change that alters it (a write
        stream of edits that leave every block as it was costs no 100,000-block render)."""
        if self._acl_text is None:
            self._acl_text = render_effective(self.device_blocks())
        return self._acl_text

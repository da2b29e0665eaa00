"""``device_certificates`` (the web app's, one per device) and our revocation list.

The seed makes ``device_id`` unique, so ``device_certificates`` holds the
device's current certificate only; every certificate it replaces or an
operator revokes gets a document in ``certificate_revocations`` (ours), from
which the CRL is built. All writes are idempotent so a crash between them
converges when the device retries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pymongo
import pymongo.errors
from bson import ObjectId
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.pki.ca import fingerprint_sha256, serial_hex
from server.store.db import Database, Document
from server.store.devices import utcnow
from server.store.schema import (
    CERTIFICATE_REVOCATIONS,
    DEVICE_ACLS,
    DEVICE_CERTIFICATES,
    CertificateStatus,
    DeviceTier,
)


@dataclass(frozen=True)
class IssuedCertificate:
    pem: str
    serial: str
    fingerprint: str
    cn: str
    expires_at: datetime

    @classmethod
    def of(cls, cert: x509.Certificate) -> IssuedCertificate:
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        return cls(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=serial_hex(cert),
            fingerprint=fingerprint_sha256(cert),
            cn=str(cn),
            expires_at=cert.not_valid_after_utc,
        )


def add_revocation(
    database: Database,
    client_id: str,
    serial: str,
    reason: str,
    expires_at: datetime | None = None,
    *,
    birth: bool = False,
) -> None:
    """Put ``serial`` in ``certificate_revocations`` (idempotent).

    A birth certificate's document carries ``"kind": "birth"`` (the broker's sync puts
    it on the factory CRL); without ``kind`` it is a device-CA certificate.
    """
    doc: Document = {
        "device_id": client_id,
        "serial": serial,
        "reason": reason,
        "revoked_at": utcnow(),
    }
    if isinstance(expires_at, datetime):
        doc["expires_at"] = expires_at
    if birth:
        doc["kind"] = "birth"
    revocations = database.collection(CERTIFICATE_REVOCATIONS)
    with contextlib.suppress(pymongo.errors.DuplicateKeyError):
        database.call(
            lambda: revocations.update_one({"serial": serial}, {"$setOnInsert": doc}, upsert=True)
        )


def remove_revocation(database: Database, serial: str) -> None:
    """Take ``serial`` off the revocation list (releasing a quarantined birth certificate)."""
    revocations = database.collection(CERTIFICATE_REVOCATIONS)
    database.call(lambda: revocations.delete_one({"serial": serial}))


class CertificateRecords:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.certificates = database.collection(DEVICE_CERTIFICATES)
        self.revocations = database.collection(CERTIFICATE_REVOCATIONS)
        self.acls = database.collection(DEVICE_ACLS)

    def current(self, client_id: str) -> Document | None:
        return self.database.call(lambda: self.certificates.find_one({"device_id": client_id}))

    def record_issued(
        self,
        client_id: str,
        user_id: ObjectId | None,
        cert: IssuedCertificate,
        reason: str = "superseded",
        *,
        first_certificate: bool = False,
        read_along: tuple[str, tuple[str, Any]] | None = None,
    ) -> list[Document] | None:
        """Make ``cert`` the device's active certificate; revoke the one it replaces.

        ``first_certificate`` (the device document held no certificate before)
        tries a plain insert first: nothing to revoke, and an insert costs the
        embedded database half of an upsert. Any existing record falls back to
        the general path.

        ``read_along`` (collection, (field, value)): a lookup that does not depend on
        these writes, sent in the first certificate's batch (one round trip for all);
        its documents are returned. None: not sent (not a first certificate).
        """
        if first_certificate:
            # The record, the default ACL (and the lookup) travel together: one batch.
            record = {"_id": ObjectId(), **self._record_fields(client_id, user_id, cert)}
            (inserted, _), found = self.database.insert_and_find_all(
                [
                    (DEVICE_CERTIFICATES, record),
                    (DEVICE_ACLS, self._default_acl(client_id, user_id)),
                ],
                [] if read_along is None else [read_along],
            )
            if not inserted:
                self._record_again(client_id, user_id, cert, reason)
            return found[0] if found else None
        self._record_again(client_id, user_id, cert, reason)
        return None

    def _record_again(
        self, client_id: str, user_id: ObjectId | None, cert: IssuedCertificate, reason: str
    ) -> None:
        """The general path: a record may exist (revoke what it holds unless it is ``cert``)."""
        previous = self.current(client_id)
        if previous is not None and previous.get("fingerprint") == cert.fingerprint:
            return  # already recorded (a retry after a crash)
        if previous is not None and previous.get("serial"):
            self.revoke_serial(
                client_id, str(previous["serial"]), reason, previous.get("expires_at")
            )
        fields = self._record_fields(client_id, user_id, cert)
        self.database.call(
            lambda: self.certificates.update_one(
                {"device_id": client_id},
                {"$set": fields, "$unset": {"revoked_at": "", "renewal": ""}},
                upsert=True,
            )
        )
        self.ensure_default_acl(client_id, user_id)

    @staticmethod
    def _record_fields(
        client_id: str, user_id: ObjectId | None, cert: IssuedCertificate
    ) -> Document:
        return {
            "device_id": client_id,
            "user_id": user_id,
            "fingerprint": cert.fingerprint,
            "cn": cert.cn,
            "status": CertificateStatus.ACTIVE.value,
            "expires_at": cert.expires_at,
            "created_at": utcnow(),
            "private_key": "",  # the device keeps its key; nothing else ever holds it
            "certificate": cert.pem,
            "serial": cert.serial,
        }

    @staticmethod
    def _default_acl(client_id: str, user_id: ObjectId | None) -> Document:
        return {
            "_id": ObjectId(),
            "device_id": client_id,
            "user_id": user_id,
            "tier": DeviceTier.TIER_1.value,
            "rules": [],
            "last_updated": utcnow(),
        }

    def ensure_default_acl(self, client_id: str, user_id: ObjectId | None) -> None:
        """Insert a tier-1 ACL for the device unless the web app (or we) made one."""
        # The unique index on device_id keeps an existing ACL (the web app's or
        # ours) untouched; an insert is also the cheapest write on the embedded DB.
        self.database.insert_new(DEVICE_ACLS, self._default_acl(client_id, user_id))

    def revoke_serial(
        self, client_id: str, serial: str, reason: str, expires_at: Any = None
    ) -> None:
        """Add ``serial`` to the revocation list (idempotent)."""
        add_revocation(
            self.database,
            client_id,
            serial,
            reason,
            expires_at if isinstance(expires_at, datetime) else None,
        )

    def is_revoked(self, serial: str) -> bool:
        return (
            self.database.find_by(CERTIFICATE_REVOCATIONS, ("serial", serial), ["_id"]) is not None
        )

    def revoke_current(self, client_id: str, reason: str) -> str | None:
        """Operator revocation: mark the current certificate revoked; returns its serial."""
        current = self.current(client_id)
        if current is None or current.get("status") == CertificateStatus.REVOKED.value:
            return None
        serial = str(current.get("serial", ""))
        if serial:
            self.revoke_serial(client_id, serial, reason, current.get("expires_at"))
        self.database.call(
            lambda: self.certificates.update_one(
                {"device_id": client_id, "fingerprint": current["fingerprint"]},
                {"$set": {"status": CertificateStatus.REVOKED.value, "revoked_at": utcnow()}},
            )
        )
        return serial or None

    def revoke_pending(self, client_id: str, reason: str) -> str | None:
        """Revoke the device's pending renewal (if any) and drop it; returns its serial."""
        current = self.current(client_id)
        pending = current.get("renewal") if current is not None else None
        if not isinstance(pending, dict) or not pending.get("serial"):
            return None
        serial = str(pending["serial"])
        self.revoke_serial(client_id, serial, reason, pending.get("expires_at"))
        self.database.call(
            lambda: self.certificates.update_one(
                {"device_id": client_id, "renewal.serial": serial}, {"$unset": {"renewal": ""}}
            )
        )
        return serial

    def revoked_serials(self) -> list[tuple[int, datetime]]:
        docs = self.database.call(
            lambda: list(
                self.revocations.find({}, {"serial": 1, "revoked_at": 1}).sort(
                    "revoked_at", pymongo.ASCENDING
                )
            )
        )
        return [(int(d["serial"], 16), d["revoked_at"]) for d in docs]

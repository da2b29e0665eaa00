"""Renewal over the operational session: ``renew`` (a pending certificate) and ``renew-confirm``.

At most one pending renewal per device. It lives in the device's ``device_certificates``
document (``renewal``), whose unique ``device_id`` makes the swap of one pending
certificate for another a guarded compare-and-set; the ledger holds its record. A newer
``renew`` (with another key, after ``policy.renew_min_interval``) revokes the pending one
at once. ``renew-confirm`` must carry a signature by the new key over the server's nonce
(``agent.protocol.renewal_proof_message``): the server cannot see which certificate a
session used, so the proof is what shows the confirming device holds the new key.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

from cryptography import x509

from agent.protocol import RenewConfirm, RenewRequest, renewal_proof_message
from server.errors import ProofInvalid, RateLimited, UnknownDevice, WrongState
from server.pki.ca import CertificateAuthority
from server.pki.csr_policy import CsrPolicy
from server.pki.key_proof import cert_key_matches, verify_proof
from server.service.policy import HOLDS_CERTIFICATE, ServicePolicy
from server.store.certificates import CertificateRecords, IssuedCertificate
from server.store.db import Database, Document
from server.store.devices import DeviceRepository, utcnow
from server.store.issuances import IssuanceKind, IssuanceLedger, IssuanceState
from server.store.schema import DEVICE_CERTIFICATES, DEVICES

log = logging.getLogger("provision.server")

HOLDS = [status.value for status in HOLDS_CERTIFICATE]


def _seconds_since(moment: object, now: datetime) -> float | None:
    if not isinstance(moment, datetime):
        return None
    return (now - moment).total_seconds()


class Renewals:
    """``renew`` and ``renew-confirm`` for one ProvisioningService."""

    def __init__(
        self,
        database: Database,
        ca: CertificateAuthority,
        policy: ServicePolicy,
        csr_policy: CsrPolicy,
        sign: Callable[[str, Any, str, str], x509.Certificate],
        on_issued: Callable[[str], None],
    ) -> None:
        self.database = database
        self.ca = ca
        self.policy = policy
        self.csr_policy = csr_policy
        self.devices = DeviceRepository(database)
        self.records = CertificateRecords(database)
        self.ledger = IssuanceLedger(database)
        self.sign = sign  # (kind, public key, clientId, MAC): the service's signer (metrics)
        self.on_issued = on_issued

    def _device(self, client_id: str) -> Document:
        doc = self.devices.by_client_id(client_id)
        if doc is None:
            raise UnknownDevice(f"device {client_id!r} is not registered")
        status = doc.get("status")
        if status not in HOLDS:
            raise WrongState(f"device is {status!r}; only a provisioned device renews")
        return doc

    def renew(self, client_id: str, request: RenewRequest) -> dict[str, Any]:
        """Sign a pending certificate for the CSR's new key (the same one again on a retry)."""
        device = self._device(client_id)
        checked = self.csr_policy.check(request.csr, client_id=client_id, mac=str(device["macID"]))
        record = self.records.current(client_id)
        if record is None:
            raise WrongState("the device's certificate record is not written yet; retry")
        pending = record.get("renewal") if isinstance(record.get("renewal"), dict) else None
        if pending is not None and cert_key_matches(pending.get("certificate"), checked.public_key):
            return self._fields(pending)  # a retry: the same pending certificate, no write
        now = utcnow()
        self._check_rate(record, pending, now)
        cert = IssuedCertificate.of(
            self.sign("renewal", checked.public_key, client_id, str(device["macID"]))
        )
        self.ledger.record(client_id, cert, IssuanceKind.RENEWAL, IssuanceState.PENDING, "renewal")
        if pending is not None and pending.get("serial"):
            # At most one pending renewal: the one this replaces is revoked at once.
            self.ledger.retire(
                self._ledger_view(client_id, pending),
                IssuanceState.SUPERSEDED,
                f"pending renewal replaced by {cert.serial}",
            )
        renewal = {
            "certificate": cert.pem,
            "serial": cert.serial,
            "fingerprint": cert.fingerprint,
            "expires_at": cert.expires_at,
            "requested_at": now,
            "nonce": secrets.token_urlsafe(32),
        }
        guard: Document = {"device_id": client_id}
        guard["renewal.serial"] = pending["serial"] if pending else {"$exists": False}
        result = self.database.call(
            lambda: self.database.collection(DEVICE_CERTIFICATES).update_one(
                guard, {"$set": {"renewal": renewal}}
            )
        )
        if result.matched_count == 0:
            # Another renew for this device won the race: ours never leaves the server.
            self.ledger.retire(
                self._ledger_view(client_id, renewal),
                IssuanceState.SUPERSEDED,
                "lost a race with another renewal",
            )
            raise RateLimited(
                "another renewal was issued to this device moments ago; retry later",
                retry_after=self.policy.renew_min_interval,
            )
        log.info("event=renewal-issued device=%s serial=%s", client_id, cert.serial)
        return self._fields(renewal)

    def _check_rate(self, record: Document, pending: Document | None, now: datetime) -> None:
        ages = [
            _seconds_since(record.get("created_at"), now),
            _seconds_since(pending.get("requested_at"), now) if pending else None,
        ]
        youngest = min((age for age in ages if age is not None), default=None)
        interval = self.policy.renew_min_interval
        if youngest is not None and youngest < interval:
            raise RateLimited(
                "this device got a certificate moments ago; renew later",
                retry_after=round(interval - youngest, 3),
            )

    @staticmethod
    def _ledger_view(client_id: str, pending: Document) -> Document:
        return {
            "device_id": client_id,
            "serial": pending["serial"],
            "kind": IssuanceKind.RENEWAL.value,
            "not_after": pending.get("expires_at"),
        }

    def _fields(self, pending: Document) -> dict[str, Any]:
        expires = pending["expires_at"]
        return {
            "certificate": str(pending["certificate"]),
            "caChain": self.ca.device_ca_chain_pem.decode(),
            "serial": str(pending["serial"]),
            "expiresAt": expires.isoformat() if isinstance(expires, datetime) else str(expires),
            "nonce": str(pending.get("nonce", "")),
        }

    def confirm(self, client_id: str, request: RenewConfirm) -> dict[str, Any]:
        """Make the pending certificate current once its key has signed the nonce."""
        device = self._device(client_id)
        if device.get("certificateSerial") == request.serial:
            return {"serial": request.serial}  # already confirmed (a retry)
        record = self.records.current(client_id) or {}
        pending = record.get("renewal")
        if not isinstance(pending, dict) or pending.get("serial") != request.serial:
            raise WrongState(f"no pending renewal with serial {request.serial!r}")
        cert_x509 = x509.load_pem_x509_certificate(str(pending["certificate"]).encode())
        message = renewal_proof_message(client_id, request.serial, str(pending.get("nonce", "")))
        if not verify_proof(cert_x509, message, request.signature):
            raise ProofInvalid(
                "signature does not verify with the pending certificate's key over the nonce"
            )
        cert = IssuedCertificate.of(cert_x509)
        guard = {
            "clientId": client_id,
            "status": {"$in": HOLDS},
            "certificateSerial": device.get("certificateSerial"),
        }
        fields = {
            "crt": cert.pem,
            "certificateSerial": cert.serial,
            "certificateExpiresAt": cert.expires_at,
        }
        result = self.database.call(
            lambda: self.database.collection(DEVICES).update_one(guard, {"$set": fields})
        )
        if result.matched_count == 0:
            raise WrongState(
                "the device changed meanwhile (re-provisioned or revoked); renew again"
            )
        self.records.record_issued(client_id, device.get("userId"), cert, reason="renewed")
        self.ledger.retire_open(
            client_id, IssuanceState.SUPERSEDED, f"renewed as {cert.serial}", keep=cert.serial
        )
        self.ledger.set_state(
            cert.serial, IssuanceState.CURRENT, "confirmed", expected=[IssuanceState.PENDING.value]
        )
        self.on_issued(client_id)
        log.info("event=renewal-confirmed device=%s serial=%s", client_id, cert.serial)
        return {"serial": cert.serial}

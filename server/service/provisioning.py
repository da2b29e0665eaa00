"""The provisioning service's decisions: token, CSR, renewal and status handling.

Transport-free: ``handle_request`` takes the clientId the broker authenticated
(the topic's segment; the broker's ACL pins it to the certificate's CN) and a
payload, and returns the response payload. Every database change is an atomic
update guarded by the expected state, so concurrent servers and duplicate
requests converge on one certificate.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import protocol
from agent.protocol import (
    CsrRequest,
    ErrorCode,
    ProtocolError,
    RenewConfirm,
    RenewRequest,
    TokenRequest,
)
from server.errors import (
    MacMismatch,
    NotAllocated,
    RateLimited,
    ServerError,
    TokenExpired,
    TokenInvalid,
    UnknownDevice,
    WrongState,
)
from server.pki.birth_check import check_birth_certificate
from server.pki.ca import CertificateAuthority
from server.pki.csr_policy import CsrPolicy
from server.service.metrics import ServerMetrics
from server.service.policy import HOLDS_CERTIFICATE, ONLINE_FROM, TOKEN_FROM, ServicePolicy
from server.service.tokens import TokenIssuer, TokenRateLimiter, token_matches
from server.store.certificates import CertificateRecords, IssuedCertificate
from server.store.db import Database, Document
from server.store.devices import DeviceRepository, utcnow
from server.store.schema import DEVICE_CERTIFICATES, DeviceStatus
from server.store.status_writer import StatusBatcher, StatusChange

log = logging.getLogger("provision.server")


def public_key_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _cert_key_matches(cert_pem: object, public_key: Any) -> bool:
    if not isinstance(cert_pem, str):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError:
        return False
    return public_key_der(cert.public_key()) == public_key_der(public_key)


class ProvisioningService:
    """Answers device requests; one instance may serve many threads."""

    def __init__(
        self,
        database: Database,
        ca: CertificateAuthority,
        policy: ServicePolicy | None = None,
        csr_policy: CsrPolicy | None = None,
        status_writer: StatusBatcher | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.database = database
        self.metrics = metrics or ServerMetrics()
        self.status_writer = status_writer
        self.ca = ca
        self.policy = policy or ServicePolicy()
        self.csr_policy = csr_policy or CsrPolicy()
        self.devices = DeviceRepository(database)
        self.records = CertificateRecords(database)
        self.tokens = TokenIssuer(self.policy.token_lifetime)
        self.token_limiter = TokenRateLimiter(self.policy.token_min_interval)
        self._status_lock = threading.Lock()
        self._last_status_write: dict[str, tuple[str, float]] = {}

    # --- requests ------------------------------------------------------------

    def handle_request(self, client_id: str, payload: bytes) -> bytes:
        """Answer one provisioning or renewal request; never raises."""
        started = time.monotonic()
        op = "?"
        try:
            request = protocol.parse_request(payload)
            op = request.op
            fields = self._dispatch(client_id, request)
            log.info(
                "event=request op=%s device=%s result=ok ms=%.0f",
                op,
                client_id,
                (time.monotonic() - started) * 1000,
            )
            self.metrics.request(op, "ok", time.monotonic() - started)
            return protocol.ok_response(op, **fields)
        except ProtocolError as exc:
            error = exc
        except ServerError as exc:
            error = exc.to_protocol()
        except Exception:  # a bug must not kill the server or leak details to devices
            log.exception("event=request op=%s device=%s result=internal-error", op, client_id)
            error = ProtocolError(ErrorCode.INTERNAL, "internal error; retry later", 5.0)
        log.info(
            "event=request op=%s device=%s result=%s reason=%r",
            op,
            client_id,
            error.code.value,
            error.message[:160],
        )
        self.metrics.request(op, error.code.value, time.monotonic() - started)
        return protocol.error_response(error)

    def _dispatch(self, client_id: str, request: protocol.Request) -> dict[str, Any]:
        if isinstance(request, TokenRequest):
            return self.issue_token(client_id, request)
        if isinstance(request, CsrRequest):
            return self.sign_csr(client_id, request)
        if isinstance(request, RenewRequest):
            return self.renew(client_id, request)
        return self.confirm_renewal(client_id, request)

    def _device(self, client_id: str) -> Document:
        doc = self.devices.by_client_id(client_id)
        if doc is None:
            raise UnknownDevice(f"device {client_id!r} is not registered")
        return doc

    def issue_token(self, client_id: str, request: TokenRequest) -> dict[str, Any]:
        now = utcnow()
        check_birth_certificate(
            request.cert, self.ca.factory_ca, client_id=client_id, mac=request.mac, now=now
        )
        wait = self.token_limiter.wait_time(client_id)
        if wait > 0:
            raise RateLimited(
                "a token was issued to this device moments ago; retry later",
                retry_after=round(wait, 3),
            )
        issued = self.tokens.issue(now)
        # One guarded write, no read first: the filter holds the registered MAC
        # and every status a token may be issued from; only a refusal is
        # explained by reading the device.
        guard = {
            "clientId": client_id,
            "macID": request.mac,
            "status": {"$in": [status.value for status in TOKEN_FROM]},
        }
        update = {
            "$set": {
                "status": DeviceStatus.PROVISIONING.value,
                "provisioningToken": issued.hashed,
                "tokenExpiresAt": issued.expires_at,
                "tokenUsed": False,
            },
            "$unset": {"errorMessage": ""},
        }
        result = self.database.call(lambda: self.devices.collection.update_one(guard, update))
        if result.matched_count == 0:
            raise self._token_refusal(client_id, request.mac)
        self.token_limiter.issued(client_id)
        return {"token": issued.token, "expiresAt": issued.expires_at.isoformat()}

    def _token_refusal(self, client_id: str, mac: str) -> ServerError:
        device = self._device(client_id)
        if device.get("macID") != mac:
            return MacMismatch("the MAC in the request is not the device's registered MAC")
        if device.get("status") == DeviceStatus.UNALLOCATED.value:
            return NotAllocated(
                "device is not allocated to a user yet; keep waiting",
                retry_after=self.policy.not_allocated_retry_after,
            )
        return WrongState(f"device has status {device.get('status')!r}; no token from it")

    def sign_csr(self, client_id: str, request: CsrRequest) -> dict[str, Any]:
        device = self._device(client_id)
        if not token_matches(request.token, device.get("provisioningToken")):
            raise TokenInvalid("token is not the device's current token; request a new one")
        mac = str(device.get("macID"))
        checked = self.csr_policy.check(request.csr, client_id=client_id, mac=mac)
        if device.get("tokenUsed") is True:
            return self._repeat_issued(device, checked.public_key)
        if device.get("status") != DeviceStatus.PROVISIONING.value:
            raise WrongState(f"device is {device.get('status')!r}, expected PROVISIONING")
        expires = device.get("tokenExpiresAt")
        now = utcnow()
        if not isinstance(expires, datetime) or now >= expires:
            raise TokenExpired("token has expired; request a new one")
        kind = "first" if device.get("crt") is None else "reprovision"
        cert = IssuedCertificate.of(self._sign(kind, checked.public_key, client_id, mac))
        chain = self.ca.device_ca_chain_pem.decode()
        issued_fields = {
            "status": DeviceStatus.PROVISIONED.value,
            "provisionedAt": now,
            "crt": cert.pem,
            "ca_certificate": chain,
            "certificateSerial": cert.serial,
            "certificateExpiresAt": cert.expires_at,
            "tokenUsed": True,
        }
        guard = {
            "clientId": client_id,
            "status": DeviceStatus.PROVISIONING.value,
            "provisioningToken": device["provisioningToken"],
            "tokenUsed": False,
        }
        result = self.database.call(
            lambda: self.devices.collection.update_one(guard, {"$set": issued_fields})
        )
        if result.matched_count == 0:
            # Another request with this token won the race: answer with its certificate.
            return self._repeat_issued(self._device(client_id), checked.public_key)
        self.records.record_issued(
            client_id, device.get("userId"), cert, first_certificate=device.get("crt") is None
        )
        log.info("event=certificate-issued device=%s serial=%s", client_id, cert.serial)
        return self._certificate_fields(cert.pem, chain, cert.serial, cert.expires_at)

    def _sign(self, kind: str, public_key: Any, client_id: str, mac: str) -> x509.Certificate:
        """Sign with the device CA; counted in the metrics by kind (first/reprovision/renewal)."""
        try:
            cert = self.ca.sign_device_certificate(
                public_key, client_id, mac, self.policy.certificate_validity
            )
        except Exception:
            self.metrics.signing_failed()
            raise
        self.metrics.certificate_issued(kind)
        return cert

    def _repeat_issued(self, device: Document, public_key: Any) -> dict[str, Any]:
        """Idempotent retry: the same key with the same (used) token gets the same certificate."""
        if device.get("tokenUsed") is not True or not _cert_key_matches(
            device.get("crt"), public_key
        ):
            raise TokenInvalid("token was already used; request a new one")
        status = device.get("status")
        if status not in {s.value for s in HOLDS_CERTIFICATE}:
            raise WrongState(f"device is {status!r}; request a new token")
        cert = IssuedCertificate.of(x509.load_pem_x509_certificate(str(device["crt"]).encode()))
        # Converge after a crash between the device update and the records.
        self.records.record_issued(str(device["clientId"]), device.get("userId"), cert)
        chain = str(device.get("ca_certificate") or self.ca.device_ca_chain_pem.decode())
        return self._certificate_fields(cert.pem, chain, cert.serial, cert.expires_at)

    @staticmethod
    def _certificate_fields(pem: str, chain: str, serial: str, expires: datetime) -> dict[str, Any]:
        return {
            "certificate": pem,
            "caChain": chain,
            "serial": serial,
            "expiresAt": expires.isoformat(),
        }

    # --- renewal over the operational session ---------------------------------

    def renew(self, client_id: str, request: RenewRequest) -> dict[str, Any]:
        device = self._device(client_id)
        status = device.get("status")
        if status not in {s.value for s in HOLDS_CERTIFICATE}:
            raise WrongState(f"device is {status!r}; only a provisioned device renews")
        checked = self.csr_policy.check(request.csr, client_id=client_id, mac=str(device["macID"]))
        record = self.records.current(client_id) or {}
        pending = record.get("renewal")
        if isinstance(pending, dict) and _cert_key_matches(
            pending.get("certificate"), checked.public_key
        ):
            return self._certificate_fields(
                str(pending["certificate"]),
                self.ca.device_ca_chain_pem.decode(),
                str(pending["serial"]),
                pending["expires_at"],
            )
        cert = IssuedCertificate.of(
            self._sign("renewal", checked.public_key, client_id, str(device["macID"]))
        )
        renewal = {
            "certificate": cert.pem,
            "serial": cert.serial,
            "fingerprint": cert.fingerprint,
            "expires_at": cert.expires_at,
            "requested_at": utcnow(),
        }
        self.database.call(
            lambda: self.database.collection(DEVICE_CERTIFICATES).update_one(
                {"device_id": client_id}, {"$set": {"renewal": renewal}}
            )
        )
        log.info("event=renewal-issued device=%s serial=%s", client_id, cert.serial)
        return self._certificate_fields(
            cert.pem, self.ca.device_ca_chain_pem.decode(), cert.serial, cert.expires_at
        )

    def confirm_renewal(self, client_id: str, request: RenewConfirm) -> dict[str, Any]:
        device = self._device(client_id)
        if device.get("certificateSerial") == request.serial:
            return {"serial": request.serial}  # already confirmed (a retry)
        record = self.records.current(client_id) or {}
        pending = record.get("renewal")
        if not isinstance(pending, dict) or pending.get("serial") != request.serial:
            raise WrongState(f"no pending renewal with serial {request.serial!r}")
        cert = IssuedCertificate.of(
            x509.load_pem_x509_certificate(str(pending["certificate"]).encode())
        )
        self.devices.transition(
            client_id,
            expected=HOLDS_CERTIFICATE,
            new=DeviceStatus(device["status"]),
            set_fields={
                "crt": cert.pem,
                "certificateSerial": cert.serial,
                "certificateExpiresAt": cert.expires_at,
            },
        )
        self.records.record_issued(client_id, device.get("userId"), cert, reason="renewed")
        log.info("event=renewal-confirmed device=%s serial=%s", client_id, cert.serial)
        return {"serial": cert.serial}

    # --- status -----------------------------------------------------------------

    def handle_status(self, client_id: str, payload: bytes) -> None:
        """Apply a device's status message (online/offline/error); never raises."""
        try:
            report = protocol.parse_status(payload)
            if report.status == "online":
                self._online(client_id)
            elif report.status == "offline":
                self._set_status(client_id, ONLINE_FROM, DeviceStatus.OFFLINE, {})
            else:
                self._set_status(
                    client_id,
                    frozenset(DeviceStatus),
                    DeviceStatus.ERROR,
                    {"errorMessage": str(report.error)},
                )
        except (ProtocolError, ServerError) as exc:
            log.info("event=status device=%s result=ignored reason=%r", client_id, str(exc)[:160])
        except Exception:
            log.exception("event=status device=%s result=internal-error", client_id)

    def _online(self, client_id: str) -> None:
        now = time.monotonic()
        with self._status_lock:
            last = self._last_status_write.get(client_id)
        # Heartbeats of an ACTIVE device only refresh lastSeenAt, and at most
        # once per status_write_interval: the database write is the cost.
        if (
            last
            and last[0] == DeviceStatus.ACTIVE.value
            and now - last[1] < self.policy.status_write_interval
        ):
            return
        self._set_status(client_id, ONLINE_FROM, DeviceStatus.ACTIVE, {})

    def _set_status(
        self, client_id: str, expected: frozenset[DeviceStatus], new: DeviceStatus, fields: Document
    ) -> None:
        fields = {"lastSeenAt": utcnow(), **fields}
        if self.status_writer is not None:
            self.status_writer.submit(client_id, StatusChange(expected, new, fields))
        else:
            self.devices.transition(client_id, expected=expected, new=new, set_fields=fields)
        with self._status_lock:
            self._last_status_write[client_id] = (new.value, time.monotonic())
        log.info("event=status device=%s status=%s", client_id, new.value)

    def sweep_silent_devices(self) -> int:
        """ACTIVE devices silent past the offline timeout become OFFLINE."""
        modified = self.devices.mark_silent_offline(utcnow() - self.policy.offline_timeout)
        if modified:
            with self._status_lock:
                self._last_status_write.clear()
            log.info("event=sweep offline=%d", modified)
        return modified

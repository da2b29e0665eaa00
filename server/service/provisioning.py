"""The provisioning service's decisions: token, CSR and status handling (renewal: renewal.py).

Transport-free: ``handle_request`` takes the clientId the broker authenticated
(the topic's segment; the broker's ACL pins it to the certificate's CN), the
channel (topic) the request came on and a payload, and returns the response
payload. Every database change is an atomic update guarded by the expected
state, so concurrent servers and duplicate requests converge on one
certificate. Every certificate is recorded in the issuance ledger before it
leaves the server, and the one it replaces is revoked.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

from cryptography import x509

from agent import protocol
from agent.protocol import (
    OPS_BY_CHANNEL,
    CsrRequest,
    ErrorCode,
    ProtocolError,
    RenewConfirm,
    RenewRequest,
    RequestChannel,
    TokenRequest,
)
from server.errors import (
    CloneSuspected,
    MacMismatch,
    NotAllocated,
    Quarantined,
    RateLimited,
    ReprovisionNotApproved,
    ServerError,
    TokenExpired,
    TokenInvalid,
    UnknownDevice,
    WrongState,
)
from server.pki.birth_check import check_birth_certificate
from server.pki.ca import CertificateAuthority, serial_hex
from server.pki.csr_policy import CsrPolicy
from server.pki.key_proof import cert_key_matches
from server.service.metrics import ServerMetrics
from server.service.policy import (
    HOLDS_CERTIFICATE,
    ONLINE_FROM,
    REPROVISION_FROM,
    ServicePolicy,
    recently_heard_left,
    reprovision_hint,
    token_guard,
)
from server.service.renewal import Renewals
from server.service.tokens import TokenIssuer, TokenRateLimiter, token_matches
from server.store.certificates import CertificateRecords, IssuedCertificate
from server.store.db import Database, Document
from server.store.devices import DeviceRepository, utcnow
from server.store.issuances import IssuanceKind, IssuanceLedger, IssuanceState
from server.store.schema import DEVICES, DeviceStatus
from server.store.security_events import PROBABLE_CLONE, SecurityEvents
from server.store.status_writer import StatusBatcher, StatusChange

log = logging.getLogger("provision.server")


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
        self.ledger = IssuanceLedger(database)
        self.security_events = SecurityEvents(database)
        self.renewals = Renewals(
            database, ca, self.policy, self.csr_policy, self._sign, self._forget_status
        )
        self.tokens = TokenIssuer(self.policy.token_lifetime)
        self.token_limiter = TokenRateLimiter(self.policy.token_min_interval)
        self._status_lock = threading.Lock()
        self._last_status_write: dict[str, tuple[str, float]] = {}

    # --- requests ------------------------------------------------------------

    def handle_request(
        self,
        client_id: str,
        payload: bytes,
        channel: RequestChannel = RequestChannel.PROVISIONING,
    ) -> bytes:
        """Answer one request that came on ``channel``'s topic; never raises."""
        started = time.monotonic()
        op = "?"
        try:
            request = protocol.parse_request(payload)
            op = request.op
            if op not in OPS_BY_CHANNEL[channel]:
                # token/csr only with the birth identity, renew only with the operational
                # one: the topic (and the broker's per-listener ACL) says which was used.
                raise ProtocolError(
                    ErrorCode.WRONG_TOPIC,
                    f"op {op!r} is not accepted on the {channel.value} topic",
                )
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
            return self.renewals.renew(client_id, request)
        assert isinstance(request, RenewConfirm)
        return self.renewals.confirm(client_id, request)

    def _device(self, client_id: str) -> Document:
        doc = self.devices.by_client_id(client_id)
        if doc is None:
            raise UnknownDevice(f"device {client_id!r} is not registered")
        return doc

    def issue_token(self, client_id: str, request: TokenRequest) -> dict[str, Any]:
        now = utcnow()
        birth = check_birth_certificate(
            request.cert, self.ca.factory_ca, client_id=client_id, mac=request.mac, now=now
        )
        wait = self.token_limiter.wait_time(client_id)
        if wait > 0:
            raise RateLimited(
                "a token was issued to this device moments ago; retry later",
                retry_after=round(wait, 3),
            )
        if self.records.is_revoked(serial_hex(birth)):
            raise Quarantined("this birth certificate is revoked (quarantined by an operator)")
        issued = self.tokens.issue(now)
        # One guarded write, no read first: the filter holds the registered MAC and
        # the statuses (and last heartbeat) the re-provisioning policy accepts; only a
        # refusal is explained by reading the device.
        guard = {"clientId": client_id, "macID": request.mac, **token_guard(self.policy, now)}
        update = {
            "$set": {
                "status": DeviceStatus.PROVISIONING.value,
                "provisioningToken": issued.hashed,
                "tokenExpiresAt": issued.expires_at,
                "tokenUsed": False,
            },
            "$unset": {"errorMessage": ""},
        }
        # The new hash is the proof: only this update writes it (group commit, db.py).
        key, proof = ("clientId", client_id), ("provisioningToken", issued.hashed)
        if not self.database.update_guarded(DEVICES, key, guard, update, proof):
            raise self._token_refusal(client_id, request.mac, now)
        self.token_limiter.issued(client_id)
        self._forget_status(client_id)
        return {"token": issued.token, "expiresAt": issued.expires_at.isoformat()}

    def _token_refusal(self, client_id: str, mac: str, now: datetime) -> ServerError:
        device = self._device(client_id)
        status = device.get("status")
        if device.get("macID") != mac:
            return MacMismatch("the MAC in the request is not the device's registered MAC")
        if status == DeviceStatus.UNALLOCATED.value:
            return NotAllocated(
                "device is not allocated to a user yet; keep waiting",
                retry_after=self.policy.not_allocated_retry_after,
            )
        live = recently_heard_left(device, now, self.policy.offline_timeout)
        if live > 0:
            # The birth certificate travels in clear in TLS 1.2: somebody else may hold it.
            log.warning("event=probable-clone device=%s", client_id)
            self.security_events.record(
                client_id,
                PROBABLE_CLONE,
                f"token request while the device is in service ({status}, heard from lately)",
            )
            return CloneSuspected(
                "this device was online with its operational certificate moments ago; a "
                "token request with its birth certificate now looks like a clone",
                retry_after=round(live, 3),
            )
        if status in {s.value for s in REPROVISION_FROM}:
            return ReprovisionNotApproved(
                f"device is {status} (provisioned before); to provision again "
                + reprovision_hint(self.policy, str(status)),
                retry_after=self.policy.reprovision_retry_after,
            )
        return WrongState(f"device has status {status!r}; no token from it")

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
        reissue = device.get("crt") is not None
        # In the ledger before it can leave the server (and before it is the device's).
        self.ledger.record(
            client_id,
            cert,
            IssuanceKind.FIRST,
            IssuanceState.CURRENT,
            "re-provisioned" if reissue else "provisioned",
        )
        key, proof = ("clientId", client_id), ("certificateSerial", cert.serial)
        if not self.database.update_guarded(DEVICES, key, guard, {"$set": issued_fields}, proof):
            # Another request with this token won the race: ours never leaves the server.
            self.ledger.retire(
                {"device_id": client_id, "serial": cert.serial, "not_after": cert.expires_at},
                IssuanceState.SUPERSEDED,
                "lost a race with another request for the same token",
            )
            return self._repeat_issued(self._device(client_id), checked.public_key)
        # Ledger read in the record + ACL batch; all else it held is revoked after.
        ledger = self.records.record_issued(
            client_id, device.get("userId"), cert, first_certificate=not reissue,
            read_along=self.ledger.by_device(client_id),
        )  # fmt: skip
        self.ledger.retire_open(
            client_id, IssuanceState.SUPERSEDED, f"re-provisioned as {cert.serial}",
            keep=cert.serial, records=ledger,
        )  # fmt: skip
        self._forget_status(client_id)
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
        used, crt = device.get("tokenUsed") is True, device.get("crt")
        if not used or not cert_key_matches(crt, public_key):
            raise TokenInvalid("token was already used; request a new one")
        status = device.get("status")
        if status not in {s.value for s in HOLDS_CERTIFICATE}:
            raise WrongState(f"device is {status!r}; request a new token")
        cert = IssuedCertificate.of(x509.load_pem_x509_certificate(str(device["crt"]).encode()))
        # Converge after a crash between the device update and the records or the ledger's
        # clean-up (a first certificate of an earlier attempt, never delivered, revoked).
        self.records.record_issued(str(device["clientId"]), device.get("userId"), cert)
        self.ledger.retire_open(
            str(device["clientId"]), IssuanceState.SUPERSEDED, f"re-provisioned as {cert.serial}",
            keep=cert.serial, kinds=[IssuanceKind.FIRST.value],
        )  # fmt: skip
        chain = str(device.get("ca_certificate") or self.ca.device_ca_chain_pem.decode())
        return self._certificate_fields(cert.pem, chain, cert.serial, cert.expires_at)

    @staticmethod
    def _certificate_fields(pem: str, chain: str, serial: str, expires: datetime) -> dict[str, Any]:
        fields = {"certificate": pem, "caChain": chain, "serial": serial}
        return fields | {"expiresAt": expires.isoformat()}

    # --- status -----------------------------------------------------------------

    def handle_status(self, client_id: str, payload: bytes, *, announced: bool = False) -> None:
        """Apply a device's status message (online/offline/error); never raises.

        ``announced``: the message was published retained, the device's announcement of a
        new connection; unlike a heartbeat, its ``online`` is always written.
        """
        try:
            report = protocol.parse_status(payload)
            if report.status == "online":
                self._online(client_id, announced=announced)
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

    def _forget_status(self, client_id: str) -> None:
        """The device's status changed here (token, certificate): its next heartbeat is written."""
        with self._status_lock:
            self._last_status_write.pop(client_id, None)

    def _online(self, client_id: str, *, announced: bool) -> None:
        now = time.monotonic()
        with self._status_lock:
            last = self._last_status_write.get(client_id)
        # Heartbeats of an ACTIVE device only refresh lastSeenAt, and at most
        # once per status_write_interval: the database write is the cost. An
        # announcement is always written: what this process last wrote may be stale
        # (another server process, or the web app, re-provisioned the device since),
        # and a device announces once per connection. Floods collapse in the batcher.
        if (
            not announced
            and last
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

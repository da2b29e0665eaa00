"""Provisioning over the birth-certificate listener: token, then CSR, then certificate.

``ProvisioningClient`` is the wire: one MQTT v5 connection authenticated by the
birth certificate, requests on ``provisioning/<id>/request`` answered on
``provisioning/<id>/response`` (subscribed BEFORE the first publish) and
matched by Correlation Data.

``Provisioner`` walks NEED_TOKEN -> HAVE_TOKEN -> CSR_SENT -> CERT_STORED,
persisting each step before acting on it, so a crash anywhere resumes with
the same key, the same CSR and the same token (and gets the same certificate).
Retryable errors wait with full-jitter backoff (``retryAfter`` is a floor);
NOT_ALLOCATED waits forever; token errors go back to NEED_TOKEN; a device the
server will not serve (CSR_INVALID, MAC_MISMATCH, UNKNOWN_DEVICE, ...) goes
to REJECTED and is retried only after a long delay.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import protocol
from agent.backoff import Backoff
from agent.context import DeviceContext
from agent.errors import AgentError, ProvisioningRejected, StorageError
from agent.keystore import FileKeyStore
from agent.mqtt_link import LinkError, MqttLink, TlsIdentity
from agent.protocol import ErrorCode, ProtocolError
from agent.state import (
    REJECTED_RETRY_FACTOR,
    AgentState,
    StateRecord,
    format_fields,
)
from agent.storage import CertificateStore

log = logging.getLogger("agent.provisioning")

# Token errors mean "get a new token"; the key and CSR stay (they were never certified).
_BACK_TO_TOKEN: Final = frozenset(
    {ErrorCode.TOKEN_INVALID, ErrorCode.TOKEN_EXPIRED, ErrorCode.WRONG_STATE}
)
# A rejected CSR is never sent again: the next attempt uses a fresh key.
_DROP_KEY: Final = frozenset({ErrorCode.CSR_INVALID})


@dataclass(frozen=True)
class IssuedCert:
    certificate: str
    chain: str
    serial: str


def parse_issued(fields: dict[str, Any]) -> IssuedCert:
    cert = fields.get("certificate")
    chain = fields.get("caChain", "")
    serial = fields.get("serial")
    if not isinstance(cert, str) or not isinstance(chain, str) or not isinstance(serial, str):
        raise ProvisioningRejected(
            ProtocolError(ErrorCode.INTERNAL, "certificate response is missing fields")
        )
    return IssuedCert(cert, chain, serial)


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def store_certificate(
    certs: CertificateStore,
    keystore: FileKeyStore,
    slot: str,
    client_id: str,
    issued: IssuedCert,
    extra_meta: dict[str, Any] | None = None,
) -> int:
    """Stage ``issued`` with the key in ``slot``; return its version (an existing one on retry).

    The certificate must be for our key and our clientId: a server bug must not
    leave the device with a certificate it cannot use. ``extra_meta`` goes into the
    version's metadata (a renewal's ``confirm_nonce``).
    """
    try:
        cert = x509.load_pem_x509_certificate(issued.certificate.encode())
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is not a ValueError
        raise ProvisioningRejected(
            ProtocolError(ErrorCode.INTERNAL, "server sent an unreadable certificate")
        ) from None
    if _spki(cert.public_key()) != _spki(keystore.public_key(slot)):
        raise ProvisioningRejected(
            ProtocolError(ErrorCode.INTERNAL, "server sent a certificate for another key")
        )
    serial = format(cert.serial_number, "X")
    for version in certs.versions():
        if certs.meta(version).get("serial") == serial:
            return version  # a crash after staging: the retry got the same certificate
    meta = {
        "serial": serial,
        "client_id": client_id,
        "key_slot": slot,
        "not_before": cert.not_valid_before_utc.timestamp(),
        "not_after": cert.not_valid_after_utc.timestamp(),
        "fingerprint": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        **(extra_meta or {}),
    }
    return certs.stage(
        issued.certificate.encode(),
        issued.chain.encode(),
        meta,
        key_file=keystore.key_file(slot),
    )


class ProvisioningClient:
    """One connection to the provisioning listener; use as a context manager."""

    def __init__(self, context: DeviceContext, keystore: FileKeyStore) -> None:
        identity = self.identity = context.identity
        self.timing = context.timing
        self._link = MqttLink(
            identity.client_id,
            context.endpoints.provisioning_host,
            context.endpoints.provisioning_port,
            TlsIdentity(identity.cert_path, keystore.key_file(identity.key_slot), context.ca_file),
            keepalive=context.timing.keepalive_s,
        )

    def __enter__(self) -> ProvisioningClient:
        self._link.connect(self.timing.request_timeout_s)
        try:
            self._link.subscribe(
                protocol.response_topic(self.identity.client_id), self.timing.request_timeout_s
            )
        except BaseException:
            self._link.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._link.close()

    @property
    def connected(self) -> bool:
        return self._link.connected

    def _request(self, body: dict[str, Any]) -> dict[str, Any]:
        client_id = self.identity.client_id
        raw = self._link.request(
            protocol.request_topic(client_id),
            protocol.encode(body),
            protocol.response_topic(client_id),
            self.timing.request_timeout_s,
        )
        response = protocol.parse_response(raw)
        if response.error is not None:
            raise ProvisioningRejected(response.error)
        return response.fields

    def request_token(self) -> tuple[str, float | None]:
        """A fresh single-use token and its expiry (Unix seconds, None if not given)."""
        fields = self._request(
            {"op": "token", "mac": self.identity.mac, "cert": self.identity.cert_pem()}
        )
        token = fields.get("token")
        if not isinstance(token, str) or not token:
            raise ProvisioningRejected(ProtocolError(ErrorCode.INTERNAL, "response has no token"))
        expires = fields.get("expiresAt")
        try:
            expires_at = datetime.fromisoformat(expires).timestamp() if expires else None
        except (TypeError, ValueError):
            expires_at = None
        return token, expires_at

    def request_certificate(self, token: str, csr: str) -> IssuedCert:
        return parse_issued(self._request({"op": "csr", "token": token, "csr": csr}))


class Provisioner:
    """Drives the provisioning states until CERT_STORED, REJECTED or stop."""

    def __init__(self, context: DeviceContext) -> None:
        self.context = context
        self.keystore = FileKeyStore(context.key_dir)
        self.backoff = Backoff(context.timing.backoff_initial_s, context.timing.backoff_max_s)

    def run(self, record: StateRecord) -> StateRecord:
        client: ProvisioningClient | None = None
        try:
            while not self.context.stop.is_set() and record.state in (
                AgentState.NEED_TOKEN,
                AgentState.HAVE_TOKEN,
                AgentState.CSR_SENT,
            ):
                delay = 0.0
                try:
                    if record.state == AgentState.HAVE_TOKEN:
                        record = self._prepare_csr(record)  # local work, no connection needed
                        continue
                    if client is None or not client.connected:
                        if client is not None:
                            client.__exit__(None, None, None)
                            client = None
                        client = ProvisioningClient(self.context, self.keystore).__enter__()
                    if record.state == AgentState.NEED_TOKEN:
                        record = self._get_token(client, record)
                    else:
                        record = self._send_csr(client, record)
                    self.backoff.reset()
                except ProvisioningRejected as exc:
                    record, delay = self._rejected(record, exc.error)
                except LinkError as exc:
                    delay = self.backoff.next_delay()
                    log.warning(
                        "%s",
                        format_fields(
                            event="provisioning_link_failed",
                            state=record.state,
                            error=exc.message,
                            retry_in=f"{delay:.1f}",
                        ),
                    )
                    if client is not None:
                        client.__exit__(None, None, None)
                        client = None
                if delay > 0 and self.context.sleep(delay):
                    break
        finally:
            if client is not None:
                client.__exit__(None, None, None)
        return record

    def _get_token(self, client: ProvisioningClient, record: StateRecord) -> StateRecord:
        token, expires_at = client.request_token()
        return self.context.states.transition(
            record,
            AgentState.HAVE_TOKEN,
            "token issued",
            token=token,
            token_expires_at=expires_at,
            error_code=None,
            error_message=None,
        )

    def _prepare_csr(self, record: StateRecord) -> StateRecord:
        if record.token_expires_at is not None and time.time() >= record.token_expires_at:
            return self.context.states.transition(
                record, AgentState.NEED_TOKEN, "token expired before use", token=None
            )
        if record.key_slot is not None and record.csr is not None:
            # The key was already put into a CSR: keep both, so the server sees the same key.
            return self.context.states.transition(
                record, AgentState.CSR_SENT, "reusing key and CSR"
            )
        if record.key_slot is None:
            # Persist the slot name before the key exists: a crash cannot orphan a key.
            record, new_slot = self.context.states.next_slot(record)
            record = self.context.states.update(record, key_slot=new_slot)
        slot = record.key_slot
        assert slot is not None
        if not self.keystore.exists(slot):  # never sent anywhere, so a resume may reuse it
            self.keystore.generate(slot)
        identity = self.context.identity
        csr = self.keystore.build_csr(slot, identity.client_id, identity.mac).decode()
        return self.context.states.transition(record, AgentState.CSR_SENT, "csr built", csr=csr)

    def _send_csr(self, client: ProvisioningClient, record: StateRecord) -> StateRecord:
        if record.token is None or record.csr is None or record.key_slot is None:
            return self.context.states.transition(
                record, AgentState.NEED_TOKEN, "incomplete CSR state"
            )
        issued = client.request_certificate(record.token, record.csr)
        slot = record.key_slot
        version = store_certificate(
            self.context.certs, self.keystore, slot, self.context.identity.client_id, issued
        )
        self.context.certs.activate(version)
        record = self.context.states.transition(
            record,
            AgentState.CERT_STORED,
            "certificate issued",
            cert_version=version,
            cert_serial=issued.serial,
            token=None,
            token_expires_at=None,
            key_slot=None,
            csr=None,
        )
        # The version holds its own link to the key; the slot is no longer needed.
        self.keystore.delete(slot)
        return record

    def _rejected(self, record: StateRecord, error: ProtocolError) -> tuple[StateRecord, float]:
        code = error.code
        fields = {"event": "server_error", "state": record.state, "code": code.value}
        if code.retryable:
            delay = self.backoff.next_delay(error.retry_after)
            event = "waiting_for_allocation" if code == ErrorCode.NOT_ALLOCATED else "server_error"
            log.info(
                "%s",
                format_fields(
                    **{**fields, "event": event},
                    message=error.message,
                    retry_in=f"{delay:.1f}",
                ),
            )
            return record, delay
        if code in _BACK_TO_TOKEN:
            delay = self.backoff.next_delay(error.retry_after)
            record = self.context.states.transition(
                record, AgentState.NEED_TOKEN, f"{code.value}: {error.message}", token=None
            )
            return record, delay
        changes: dict[str, Any] = {}
        if code in _DROP_KEY and record.key_slot is not None:
            self.keystore.delete(record.key_slot)  # refused, so no certificate will ever use it
            changes = {"key_slot": None, "csr": None}
        retry_at = time.time() + REJECTED_RETRY_FACTOR * self.context.timing.backoff_max_s
        record = self.context.states.transition(
            record,
            AgentState.REJECTED,
            f"{code.value}: {error.message}",
            token=None,
            token_expires_at=None,
            error_code=code.value,
            error_message=error.message,
            retry_at=retry_at,
            **changes,
        )
        log.error(
            "%s",
            format_fields(
                event="rejected",
                code=code.value,
                message=error.message,
                retry_at=datetime.fromtimestamp(retry_at)
                .astimezone()
                .isoformat(timespec="seconds"),
            ),
        )
        return record, 0.0


def check_live_certificate(certs: CertificateStore) -> int | None:
    """The live version if it is usable (files present), else None."""
    try:
        version = certs.live_version()
        if version is not None:
            certs.paths(version)
    except (StorageError, AgentError):
        return None
    return version

"""The operational session: mTLS to the device listener, status, heartbeat, renewal.

Status goes to ``devices/<id>/status``: a retained ``online`` after every connect
(the announcement: the server always writes it), a plain ``online`` every
``heartbeat_s`` (the server throttles these), a retained ``offline`` as the last
will (an unclean loss) and on a clean stop (no will on a clean DISCONNECT).

Renewal at ``renew_fraction`` of the certificate's life: a fresh key in a new
slot, a CSR on ``devices/<id>/cert/renew``, the new certificate staged (not
live) with the server's nonce, the old session closed cleanly, a new session
opened with the new certificate, ``renew-confirm`` sent over it with the new
key's signature over the nonce (proof of possession), and only then is the new
version made live. If the new certificate does not connect, the old one (still live)
is used again and the renewal is retried later.

A TLS refusal of the live certificate (revoked, expired, unknown CA) ends the
session with ``SessionOutcome.REPROVISION``: the runner goes back to NEED_TOKEN
with the birth identity.

cryptography (key store, CSR, certificate checks) is imported only when a
renewal needs it; with ``restart_after_renewal`` a completed renewal ends the
session (``SessionOutcome.RESTART``) so the runner can restart without it.
"""

from __future__ import annotations

import base64
import logging
import time
from datetime import datetime, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any

from agent import protocol
from agent.backoff import Backoff
from agent.context import DeviceContext
from agent.errors import AgentError, ProvisioningRejected
from agent.mqtt_link import LinkError, MqttLink, TlsIdentity, Will
from agent.protocol import ErrorCode
from agent.state import AgentState, StateRecord, format_fields

if TYPE_CHECKING:
    from agent.keystore import FileKeyStore

log = logging.getLogger("agent.session")


class SessionOutcome(Enum):
    STOPPED = "stopped"
    REPROVISION = "reprovision"
    RESTART = "restart"  # renewed; the link is closed cleanly (the retained status stays online)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def renew_at(meta: dict[str, Any], fraction: float) -> float:
    """Unix time at which the certificate described by ``meta`` should be renewed."""
    start = float(meta["not_before"])
    return start + fraction * (float(meta["not_after"]) - start)


class OperationalSession:
    def __init__(self, context: DeviceContext, *, restart_after_renewal: bool = False) -> None:
        self.context = context
        self.client_id = context.identity.client_id
        self.restart_after_renewal = restart_after_renewal
        self._renewed = False
        timing = context.timing
        self.backoff = Backoff(timing.backoff_initial_s, timing.backoff_max_s)
        self.renew_backoff = Backoff(timing.backoff_initial_s, timing.backoff_max_s)
        self._next_renew_try = 0.0

    def _keystore(self) -> FileKeyStore:
        from agent.keystore import FileKeyStore  # loads cryptography: renewal only

        return FileKeyStore(self.context.key_dir)

    # --- connections -----------------------------------------------------------

    def _connect(self, version: int) -> MqttLink:
        paths = self.context.certs.paths(version)
        if paths.key is None:
            raise LinkError(f"certificate version {version} has no key file")
        link = MqttLink(
            self.client_id,
            self.context.endpoints.operational_host,
            self.context.endpoints.operational_port,
            TlsIdentity(paths.cert, paths.key, self.context.ca_file),
            keepalive=self.context.timing.keepalive_s,
            will=Will(
                protocol.status_topic(self.client_id), protocol.encode({"status": "offline"})
            ),
        )
        link.connect(self.context.timing.request_timeout_s)
        try:
            link.subscribe(
                protocol.renew_response_topic(self.client_id), self.context.timing.request_timeout_s
            )
            self._publish_status(link, "online")
        except BaseException:
            link.close()
            raise
        return link

    def _publish_status(self, link: MqttLink, status: str, *, retain: bool = True) -> None:
        """Retained: the connection's announcement (the server always writes it) and the
        final ``offline``; heartbeats are not retained (the server throttles them)."""
        link.publish(
            protocol.status_topic(self.client_id),
            protocol.encode({"status": status, "ts": _now_iso()}),
            self.context.timing.request_timeout_s,
            retain=retain,
        )

    def _close(self, link: MqttLink, offline: bool) -> None:
        if offline:
            link.close(publish_before=lambda: self._publish_status(link, "offline"))
        else:
            link.close()

    # --- main loop ---------------------------------------------------------------

    def run(self, record: StateRecord) -> tuple[StateRecord, SessionOutcome]:
        while not self.context.stop.is_set():
            version = self.context.certs.live_version()
            if version is None:
                return record, SessionOutcome.REPROVISION
            meta = self.context.certs.meta(version)
            if time.time() >= float(meta.get("not_after", 0)):
                log.warning("%s", format_fields(event="certificate_expired", version=version))
                return record, SessionOutcome.REPROVISION
            if record.state == AgentState.RENEWING and record.renew_version is not None:
                link, record = self._finish_renewal(None, record)
            else:
                link = None
            try:
                if link is None:
                    link = self._connect(version)
            except LinkError as exc:
                if exc.cert_rejected:
                    log.warning("%s", format_fields(event="certificate_refused", error=exc.message))
                    return record, SessionOutcome.REPROVISION
                delay = self.backoff.next_delay()
                log.warning(
                    "%s",
                    format_fields(
                        event="connect_failed", error=exc.message, retry_in=f"{delay:.1f}"
                    ),
                )
                if self.context.sleep(delay):
                    break
                continue
            self.backoff.reset()
            if record.state == AgentState.CERT_STORED:
                record = self.context.states.transition(record, AgentState.ACTIVE, "connected")
                self.context.certs.prune(
                    keep=1
                )  # a re-provisioned device's old certificate is revoked
            link, record = self._serve(link, record)
            if self._renewed and self.restart_after_renewal and not self.context.stop.is_set():
                link.close()  # clean DISCONNECT: no last will, the status stays "online"
                log.info("%s", format_fields(event="session_restart", reason="renewed"))
                return record, SessionOutcome.RESTART
            if self.context.stop.is_set():
                self._close(link, offline=True)
                log.info("%s", format_fields(event="stopped", client=self.client_id))
                return record, SessionOutcome.STOPPED
            rejected = link.cert_rejected
            log.warning("%s", format_fields(event="connection_lost", error=link.last_error))
            link.close()
            if rejected:
                return record, SessionOutcome.REPROVISION
            if self.context.sleep(self.backoff.next_delay()):
                break
        return record, SessionOutcome.STOPPED

    def _serve(self, link: MqttLink, record: StateRecord) -> tuple[MqttLink, StateRecord]:
        """Heartbeat and renew while connected; return when the link drops or stop is set."""
        next_heartbeat = time.monotonic() + self.context.timing.heartbeat_s
        while link.connected and not self.context.stop.is_set():
            if self._renewed and self.restart_after_renewal:
                break  # run() closes the link and hands over to the runner
            self.context.tick()
            if time.monotonic() >= next_heartbeat:
                try:
                    self._publish_status(link, "online", retain=False)
                except LinkError as exc:
                    # Refused (ACL: our certificate was revoked) or lost: reconnect, which
                    # also tells a revoked certificate (TLS refusal) from a network problem.
                    log.warning("%s", format_fields(event="heartbeat_failed", error=exc.message))
                    link.close()
                    break
                next_heartbeat = time.monotonic() + self.context.timing.heartbeat_s
            if self._renewal_due(record):
                link, record = self._renew(link, record)
                continue
            self.context.stop.wait(min(1.0, max(0.05, next_heartbeat - time.monotonic())))
        return link, record

    # --- renewal -------------------------------------------------------------------

    def _renewal_due(self, record: StateRecord) -> bool:
        if time.monotonic() < self._next_renew_try:
            return False
        if record.state == AgentState.RENEWING:
            return True
        version = self.context.certs.live_version()
        if version is None:
            return False
        return time.time() >= renew_at(
            self.context.certs.meta(version), self.context.timing.renew_fraction
        )

    def _renew(self, link: MqttLink, record: StateRecord) -> tuple[MqttLink, StateRecord]:
        from agent.provisioning import parse_issued, store_certificate  # cryptography

        keystore = self._keystore()
        try:
            if record.state != AgentState.RENEWING or record.key_slot is None:
                record, slot = self.context.states.next_slot(record)
                keystore.generate(slot)
                csr = keystore.build_csr(slot, self.client_id, self.context.identity.mac).decode()
                record = self.context.states.transition(
                    record, AgentState.RENEWING, "renewal due", key_slot=slot, csr=csr
                )
            if record.renew_version is None:
                assert record.csr is not None and record.key_slot is not None
                raw = link.request(
                    protocol.renew_topic(self.client_id),
                    protocol.encode({"op": "renew", "csr": record.csr}),
                    protocol.renew_response_topic(self.client_id),
                    self.context.timing.request_timeout_s,
                )
                response = protocol.parse_response(raw)
                if response.error is not None:
                    raise ProvisioningRejected(response.error)
                issued = parse_issued(response.fields)
                nonce = response.fields.get("nonce")
                version = store_certificate(
                    self.context.certs,
                    keystore,
                    record.key_slot,
                    self.client_id,
                    issued,
                    # Kept with the version: the confirm may come after a restart.
                    {"confirm_nonce": nonce} if isinstance(nonce, str) else None,
                )
                record = self.context.states.update(record, renew_version=version)
        except ProvisioningRejected as exc:
            return link, self._renew_failed(record, exc.error.code, exc.error.message)
        except LinkError as exc:
            self._renew_failed(record, ErrorCode.UNAVAILABLE, exc.message)
            return link, record
        link.close()  # clean DISCONNECT: no last will, the retained status stays "online"
        new_link, record = self._finish_renewal(link, record)
        if new_link is not None:
            return new_link, record
        try:  # the new certificate did not connect; the old one is still live
            return self._connect(self.context.certs.live_version() or 0), record
        except LinkError:
            return link, record  # closed: the main loop reconnects with backoff

    def _finish_renewal(
        self, old: MqttLink | None, record: StateRecord
    ) -> tuple[MqttLink | None, StateRecord]:
        """Connect with the staged certificate, confirm it, make it live."""
        version = record.renew_version
        assert version is not None
        meta = self.context.certs.meta(version)
        serial = str(meta.get("serial"))
        try:
            link = self._connect(version)
        except LinkError as exc:
            if exc.cert_rejected:  # the server will not take it: drop it, renew again later
                record = self._drop_renewal(record, f"new certificate refused: {exc.message}")
            else:
                self._renew_failed(record, ErrorCode.UNAVAILABLE, exc.message)
            return None, record
        try:
            confirm = {
                "op": "renew-confirm",
                "serial": serial,
                "signature": self._proof(record, meta, serial),
            }
            raw = link.request(
                protocol.renew_topic(self.client_id),
                protocol.encode(confirm),
                protocol.renew_response_topic(self.client_id),
                self.context.timing.request_timeout_s,
            )
        except AgentError as exc:  # the link dropped, or the new key is unreadable
            log.warning("%s", format_fields(event="renew_confirm_failed", error=exc.message))
            link.close()
            self._renew_failed(record, ErrorCode.UNAVAILABLE, exc.message)
            return None, record  # confirmed later: the old certificate stays live until then
        response = protocol.parse_response(raw)
        if response.error is not None:
            # Only a confirmed certificate is the server's current one: one used without
            # confirmation would be revoked by the next renewal. Retry later, or drop it
            # (a refusal that will not change) and renew with a fresh key.
            log.warning(
                "%s", format_fields(event="renew_confirm_refused", error=str(response.error))
            )
            link.close()
            return None, self._renew_failed(record, response.error.code, response.error.message)
        self.context.certs.activate(version)
        slot = record.key_slot
        record = self.context.states.transition(
            record,
            AgentState.ACTIVE,
            "renewed",
            cert_version=version,
            cert_serial=serial,
            renew_version=None,
            key_slot=None,
            csr=None,
        )
        if slot is not None:
            self._keystore().delete(slot)  # the version holds its own link to the key
        self.context.certs.prune(keep=1)
        self.renew_backoff.reset()
        self._next_renew_try = 0.0
        self._renewed = True
        return link, record

    def _proof(self, record: StateRecord, meta: dict[str, Any], serial: str) -> str:
        """The new key's signature over the server's nonce: proves we hold that key."""
        slot = record.key_slot or str(meta.get("key_slot"))
        message = protocol.renewal_proof_message(
            self.client_id, serial, str(meta.get("confirm_nonce", ""))
        )
        return base64.b64encode(self._keystore().sign(slot, message)).decode("ascii")

    def _renew_failed(self, record: StateRecord, code: ErrorCode, message: str) -> StateRecord:
        delay = self.renew_backoff.next_delay()
        self._next_renew_try = time.monotonic() + delay
        log.warning(
            "%s",
            format_fields(
                event="renew_failed", code=code.value, error=message, retry_in=f"{delay:.1f}"
            ),
        )
        if code == ErrorCode.CSR_INVALID or not code.retryable:
            return self._drop_renewal(record, f"{code.value}: {message}")
        return record

    def _drop_renewal(self, record: StateRecord, reason: str) -> StateRecord:
        slot = record.key_slot
        record = self.context.states.transition(
            record, AgentState.ACTIVE, reason, key_slot=None, csr=None, renew_version=None
        )
        if slot is not None:
            try:
                self._keystore().delete(slot)
            except AgentError as exc:
                log.warning("%s", format_fields(event="key_delete_failed", error=exc.message))
        if self._next_renew_try <= time.monotonic():
            self._next_renew_try = time.monotonic() + self.renew_backoff.next_delay()
        return record

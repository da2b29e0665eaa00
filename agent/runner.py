"""The agent service loop: load state, provision, keep the session, until told to stop.

``AgentRunner(config).run(stop)`` is what ``provision-agent run`` executes
under systemd. It tells systemd READY as soon as the state is loaded (a device
may wait hours for allocation; systemd's start timeout must not kill it),
sends ``STATUS=`` on every state change, and pings the watchdog from the loop
itself, so a hung loop gets the service restarted.

Heavy modules (paho-mqtt, cryptography) are imported only when a state needs
them, which keeps an idle or unprovisioned agent small (design.md §7).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.birth import BirthIdentity, keys_dir
from agent.config import AgentConfig
from agent.errors import AgentError
from agent.identity import read_mac
from agent.protocol import ErrorCode
from agent.sdnotify import SystemdNotifier
from agent.state import AgentState, StateRecord, StateStore, format_fields

if TYPE_CHECKING:
    from agent.keystore import FileKeyStore
    from agent.storage import CertificateStore

log = logging.getLogger("agent.runner")

CERTS_DIR: Final = "certs"
# How often an agent without a (finalized) birth identity looks again.
UNPROVISIONED_POLL_S: Final = 5.0
PROVISIONING_STATES: Final = frozenset(
    {AgentState.NEED_TOKEN, AgentState.HAVE_TOKEN, AgentState.CSR_SENT}
)
SESSION_STATES: Final = frozenset({AgentState.CERT_STORED, AgentState.ACTIVE, AgentState.RENEWING})


def certs_dir(state_dir: Path) -> Path:
    return Path(state_dir) / CERTS_DIR


def ca_file_for(config: AgentConfig, identity: BirthIdentity) -> Path:
    """The configured CA bundle when it exists, else the one the factory wrote."""
    configured = config.broker.ca_bundle
    return configured if configured.is_file() else identity.chain_path


class AgentRunner:
    def __init__(self, config: AgentConfig, notifier: SystemdNotifier | None = None) -> None:
        self.config = config
        self.state_dir = config.device.state_dir
        self.states = StateStore(self.state_dir)
        self.notifier = notifier or SystemdNotifier()
        self._watchdog_interval = self.notifier.watchdog_interval()
        self._last_ping = 0.0
        self._last_status: str | None = None
        self._stop = threading.Event()

    # --- pacing ------------------------------------------------------------------

    def tick(self) -> None:
        """Called from every loop; feeds the watchdog and mirrors the state into STATUS."""
        now = time.monotonic()
        if self._watchdog_interval is not None and now - self._last_ping >= min(
            self._watchdog_interval, 5.0
        ):
            self.notifier.watchdog()
            self._last_ping = now
        state = self.states.load().state.value
        if state != self._last_status:
            self._last_status = state
            self.notifier.status(f"state={state}")

    def sleep(self, seconds: float) -> bool:
        """Wait up to ``seconds`` in short steps (feeding the watchdog); True when stopping."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.tick()
            self._stop.wait(min(remaining, 1.0))
        return self._stop.is_set()

    # --- main loop ---------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        self._stop = stop
        record = self.states.load()
        self.notifier.ready(f"state={record.state.value}")
        log.info(
            "%s",
            format_fields(
                event="start", state=record.state, state_dir=self.state_dir, pid=os.getpid()
            ),
        )
        while not stop.is_set():
            self.tick()
            record = self.step(record)
        self.notifier.stopping()
        log.info("%s", format_fields(event="exit", state=self.states.load().state))
        return 0

    def step(self, record: StateRecord) -> StateRecord:
        """Run the current state until it changes (or stop); errors wait and retry."""
        try:
            identity = BirthIdentity.load(self.state_dir)
            if identity is None or not identity.finalized:
                if record.state != AgentState.UNPROVISIONED:
                    record = self.states.transition(
                        record, AgentState.UNPROVISIONED, "no finalized birth identity"
                    )
                self.sleep(UNPROVISIONED_POLL_S)
                return self.states.load()
            if record.state == AgentState.UNPROVISIONED:
                record = self.states.transition(record, AgentState.NEED_TOKEN, "birth identity")
            if record.state == AgentState.REJECTED:
                return self._rejected(record)
            self._check_mac(identity)
            if record.state in PROVISIONING_STATES:
                return self._provision(identity, record)
            if record.state in SESSION_STATES:
                return self._session(identity, record)
            raise AgentError(f"unknown state {record.state}")  # pragma: no cover
        except AgentError as exc:
            if exc.code.retryable:
                delay = self.config.timing.backoff_max_s
                log.error(
                    "%s", format_fields(event="error", error=exc.message, retry_in=f"{delay:.0f}")
                )
                self.sleep(delay)
                return self.states.load()
            from agent.provisioning import REJECTED_RETRY_FACTOR

            retry_at = time.time() + REJECTED_RETRY_FACTOR * self.config.timing.backoff_max_s
            return self.states.transition(
                record,
                AgentState.REJECTED,
                exc.message,
                error_code=exc.code.value,
                error_message=exc.message,
                retry_at=retry_at,
            )

    def _check_mac(self, identity: BirthIdentity) -> None:
        device = self.config.device
        _interface, mac = read_mac(device.sysfs_root, device.interface)
        if mac != identity.mac:
            raise _MacMismatch(
                f"this board's MAC {mac} is not the MAC of its birth identity {identity.mac}; "
                "the identity belongs to another board (run the factory station again)"
            )

    def _rejected(self, record: StateRecord) -> StateRecord:
        remaining = (record.retry_at or 0.0) - time.time()
        if remaining > 0:
            self.sleep(remaining)
            return self.states.load()
        return self.states.transition(record, AgentState.NEED_TOKEN, "retrying after rejection")

    def _stores(self, record: StateRecord) -> tuple[FileKeyStore, CertificateStore]:
        from agent.keystore import FileKeyStore
        from agent.storage import CertificateStore, ensure_private_dir

        ensure_private_dir(self.state_dir)
        keystore = FileKeyStore(keys_dir(self.state_dir))
        _remove_orphan_keys(keystore, record.key_slot)
        return keystore, CertificateStore(certs_dir(self.state_dir))

    def _provision(self, identity: BirthIdentity, record: StateRecord) -> StateRecord:
        from agent.provisioning import Provisioner

        keystore, certs = self._stores(record)
        provisioner = Provisioner(
            identity,
            identity.effective_endpoints(self.config.broker),
            ca_file_for(self.config, identity),
            self.config.timing,
            self.states,
            keystore,
            certs,
            self.sleep,
            self._stop,
        )
        return provisioner.run(record)

    def _session(self, identity: BirthIdentity, record: StateRecord) -> StateRecord:
        from agent.session import OperationalSession, SessionOutcome

        keystore, certs = self._stores(record)
        session = OperationalSession(
            identity,
            identity.effective_endpoints(self.config.broker),
            ca_file_for(self.config, identity),
            self.config.timing,
            self.states,
            keystore,
            certs,
            self.sleep,
            self._stop,
            tick=self.tick,
        )
        record, outcome = session.run(record)
        if outcome == SessionOutcome.REPROVISION:
            slot = record.key_slot
            record = self.states.transition(
                record,
                AgentState.NEED_TOKEN,
                "certificate no longer accepted; provisioning again with the birth identity",
                key_slot=None,
                csr=None,
                renew_version=None,
            )
            if slot is not None:
                keystore.delete(slot)
        return record


class _MacMismatch(AgentError):
    code = ErrorCode.MAC_MISMATCH


def _remove_orphan_keys(keystore: FileKeyStore, keep: str | None) -> None:
    """Delete operational key slots no state refers to (a crash between two steps).

    Safe for live certificates: a stored version holds its own link to its key.
    """
    for name in os.listdir(keystore.directory):
        slot, _dot, suffix = name.partition(".")
        if suffix != "key" or not slot.startswith("op-") or slot == keep:
            continue
        keystore.delete(slot)
        log.info("%s", format_fields(event="orphan_key_removed", slot=slot))

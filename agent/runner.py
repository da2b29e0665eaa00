"""The agent service loop: load state, provision, keep the session, until told to stop.

``AgentRunner(config).run(stop)`` is what ``provision-agent run`` executes
under systemd. It tells systemd READY as soon as the state is loaded (a device
may wait hours for allocation; systemd's start timeout must not kill it),
sends ``STATUS=`` on every state change, and pings the watchdog from the loop
itself, so a hung loop gets the service restarted.

Heavy modules are imported only when a state needs them: paho-mqtt for a
connection, cryptography only to make a key, build a CSR or check an issued
certificate. Once the agent has provisioned or renewed (cryptography loaded),
it replaces itself with a fresh ``python -m agent run`` (same PID, so systemd
and its watchdog see no change), and the long-running ACTIVE process never
holds cryptography (design.md §7, docs/agent.md "Memory").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

from agent.birth import BirthIdentity, keys_dir
from agent.config import AgentConfig, load_config
from agent.context import DeviceContext
from agent.errors import AgentError
from agent.identity import read_mac
from agent.protocol import ErrorCode
from agent.sdnotify import SystemdNotifier
from agent.state import REJECTED_RETRY_FACTOR, AgentState, StateRecord, StateStore, format_fields
from agent.storage import CertificateStore, ensure_private_dir

if TYPE_CHECKING:
    from agent.keystore import FileKeyStore

log = logging.getLogger("agent.runner")

CERTS_DIR: Final = "certs"
# How often an agent without a (finalized) birth identity looks again.
UNPROVISIONED_POLL_S: Final = 5.0
PROVISIONING_STATES: Final = frozenset(
    {AgentState.NEED_TOKEN, AgentState.HAVE_TOKEN, AgentState.CSR_SENT}
)
SESSION_STATES: Final = frozenset({AgentState.CERT_STORED, AgentState.ACTIVE, AgentState.RENEWING})
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# Loaded only to make keys, CSRs and check certificates; the session restarts without it.
PROVISIONING_ONLY_MODULE: Final = "cryptography"


def certs_dir(state_dir: Path) -> Path:
    return Path(state_dir) / CERTS_DIR


def ca_file_for(config: AgentConfig, identity: BirthIdentity) -> Path:
    """The configured CA bundle when it exists, else the one the factory wrote."""
    configured = config.broker.ca_bundle
    return configured if configured.is_file() else identity.chain_path


def service_argv(config_path: Path | None, verbose: bool) -> list[str]:
    """The service's command line: ``python -m agent run …`` (no click, see agent/__main__.py)."""
    argv = [sys.executable, "-m", "agent", "run"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    if verbose:
        argv.append("-v")
    return argv


def exec_service(argv: list[str]) -> NoReturn:
    """Replace this process with ``argv`` (same PID) without losing a stop signal.

    SIGTERM/SIGINT are blocked first: the mask and any pending signal survive
    ``execve``, and ``serve`` unblocks them once its handlers are installed, so
    a stop that arrives during the switch is delivered to the new process.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)  # noqa: S606 (our interpreter; argv from service_argv)
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        raise


def setup_logging(verbose: bool) -> None:
    # One line per event on stderr: journald adds the time stamp.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("paho").setLevel(logging.WARNING)


def serve(config_path: Path | None, verbose: bool) -> int:
    """The service process (``python -m agent run``): run until SIGTERM/SIGINT; exit code."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # see exec_service
    # paho imports dnspython for SRV lookups (connect_srv), which the agent never
    # uses; a board does not have it, a venv with pymongo does (~3.5 MB RSS).
    sys.modules.setdefault("dns", None)  # type: ignore[arg-type]
    try:
        config = load_config(config_path)
        setup_logging(verbose)
        return AgentRunner(config, restart_argv=service_argv(config_path, verbose)).run(stop)
    except AgentError as exc:
        print(f"provision-agent: error: {exc.message}", file=sys.stderr, flush=True)
        return 1


class AgentRunner:
    """The state loop. With ``restart_argv`` it re-executes itself (``exec_service``) to
    shed cryptography after provisioning or renewal; without it, it stays in-process."""

    def __init__(
        self,
        config: AgentConfig,
        notifier: SystemdNotifier | None = None,
        restart_argv: list[str] | None = None,
    ) -> None:
        self.config = config
        self.restart_argv = restart_argv
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

    def _keystore(self) -> FileKeyStore:
        from agent.keystore import FileKeyStore  # loads cryptography

        return FileKeyStore(keys_dir(self.state_dir))

    def _context(self, identity: BirthIdentity, record: StateRecord) -> DeviceContext:
        """What provisioning and the session need; removes orphan keys on the way."""
        ensure_private_dir(self.state_dir)
        _remove_orphan_keys(self.state_dir, record.key_slot)
        return DeviceContext(
            identity=identity,
            endpoints=identity.effective_endpoints(self.config.broker),
            ca_file=ca_file_for(self.config, identity),
            timing=self.config.timing,
            states=self.states,
            key_dir=keys_dir(self.state_dir),
            certs=CertificateStore(certs_dir(self.state_dir)),
            sleep=self.sleep,
            stop=self._stop,
            tick=self.tick,
        )

    def _provision(self, identity: BirthIdentity, record: StateRecord) -> StateRecord:
        from agent.provisioning import Provisioner

        return Provisioner(self._context(identity, record)).run(record)

    def _restart_without_cryptography(self, why: str) -> None:
        """Re-exec the service if cryptography is loaded (returns when it is not, or in-process)."""
        if self.restart_argv is None or PROVISIONING_ONLY_MODULE not in sys.modules:
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if self._stop.is_set():  # a stop that came first wins: no restart
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            return
        log.info("%s", format_fields(event="restart", reason=why, pid=os.getpid()))
        try:
            exec_service(self.restart_argv)
        except OSError as exc:  # keep serving in this process; only memory is lost
            log.error("%s", format_fields(event="restart_failed", error=exc.strerror))

    def _session(self, identity: BirthIdentity, record: StateRecord) -> StateRecord:
        from agent.session import OperationalSession, SessionOutcome

        self._restart_without_cryptography("certificate stored")
        session = OperationalSession(
            self._context(identity, record), restart_after_renewal=self.restart_argv is not None
        )
        record, outcome = session.run(record)
        if outcome == SessionOutcome.RESTART and not self._stop.is_set():
            self._restart_without_cryptography("certificate renewed")
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
                self._keystore().delete(slot)
        return record


class _MacMismatch(AgentError):
    code = ErrorCode.MAC_MISMATCH


def _remove_orphan_keys(state_dir: Path, keep: str | None) -> None:
    """Delete operational key slots no state refers to (a crash between two steps).

    Safe for live certificates: a stored version holds its own link to its key.
    The key store (and with it cryptography) is loaded only when there is one.
    """
    try:
        names = os.listdir(keys_dir(state_dir))
    except FileNotFoundError:
        return
    orphans = []
    for name in names:
        slot, _dot, suffix = name.partition(".")
        if suffix == "key" and slot.startswith("op-") and slot != keep:
            orphans.append(slot)
    if not orphans:
        return
    from agent.keystore import FileKeyStore

    keystore = FileKeyStore(keys_dir(state_dir))
    for slot in orphans:
        keystore.delete(slot)
        log.info("%s", format_fields(event="orphan_key_removed", slot=slot))

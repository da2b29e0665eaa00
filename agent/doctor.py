"""``provision-agent doctor``: what is wrong with this board, one line per check.

Run by a field technician on the board (or by a script with ``--json``). It reads
the config, the state directory and the certificates, and contacts the broker
only to resolve its name, open its port, complete a TLS handshake with the board's
own certificate and see one MQTT CONNECT answered (agent/broker_probe.py); it never
changes a file. Checks, in order:

``config``, ``identity``, ``clock``, ``keys``, ``key-match``, ``certificate``,
``<listener>-dns``, ``<listener>-port``, ``<listener>-tls`` (provisioning and
operational listener) and ``state`` (the state machine's last error).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click

from agent.birth import BIRTH_SLOT, BirthIdentity, keys_dir
from agent.broker_probe import Listener, probe
from agent.config import AgentConfig, load_config
from agent.errors import AgentError
from agent.health import CheckResult, failed, healthy, passed, render_json, render_text, warned
from agent.identity import read_mac
from agent.runner import PROVISIONING_STATES, ca_file_for, certs_dir
from agent.state import AgentState, StateRecord, StateStore
from agent.storage import DIR_MODE, FILE_MODE, CertificateStore

if TYPE_CHECKING:
    from cryptography import x509

# A clock this far before the build is wrong; less could be a time-zone or packaging skew.
BUILD_SLACK: Final = timedelta(days=1)
# Certificates are back-dated by the CA for clock skew; a clock this far before
# notBefore is still worth a failure.
VALIDITY_SLACK: Final = timedelta(minutes=5)
# A renewal not done this long after it was due means the board cannot renew.
RENEWAL_GRACE: Final = timedelta(days=1)
NETWORK_TIMEOUT_S: Final = 3.0


def build_time() -> datetime:
    """When this agent was built or installed: the newest mtime of its own modules.

    A Debian package keeps its build's mtimes; a pip or git install has the install time.
    Either way, a clock before it is certainly wrong.
    """
    package = Path(__file__).parent
    newest = max(p.stat().st_mtime for p in package.glob("*.py"))
    return datetime.fromtimestamp(newest, timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class _Certificate:
    label: str
    path: Path
    key_path: Path | None
    cert: x509.Certificate


class Doctor:
    """Runs the checks against one config; ``now`` and ``built`` can be given for tests."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        now: datetime | None = None,
        built: datetime | None = None,
        timeout: float = NETWORK_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.now = now or datetime.now(timezone.utc)
        self.built = built or build_time()
        self.timeout = timeout
        self.state_dir = config.device.state_dir
        self.identity: BirthIdentity | None = None
        self.certificates: list[_Certificate] = []

    def run(self) -> list[CheckResult]:
        results: list[CheckResult] = []
        identity = self._identity()
        results.append(identity)
        if self.identity is not None:
            self.certificates = list(self._load_certificates(results))
            results += [self._clock(), self._keys(), self._key_match(), self._expiry()]
            results += self._broker()
        results.append(self._state())
        return results

    # --- identity and certificates ------------------------------------------------

    def _identity(self) -> CheckResult:
        try:
            self.identity = BirthIdentity.load(self.state_dir)
        except AgentError as exc:
            return failed("identity", f"{exc.message}; program the board again with the station")
        if self.identity is None:
            return failed(
                "identity",
                f"no birth identity in {self.state_dir}: program the board with "
                "provision-station (the factory console must run on its serial port)",
            )
        try:
            interface, mac = read_mac(self.config.device.sysfs_root, self.config.device.interface)
        except AgentError as exc:
            return failed("identity", f"cannot read this board's MAC: {exc.message}")
        if mac != self.identity.mac:
            return failed(
                "identity",
                f"this board's MAC {mac} ({interface}) is not the MAC of its birth identity "
                f"{self.identity.mac}: the identity belongs to another board (moved storage?); "
                "program this board with the station",
            )
        if not self.identity.finalized:
            return warned(
                "identity",
                f"{self.identity.client_id}: the station did not finalize the identity; "
                "run provision-station on this board again",
            )
        return passed("identity", f"{self.identity.client_id} (MAC {self.identity.mac})")

    def _load_certificates(self, results: list[CheckResult]) -> Iterator[_Certificate]:
        from cryptography import x509

        assert self.identity is not None
        candidates: list[tuple[str, Path, Path | None]] = [
            ("birth", self.identity.cert_path, keys_dir(self.state_dir) / f"{BIRTH_SLOT}.key")
        ]
        try:
            store = CertificateStore(certs_dir(self.state_dir))
            if store.live_version() is not None:
                paths = store.live_paths()
                candidates.append(("operational", paths.cert, paths.key))
        except AgentError as exc:
            results.append(failed("certificate", f"{exc.message}; the agent re-provisions"))
        for label, path, key_path in candidates:
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError) as exc:
                results.append(
                    failed("certificate", f"cannot read {label} certificate {path}: {exc}")
                )
                continue
            yield _Certificate(label, path, key_path, cert)

    def _certificate(self, label: str) -> _Certificate | None:
        return next((c for c in self.certificates if c.label == label), None)

    def _operational(self) -> _Certificate | None:
        return self._certificate("operational")

    def _clock(self) -> CheckResult:
        now = self.now
        if now < self.built - BUILD_SLACK:
            return failed(
                "clock",
                f"the clock says {_iso(now)}, before this agent was built ({_iso(self.built)}): "
                "set the time (NTP, or the RTC and its battery)",
            )
        for cert in self.certificates:
            start = cert.cert.not_valid_before_utc
            if now < start - VALIDITY_SLACK:
                return failed(
                    "clock",
                    f"the clock says {_iso(now)}, before the {cert.label} certificate's validity "
                    f"starts ({_iso(start)}): set the time (NTP, or the RTC and its battery)",
                )
        return passed("clock", f"{_iso(now)} is after the build and within the certificates")

    def _keys(self) -> CheckResult:
        # The agent's user owns its state; root (a technician's sudo) checks for that user.
        owner = os.geteuid()
        if owner == 0:
            with contextlib.suppress(OSError):
                owner = self.state_dir.stat().st_uid
        problems: list[str] = []
        for directory in (self.state_dir, keys_dir(self.state_dir)):
            problems += _ownership(directory, DIR_MODE, "directory", owner)
        key_files = {c.key_path for c in self.certificates if c.key_path is not None}
        for key_path in sorted(key_files):
            problems += _ownership(key_path, FILE_MODE, "key", owner)
        if problems:
            return failed("keys", "; ".join(problems))
        keys = f"{len(key_files)} key{'s' if len(key_files) != 1 else ''}"
        return passed("keys", f"{keys} present, owned by uid {owner}, mode 0600")

    def _key_match(self) -> CheckResult:
        from cryptography.hazmat.primitives import serialization

        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        checked = []
        for cert in self.certificates:
            if cert.key_path is None:
                continue
            try:
                key = serialization.load_pem_private_key(cert.key_path.read_bytes(), password=None)
            except (OSError, ValueError, TypeError):
                return failed("key-match", f"cannot read the {cert.label} key {cert.key_path}")
            if key.public_key().public_bytes(*spki) != cert.cert.public_key().public_bytes(*spki):
                fix = (
                    "program the board again with the station"
                    if cert.label == "birth"
                    else "restart the agent; if it persists, `provision-agent reset` and reprogram"
                )
                return failed(
                    "key-match",
                    f"the {cert.label} certificate {cert.path} does not belong to its key "
                    f"{cert.key_path}: {fix}",
                )
            checked.append(cert.label)
        plural = "s match their keys" if len(checked) > 1 else " matches its key"
        return passed("key-match", f"{' and '.join(checked)} certificate{plural}")

    def _expiry(self) -> CheckResult:
        birth = self._certificate("birth")
        if birth is not None and self.now > birth.cert.not_valid_after_utc:
            return failed(
                "certificate",
                f"the birth certificate expired on {_iso(birth.cert.not_valid_after_utc)}: "
                "the board cannot re-provision; reprogram it at the factory station",
            )
        op = self._operational()
        if op is None:
            return warned(
                "certificate",
                "no operational certificate yet: the agent provisions once the device is "
                "allocated (see `state`)",
            )
        start, end = op.cert.not_valid_before_utc, op.cert.not_valid_after_utc
        serial = f"{op.cert.serial_number:X}"
        if self.now >= end:
            return failed(
                "certificate",
                f"operational certificate {serial} expired on {_iso(end)}: the agent asks to "
                "re-provision with its birth certificate (an operator may have to approve: "
                "`provision-server device reprovision`); see the provisioning checks",
            )
        renew = start + (end - start) * self.config.timing.renew_fraction
        left = (end - self.now).total_seconds() / 86400
        if self.now > renew + RENEWAL_GRACE:
            return warned(
                "certificate",
                f"operational certificate {serial} expires in {left:.1f} days and renewal was "
                f"due on {_iso(renew)}: check the operational broker checks and the agent's log",
            )
        return passed(
            "certificate",
            f"operational certificate {serial} valid until {_iso(end)} ({left:.0f} days), "
            f"renewal from {_iso(renew)}",
        )

    # --- the broker ------------------------------------------------------------------

    def _broker(self) -> list[CheckResult]:
        assert self.identity is not None
        endpoints = self.identity.effective_endpoints(self.config.broker)
        ca_file = ca_file_for(self.config, self.identity)
        results: list[CheckResult] = []
        for name, host, port in (
            ("provisioning", endpoints.provisioning_host, endpoints.provisioning_port),
            ("operational", endpoints.operational_host, endpoints.operational_port),
        ):
            cert = self._certificate("birth" if name == "provisioning" else "operational")
            listener = Listener(name, host, port, ca_file, timeout=self.timeout)
            if cert is not None and cert.key_path is not None:
                listener = replace(
                    listener, cert=cert.path, key=cert.key_path, cert_label=cert.label
                )
            results += probe(listener, self.config.source, self.timeout)
        return results

    # --- state machine ---------------------------------------------------------------

    def _state(self) -> CheckResult:
        try:
            record: StateRecord = StateStore(self.state_dir).load()
        except AgentError as exc:
            return failed("state", f"{exc.message}; `provision-agent reset` starts over")
        state = record.state
        if state == AgentState.REJECTED:
            retry = (
                _iso(datetime.fromtimestamp(record.retry_at, timezone.utc))
                if record.retry_at
                else "later"
            )
            return failed(
                "state",
                f"REJECTED by the server: {record.error_code}: {record.error_message} "
                f"(retries at {retry}; restart the agent once the cause is fixed)",
            )
        if state == AgentState.UNPROVISIONED:
            return warned("state", "UNPROVISIONED: waiting for the factory station")
        if state in PROVISIONING_STATES:
            return passed(
                "state", f"{state.value}: provisioning (it waits while the device is unallocated)"
            )
        return passed("state", f"{state.value}")


def _ownership(path: Path, mode: int, what: str, owner: int) -> list[str]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [f"{what} {path} is missing"]
    problems = []
    if stat.S_ISLNK(st.st_mode):
        problems.append(f"{what} {path} is a symlink")
    if st.st_uid != owner:
        problems.append(f"{what} {path} is owned by uid {st.st_uid}, not the agent's {owner}")
    actual = stat.S_IMODE(st.st_mode)
    if actual != mode:
        problems.append(f"{what} {path} has mode {actual:04o}: chmod {mode:o} {path}")
    return problems


def diagnose(config_path: Path | None) -> list[CheckResult]:
    """Every check for the config at ``config_path`` (the standard locations when None)."""
    try:
        config = load_config(config_path)
    except AgentError as exc:
        return [failed("config", exc.message)]
    where = str(config.source) if config.source else "defaults (no config file)"
    return [passed("config", f"{where} is valid"), *Doctor(config).run()]


@click.command("doctor")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default: $PROVISION_AGENT_CONFIG, then the standard locations).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor_command(config_path: Path | None, as_json: bool) -> None:
    """Check config, clock, keys, certificates, the broker and the last error.

    One line per check (pass, warn or fail, and what to do); exit 1 if any failed.
    """
    results = diagnose(config_path)
    click.echo(render_json(results) if as_json else render_text(results))
    raise SystemExit(0 if healthy(results) else 1)

"""Program one board over its serial cable: birth identity on the board, UNALLOCATED in MongoDB.

Flow (design.md §5): HELLO → INFO → (check the database) → GEN_KEY → sign with
the factory CA → PUT (4 items) → COMMIT(hash) → register UNALLOCATED → FINALIZE.

Convergence: the database is checked *before* anything is written anywhere,
so a MAC or clientId that belongs to another device stops the run with
nothing written. A board that already holds a committed identity for the
expected clientId, issued by this factory CA, is not re-signed: the station
only registers it and finalizes it. Every board command is idempotent, so a
station or a board killed at any step is fixed by running the station again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from agent.errors import AgentError
from agent.factory import commands as fc
from agent.factory.commands import Command, IdentityState
from agent.factory.link import SerialLink
from agent.protocol import ErrorCode, mac_uri, normalise_mac
from server.errors import DeviceConflict, ServerError
from server.pki.ca import CertificateAuthority, serial_hex
from server.pki.csr_policy import CsrPolicy
from server.store.db import Database, Document
from server.store.devices import DeviceRepository
from server.store.issuances import IssuanceLedger


class Step(str, Enum):
    OPEN = "open"
    HELLO = "hello"
    INFO = "info"
    CHECK = "check"
    GEN_KEY = "gen_key"
    SIGN = "sign"
    PUT = "put"
    COMMIT = "commit"
    REGISTER = "register"
    FINALIZE = "finalize"


StepHook = Callable[[str, Step], None]


class StationError(ServerError):
    """The board or the database refused; the message says which and what to do."""

    code = ErrorCode.BAD_REQUEST


@dataclass(frozen=True)
class BoardResult:
    """One row of the station's report."""

    port: str
    mac: str | None
    client_id: str | None
    certificate_serial: str | None
    result: str  # "programmed", "already-programmed" or "failed"
    duration_s: float
    error: str | None = None
    step: str | None = None  # the last step reached

    @property
    def ok(self) -> bool:
        return self.result != "failed"

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["duration_s"] = round(self.duration_s, 3)
        return row


class DeviceRegistry:
    """Registration in ``devices``: upsert by macID, never stealing a MAC or a clientId."""

    def __init__(self, database: Database) -> None:
        self.repository = DeviceRepository(database)

    def check(self, mac: str, client_id: str) -> Document | None:
        """The existing record for this board, or None; DeviceConflict on any clash."""
        collection = self.repository.collection
        by_mac = self.repository.database.call(lambda: collection.find_one({"macID": mac}))
        if by_mac is not None and by_mac.get("clientId") != client_id:
            raise DeviceConflict(
                f"MAC {mac} is already registered as clientId {by_mac.get('clientId')!r}, "
                f"not {client_id!r}; delete that device or fix the clientId pattern"
            )
        by_id = self.repository.by_client_id(client_id)
        if by_id is not None and by_id.get("macID") != mac:
            raise DeviceConflict(
                f"clientId {client_id!r} already belongs to MAC {by_id.get('macID')}, "
                f"not {mac}; fix the clientId pattern"
            )
        return by_mac

    def register(self, mac: str, client_id: str) -> Document:
        existing = self.check(mac, client_id)
        if existing is not None:
            return existing  # converged: keep its status (it may be in the field already)
        try:
            return self.repository.add(mac, client_id)
        except DeviceConflict:
            existing = self.check(mac, client_id)  # another station won the race
            if existing is None:
                raise
            return existing


class BoardProgrammer:
    """Programs boards one at a time (one instance per thread in a batch)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        database: Database,
        *,
        client_id_for: Callable[[str, str], str],
        endpoints_json: bytes,
        timeout: float = 1.0,
        retries: int = 5,
        baud: int = 115200,
        on_step: StepHook | None = None,
    ) -> None:
        self.ca = ca
        self.registry = DeviceRegistry(database)
        self.ledger = IssuanceLedger(database)
        self.client_id_for = client_id_for
        self.endpoints_json = endpoints_json
        self.timeout = timeout
        self.retries = retries
        self.baud = baud
        self.on_step = on_step
        self.policy = CsrPolicy()

    def program(self, port_path: str) -> BoardResult:
        """Program the board on ``port_path``; never raises for an expected failure."""
        started = time.monotonic()
        facts: dict[str, Any] = {"mac": None, "client_id": None, "serial": None, "step": None}

        def reached(step: Step) -> None:
            facts["step"] = step.value
            if self.on_step is not None:
                self.on_step(port_path, step)

        try:
            port = _open(port_path, self.baud)
            try:
                reached(Step.OPEN)
                outcome = self._run(
                    SerialLink(port, timeout=self.timeout, retries=self.retries), facts, reached
                )
            finally:
                port.close()
        except (AgentError, ServerError) as exc:
            return self._result(port_path, facts, "failed", started, exc.message)
        except OSError as exc:
            return self._result(port_path, facts, "failed", started, f"{port_path}: {exc}")
        return self._result(port_path, facts, outcome, started, None)

    def _result(
        self, port: str, facts: dict[str, Any], result: str, started: float, error: str | None
    ) -> BoardResult:
        return BoardResult(
            port=port,
            mac=facts["mac"],
            client_id=facts["client_id"],
            certificate_serial=facts["serial"],
            result=result,
            duration_s=time.monotonic() - started,
            error=error,
            step=facts["step"],
        )

    def _run(self, link: SerialLink, facts: dict[str, Any], reached: Callable[[Step], None]) -> str:
        def call(command: Command, request: dict[str, Any]) -> dict[str, Any]:
            return fc.decode(link.request(command, fc.encode(request)), f"{command.name} answer")

        link.connect()
        reached(Step.HELLO)
        info = call(Command.INFO, {})
        try:
            mac = normalise_mac(fc.text_field(info, "mac", "INFO"))
            client_id = self.client_id_for(mac, fc.text_field(info, "serial", "INFO"))
        except ValueError as exc:
            raise StationError(f"INFO: {exc}") from None
        facts["mac"], facts["client_id"] = mac, client_id
        reached(Step.INFO)
        self.registry.check(mac, client_id)
        reached(Step.CHECK)
        state = info.get("state")
        existing = self._reusable(info, client_id, mac)
        if existing is not None:
            self._check_not_revoked(existing, client_id)
            # Boards programmed before the ledger existed get their record now.
            self.ledger.record_birth(client_id, existing)
            cert, outcome = existing, "already-programmed"
        elif state == IdentityState.FINALIZED.value:
            raise StationError(
                f"the board is finalized as {info.get('clientId')!r}, not {client_id!r} with a "
                "certificate of this factory CA; run `provision-agent reset` on the board first"
            )
        else:
            cert, outcome = self._write_identity(call, client_id, mac, reached), "programmed"
        facts["serial"] = serial_hex(cert)
        self.registry.register(mac, client_id)
        reached(Step.REGISTER)
        call(Command.FINALIZE, {})
        reached(Step.FINALIZE)
        return outcome

    def _check_not_revoked(self, cert: x509.Certificate, client_id: str) -> None:
        record = self.ledger.find(serial_hex(cert))
        if record is not None and record.get("state") in ("revoked", "superseded"):
            raise StationError(
                f"the board's birth certificate {serial_hex(cert)} for {client_id!r} is "
                f"{record.get('state')} ({record.get('state_reason')}); re-birth the board: "
                "`provision-agent reset` on it (factory reset), then program it again"
            )

    def _reusable(self, info: dict[str, Any], client_id: str, mac: str) -> x509.Certificate | None:
        """The board's committed certificate if it is ours for this clientId and MAC."""
        if info.get("state") not in (IdentityState.COMMITTED.value, IdentityState.FINALIZED.value):
            return None
        if info.get("clientId") != client_id or not isinstance(info.get("certificate"), str):
            return None
        try:
            cert = x509.load_pem_x509_certificate(info["certificate"].encode("ascii"))
            cert.verify_directly_issued_by(self.ca.factory_ca)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return None
        names = [n.value for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        return cert if names == [client_id] and uris == [mac_uri(mac)] else None

    def _write_identity(
        self,
        call: Callable[[Command, dict[str, Any]], dict[str, Any]],
        client_id: str,
        mac: str,
        reached: Callable[[Step], None],
    ) -> x509.Certificate:
        csr = fc.text_field(call(Command.GEN_KEY, {fc.ITEM_CLIENT_ID: client_id}), "csr", "GEN_KEY")
        reached(Step.GEN_KEY)
        checked = self.policy.check(csr, client_id=client_id, mac=mac)
        cert = self.ca.sign_birth_certificate(checked.public_key, client_id, mac)
        # Recorded before it leaves for the board, so it can be revoked (quarantine);
        # an older birth certificate of this clientId is revoked now.
        self.ledger.record_birth(client_id, cert)
        reached(Step.SIGN)
        from cryptography.hazmat.primitives.serialization import Encoding

        items = {
            fc.ITEM_CLIENT_ID: client_id.encode("utf-8"),
            fc.ITEM_CERTIFICATE: cert.public_bytes(Encoding.PEM),
            fc.ITEM_CA_CHAIN: self.ca.factory_ca_chain_pem,
            fc.ITEM_ENDPOINTS: self.endpoints_json,
        }
        for name in fc.ITEMS:
            call(Command.PUT, {"item": name, "data": items[name].decode("utf-8")})
        reached(Step.PUT)
        call(Command.COMMIT, {"sha256": fc.commit_digest(items)})
        reached(Step.COMMIT)
        return cert


def _open(path: str, baud: int) -> Any:
    import serial

    try:
        return serial.Serial(path, baudrate=baud, timeout=0.05, exclusive=True)
    except serial.SerialException as exc:
        raise StationError(f"cannot open {path}: {exc} (another station on this port?)") from None

"""The board's side of factory programming: ``provision-agent factory-console``.

It answers the station's commands (``agent.factory.commands``) on the serial
port. Everything it writes goes through ``agent.birth``, whose
``identity.json`` is the commit point, and the only thing it keeps in memory
is the staging area of PUT items: a board reset before COMMIT loses the
staging and leaves no half-written identity; the station simply starts over.

Every command is idempotent: GEN_KEY returns a CSR for the same key until
``provision-agent reset``, PUT replaces an item, COMMIT of what is already
committed succeeds without rewriting, FINALIZE of a finalized board succeeds.
After FINALIZE the board is locked: GEN_KEY, PUT and COMMIT are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent.birth import (
    BIRTH_SLOT,
    BirthIdentity,
    Endpoints,
    keys_dir,
    mark_finalized,
    write_birth_identity,
)
from agent.errors import AgentError, StorageError
from agent.factory import commands as fc
from agent.factory.commands import (
    BoardLocked,
    CertificateMismatch,
    Command,
    FactoryCommandError,
    IdentityState,
    WrongStep,
)
from agent.factory.link import SerialLink
from agent.identity import board_serial, read_mac
from agent.keystore import FileKeyStore
from agent.protocol import CLIENT_ID_RE, mac_uri

log = logging.getLogger(__name__)

_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


@dataclass
class FactoryConsole:
    """Command handler for one board; ``handle`` is what ``SerialLink.serve`` calls."""

    state_dir: Path
    sysfs_root: Path = Path("/sys")
    root: Path = Path("/")
    interface: str | None = None
    _staged: dict[str, bytes] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- facts --------------------------------------------------------------

    def mac(self) -> str:
        return read_mac(self.sysfs_root, self.interface)[1]

    def identity(self) -> BirthIdentity | None:
        return BirthIdentity.load(self.state_dir)

    def keystore(self) -> FileKeyStore:
        return FileKeyStore(keys_dir(self.state_dir))

    def state(self) -> IdentityState:
        identity = self.identity()
        if identity is not None:
            return IdentityState.FINALIZED if identity.finalized else IdentityState.COMMITTED
        if (keys_dir(self.state_dir) / f"{BIRTH_SLOT}.key").exists():
            return IdentityState.KEYED
        return IdentityState.NONE

    # --- dispatch -------------------------------------------------------------

    def handle(self, command: int, payload: bytes) -> bytes:
        with self._lock:
            try:
                name = Command(command)
            except ValueError:
                raise FactoryCommandError(f"unknown factory command {command:#x}") from None
            request = fc.decode(payload, name.name)
            answer = getattr(self, f"_on_{name.name.lower()}")(request)
            log.info("factory event=command command=%s", name.name)
            return fc.encode(answer)

    def _refuse_if_locked(self, what: str) -> None:
        identity = self.identity()
        if identity is not None and identity.finalized:
            raise BoardLocked(
                f"{what} refused: this board is finalized as {identity.client_id}; "
                "run `provision-agent reset` on the board to program it again"
            )

    def _on_info(self, request: dict[str, Any]) -> dict[str, Any]:
        identity = self.identity()
        answer: dict[str, Any] = {
            "mac": self.mac(),
            "serial": board_serial(self.root),
            "state": self.state().value,
        }
        if identity is not None:
            answer["clientId"] = identity.client_id
            answer["certificate"] = identity.cert_pem()
        return answer

    def _on_gen_key(self, request: dict[str, Any]) -> dict[str, Any]:
        self._refuse_if_locked("GEN_KEY")
        client_id = fc.text_field(request, fc.ITEM_CLIENT_ID, "GEN_KEY")
        if not CLIENT_ID_RE.match(client_id):
            raise FactoryCommandError(f"GEN_KEY: clientId {client_id!r} is invalid")
        store = self.keystore()
        if not store.exists(BIRTH_SLOT):
            store.generate(BIRTH_SLOT)
            log.info("factory event=birth_key_generated")
        self._staged.clear()  # a new programming round
        csr = store.build_csr(BIRTH_SLOT, client_id, self.mac())
        return {"csr": csr.decode("ascii")}

    def _on_put(self, request: dict[str, Any]) -> dict[str, Any]:
        self._refuse_if_locked("PUT")
        item = fc.text_field(request, "item", "PUT")
        if item not in fc.ITEMS:
            raise FactoryCommandError(f"PUT: unknown item {item!r} (expected one of {fc.ITEMS})")
        data = fc.text_field(request, "data", "PUT").encode("utf-8")
        if len(data) > fc.MAX_ITEM_BYTES:
            raise FactoryCommandError(f"PUT: {item} is {len(data)} bytes, max {fc.MAX_ITEM_BYTES}")
        self._staged[item] = data
        return {"item": item, "sha256": hashlib.sha256(data).hexdigest()}

    def _committed_items(self, identity: BirthIdentity) -> dict[str, bytes]:
        try:
            return {
                fc.ITEM_CLIENT_ID: identity.client_id.encode("utf-8"),
                fc.ITEM_CERTIFICATE: identity.cert_path.read_bytes(),
                fc.ITEM_CA_CHAIN: identity.chain_path.read_bytes(),
                fc.ITEM_ENDPOINTS: fc.encode(identity.endpoints.to_json()),
            }
        except OSError as exc:
            raise StorageError(f"cannot read the committed birth identity: {exc}") from None

    def _on_commit(self, request: dict[str, Any]) -> dict[str, Any]:
        self._refuse_if_locked("COMMIT")
        wanted = fc.text_field(request, "sha256", "COMMIT").lower()
        identity = self.identity()
        if identity is not None and fc.commit_digest(self._committed_items(identity)) == wanted:
            self._staged.clear()
            return {"state": IdentityState.COMMITTED.value, "clientId": identity.client_id}
        staged = dict(self._staged)
        actual = fc.commit_digest(staged)
        if actual != wanted:
            raise FactoryCommandError(
                f"COMMIT: hash mismatch (staged {actual[:16]}…, station sent {wanted[:16]}…); "
                "PUT every item again"
            )
        written = self._write(staged)
        self._staged.clear()
        log.info("factory event=identity_committed client_id=%s", written.client_id)
        return {"state": IdentityState.COMMITTED.value, "clientId": written.client_id}

    def _write(self, staged: dict[str, bytes]) -> BirthIdentity:
        client_id = staged[fc.ITEM_CLIENT_ID].decode("utf-8", "replace")
        if not CLIENT_ID_RE.match(client_id):
            raise FactoryCommandError(f"COMMIT: clientId {client_id!r} is invalid")
        try:
            raw_endpoints = json.loads(staged[fc.ITEM_ENDPOINTS])
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FactoryCommandError("COMMIT: endpoints are not JSON") from None
        try:
            endpoints = Endpoints.from_json(raw_endpoints, Path("endpoints"))
        except StorageError as exc:
            raise FactoryCommandError(f"COMMIT: {exc.message}") from None
        if fc.encode(endpoints.to_json()) != staged[fc.ITEM_ENDPOINTS]:
            raise FactoryCommandError("COMMIT: endpoints must be canonical JSON (sorted, compact)")
        mac = self.mac()
        cert_pem, chain_pem = staged[fc.ITEM_CERTIFICATE], staged[fc.ITEM_CA_CHAIN]
        self._check_certificate(cert_pem, chain_pem, client_id, mac)
        return write_birth_identity(
            self.state_dir,
            client_id=client_id,
            mac=mac,
            serial=board_serial(self.root),
            endpoints=endpoints,
            cert_pem=cert_pem,
            chain_pem=chain_pem,
        )

    def _check_certificate(
        self, cert_pem: bytes, chain_pem: bytes, client_id: str, mac: str
    ) -> None:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError:
            raise FactoryCommandError("COMMIT: certificate or CA chain is not PEM X.509") from None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [n.value for n in names] != [client_id]:
            raise CertificateMismatch(f"COMMIT: the certificate's CN is not {client_id!r}")
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CertificateMismatch("COMMIT: the certificate has no MAC SAN") from None
        if mac_uri(mac) not in san.get_values_for_type(x509.UniformResourceIdentifier):
            raise CertificateMismatch(f"COMMIT: the certificate is not for this board's MAC {mac}")
        public = self.keystore().public_key(BIRTH_SLOT).public_bytes(*_SPKI)
        if cert.public_key().public_bytes(*_SPKI) != public:
            raise CertificateMismatch(
                "COMMIT: the certificate is not for this board's birth key; run GEN_KEY again"
            )
        try:
            cert.verify_directly_issued_by(chain[0])
        except (ValueError, TypeError, InvalidSignature):
            raise FactoryCommandError(
                "COMMIT: the certificate is not issued by the first CA of the chain"
            ) from None

    def _on_finalize(self, request: dict[str, Any]) -> dict[str, Any]:
        identity = self.identity()
        if identity is None:
            raise WrongStep("FINALIZE: nothing is committed on this board")
        if not identity.finalized:
            mark_finalized(self.state_dir)
            log.info("factory event=finalized client_id=%s", identity.client_id)
        return {"state": IdentityState.FINALIZED.value}

    # --- serving --------------------------------------------------------------

    def serve(self, port: Any, stop: threading.Event | None = None) -> None:
        SerialLink(port).serve(self.handle, stop)


def open_serial(path: str, baud: int) -> Any:
    import serial

    try:
        return serial.Serial(path, baudrate=baud, timeout=0.05, exclusive=True)
    except serial.SerialException as exc:
        raise click.ClickException(f"cannot open serial port {path}: {exc}") from None


@click.command("factory-console")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None)
@click.option("--port", "port_path", help="Serial device (default: [serial] port in the config).")
@click.option("--baud", type=int, default=None, help="Baud rate (default: [serial] baud).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--sysfs-root", type=click.Path(path_type=Path), default=None)
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), show_default=True)
@click.option("--interface", default=None, help="Network interface whose MAC is the identity.")
def factory_console_command(
    config_path: Path | None,
    port_path: str | None,
    baud: int | None,
    state_dir: Path | None,
    sysfs_root: Path | None,
    root: Path,
    interface: str | None,
) -> None:
    """Answer the factory station on a serial port (factory images only)."""
    from agent.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    try:
        cfg = load_config(config_path)
    except AgentError as exc:
        raise click.ClickException(exc.message) from None
    port_path = port_path or cfg.serial.port
    if not port_path:
        raise click.UsageError("no serial port: pass --port or set [serial] port in the config")
    console = FactoryConsole(
        state_dir=state_dir or cfg.device.state_dir,
        sysfs_root=sysfs_root or cfg.device.sysfs_root,
        root=root,
        interface=interface or cfg.device.interface,
    )
    port = open_serial(port_path, baud or cfg.serial.baud)
    log.info("factory event=listening port=%s", port_path)
    try:
        console.serve(port)
    except KeyboardInterrupt:
        pass
    finally:
        port.close()


if __name__ == "__main__":
    factory_console_command()

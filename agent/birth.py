"""The birth identity the factory console leaves on the device (design.md §3, §5).

Layout in the state directory (0700)::

    identity.json        clientId, MAC, board serial, broker endpoints, finalized
    birth/cert.pem       birth certificate (factory CA), CN = clientId
    birth/ca-chain.pem   factory CA + root; the root also verifies the broker
    keys/birth.key       the birth key (FileKeyStore slot "birth")

``identity.json`` is the commit point: ``write_birth_identity`` removes it
first, writes the certificate files, and writes it last, so a crash at any
step leaves either the complete new identity or none (never an old
``identity.json`` next to a new certificate).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from agent.errors import IdentityError, StorageError
from agent.protocol import CLIENT_ID_RE, normalise_mac
from agent.storage import atomic_write, ensure_private_dir, fsync_dir, read_json, write_json_atomic

if TYPE_CHECKING:
    from agent.config import BrokerConfig

IDENTITY_FILE: Final = "identity.json"
BIRTH_DIR: Final = "birth"
BIRTH_CERT_FILE: Final = "cert.pem"
BIRTH_CHAIN_FILE: Final = "ca-chain.pem"
KEYS_DIR: Final = "keys"
BIRTH_SLOT: Final = "birth"


@dataclass(frozen=True)
class Endpoints:
    provisioning_host: str
    provisioning_port: int
    operational_host: str
    operational_port: int

    def to_json(self) -> dict[str, Any]:
        return {
            "provisioning_host": self.provisioning_host,
            "provisioning_port": self.provisioning_port,
            "operational_host": self.operational_host,
            "operational_port": self.operational_port,
        }

    @classmethod
    def from_json(cls, obj: object, where: Path) -> Endpoints:
        if not isinstance(obj, dict):
            raise StorageError(f"{where}: endpoints must be an object")
        try:
            endpoints = cls(
                provisioning_host=str(obj["provisioning_host"]),
                provisioning_port=int(obj["provisioning_port"]),
                operational_host=str(obj["operational_host"]),
                operational_port=int(obj["operational_port"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"{where}: endpoints are incomplete or invalid ({exc})") from None
        return endpoints


def birth_dir(state_dir: Path) -> Path:
    return Path(state_dir) / BIRTH_DIR


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / KEYS_DIR


@dataclass(frozen=True)
class BirthIdentity:
    """A committed birth identity; ``load`` returns None when there is none."""

    state_dir: Path
    client_id: str
    mac: str
    serial: str
    endpoints: Endpoints
    finalized: bool

    @property
    def cert_path(self) -> Path:
        return birth_dir(self.state_dir) / BIRTH_CERT_FILE

    @property
    def chain_path(self) -> Path:
        return birth_dir(self.state_dir) / BIRTH_CHAIN_FILE

    @property
    def key_slot(self) -> str:
        return BIRTH_SLOT

    def cert_pem(self) -> str:
        try:
            return self.cert_path.read_text(encoding="ascii")
        except OSError as exc:
            raise StorageError(f"cannot read birth certificate {self.cert_path}: {exc}") from None

    def effective_endpoints(self, broker: BrokerConfig) -> Endpoints:
        """Endpoints with the config's broker taking precedence where it names a host.

        A port in the config counts only together with its host (the config
        always has a default port, so a port alone cannot mean "set").
        """
        ep = self.endpoints
        if broker.provisioning_host:
            ep = replace(
                ep,
                provisioning_host=broker.provisioning_host,
                provisioning_port=broker.provisioning_port,
            )
        if broker.operational_host:
            ep = replace(
                ep,
                operational_host=broker.operational_host,
                operational_port=broker.operational_port,
            )
        return ep

    @classmethod
    def load(cls, state_dir: Path) -> BirthIdentity | None:
        state_dir = Path(state_dir)
        path = state_dir / IDENTITY_FILE
        obj = read_json(path)
        if obj is None:
            return None
        client_id = obj.get("clientId")
        if not isinstance(client_id, str) or not CLIENT_ID_RE.match(client_id):
            raise StorageError(f"{path}: clientId is missing or invalid")
        try:
            mac = normalise_mac(str(obj.get("mac", "")))
        except ValueError as exc:
            raise StorageError(f"{path}: {exc}") from None
        serial = obj.get("serial")
        if not isinstance(serial, str) or not serial:
            raise StorageError(f"{path}: serial is missing")
        identity = cls(
            state_dir=state_dir,
            client_id=client_id,
            mac=mac,
            serial=serial,
            endpoints=Endpoints.from_json(obj.get("endpoints"), path),
            finalized=obj.get("finalized") is True,
        )
        for needed in (identity.cert_path, identity.chain_path):
            if not needed.is_file():
                raise StorageError(f"{path} is committed but {needed} is missing")
        return identity


def _check_key_matches(state_dir: Path, cert_pem: bytes) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from agent.keystore import FileKeyStore

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise IdentityError("the birth certificate is not a PEM X.509 certificate") from None
    store = FileKeyStore(keys_dir(state_dir))
    public = store.public_key(BIRTH_SLOT)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != public.public_bytes(*spki):
        raise IdentityError("the birth certificate does not match the birth key on this device")


def write_birth_identity(
    state_dir: Path,
    *,
    client_id: str,
    mac: str,
    serial: str,
    endpoints: Endpoints,
    cert_pem: bytes,
    chain_pem: bytes,
    finalized: bool = False,
) -> BirthIdentity:
    """Commit a birth identity; the key must already be in slot ``birth`` and match the cert."""
    state_dir = ensure_private_dir(Path(state_dir))
    if not CLIENT_ID_RE.match(client_id):
        raise IdentityError(f"clientId {client_id!r} is invalid")
    try:
        mac = normalise_mac(mac)
    except ValueError as exc:
        raise IdentityError(str(exc)) from None
    if not serial:
        raise IdentityError("the board serial must not be empty")
    if b"-----BEGIN CERTIFICATE-----" not in chain_pem:
        raise IdentityError("the CA chain holds no PEM certificate")
    _check_key_matches(state_dir, cert_pem)
    # Un-commit first: from here on a crash leaves "no identity", never a mix.
    uncommit(state_dir)
    directory = ensure_private_dir(birth_dir(state_dir))
    atomic_write(directory / BIRTH_CERT_FILE, cert_pem)
    atomic_write(directory / BIRTH_CHAIN_FILE, chain_pem)
    write_json_atomic(
        state_dir / IDENTITY_FILE,
        {
            "clientId": client_id,
            "mac": mac,
            "serial": serial,
            "endpoints": endpoints.to_json(),
            "finalized": finalized,
        },
    )
    identity = BirthIdentity.load(state_dir)
    assert identity is not None
    return identity


def mark_finalized(state_dir: Path) -> BirthIdentity:
    """Set ``finalized`` (the station registered the device); idempotent."""
    path = Path(state_dir) / IDENTITY_FILE
    obj = read_json(path)
    if obj is None:
        raise IdentityError(f"no birth identity in {state_dir} to finalize")
    if obj.get("finalized") is not True:
        write_json_atomic(path, {**obj, "finalized": True})
    identity = BirthIdentity.load(state_dir)
    assert identity is not None
    return identity


def uncommit(state_dir: Path) -> None:
    """Remove ``identity.json`` durably (the birth files stay until overwritten or reset)."""
    path = Path(state_dir) / IDENTITY_FILE
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_dir(path.parent)

"""A CA directory on disk: where each file lives, and loading its certificates and keys.

Loading refuses a key file that others can read and says which file is wrong and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.errors import CaError


@dataclass(frozen=True)
class CaPaths:
    """Where each file of a CA directory lives (``CaPaths.of(directory)``)."""

    directory: Path
    root_cert: Path
    root_key: Path
    device_ca_cert: Path
    device_ca_key: Path
    factory_ca_cert: Path
    factory_ca_key: Path
    broker_cert: Path
    broker_key: Path
    server_client_cert: Path
    server_client_key: Path
    device_ca_chain: Path
    factory_ca_chain: Path
    crl: Path

    @classmethod
    def of(cls, directory: Path) -> CaPaths:
        d = Path(directory)
        return cls(
            d, d / "root.pem", d / "root.key", d / "device-ca.pem", d / "device-ca.key",
            d / "factory-ca.pem", d / "factory-ca.key", d / "broker.pem", d / "broker.key",
            d / "server-client.pem", d / "server-client.key", d / "device-ca-chain.pem",
            d / "factory-ca-chain.pem", d / "crl.pem",
        )  # fmt: skip

    def material(self) -> list[Path]:
        """Every file ``init`` writes (not the CRL, which is written later)."""
        return [getattr(self, f.name) for f in fields(self) if f.name not in ("directory", "crl")]


def missing_file(path: Path) -> CaError:
    return CaError(
        f"CA file {path} is missing; create the CA with `provision-server ca init` "
        "or point the configuration at the right CA directory"
    )


def load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing_file(path) from None
    except OSError as exc:
        raise CaError(f"cannot read CA file {path}: {exc.strerror}") from exc
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CaError(f"CA file {path} is not a PEM certificate; restore it from backup") from None


def load_key(path: Path, passphrase: bytes | None) -> ec.EllipticCurvePrivateKey:
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing_file(path) from None
    except OSError as exc:
        raise CaError(f"cannot read CA key {path}: {exc.strerror}") from exc
    if st.st_mode & 0o077:
        raise CaError(
            f"CA key {path} has mode {st.st_mode & 0o777:04o}; it must be 0600 (chmod 600 it)"
        )
    try:
        key = serialization.load_pem_private_key(data, passphrase or None)
    except TypeError as exc:
        # cryptography: passphrase given for an unencrypted key, or missing for an encrypted one
        raise CaError(f"CA key {path}: {exc}; check the passphrase setting") from None
    except ValueError:
        raise CaError(
            f"CA key {path} cannot be decrypted (wrong passphrase?) or is not a PEM key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"CA key {path} is not an EC key")
    return key

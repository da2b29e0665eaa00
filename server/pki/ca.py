"""The server's certificate authority: root, device CA, factory CA, broker/server identities.

Layout of a CA directory (created by ``provision-server ca init``, mode 0700)::

    root.pem / root.key              self-signed root; its key is used only by ``init``
    device-ca.pem / device-ca.key    signs operational device certificates and the CRL
    factory-ca.pem / factory-ca.key  signs birth certificates (IDevID idea)
    broker.pem / broker.key          Mosquitto's TLS server certificate (issued by the root)
    server-client.pem / .key         the server's own MQTT client identity (device CA;
                                     the .pem holds leaf + device CA, for both listeners)
    device-ca-chain.pem              device CA + root: operational listener cafile, devices'
                                     ``ca_certificate``
    factory-ca-chain.pem             factory CA + root: provisioning listener cafile
    crl.pem                          written by ``write_crl``; the operational listener's crlfile

Every key is ECDSA P-256, created with O_EXCL and mode 0600; the three CA keys are
encrypted when a passphrase is given (the broker and server-client keys cannot be:
their services start unattended). Certificates are written atomically.

Trust note: both chains end at the same root, so a listener whose cafile is
``device-ca-chain.pem`` would accept a birth certificate too. The operational listener
also loads ``crl.pem`` (device CA only), and OpenSSL's CRL check then refuses any leaf
whose issuer has no CRL loaded - a birth certificate is refused there ("unable to get
certificate CRL"). The tests verify this with a real Mosquitto.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.protocol import mac_uri
from agent.storage import atomic_write, fsync_dir, write_new_file
from server.errors import CaError
from server.pki.ca_files import CaPaths, load_cert, load_key
from server.pki.certificate_builder import (
    CLOCK_SKEW,
    DevicePublicKey,
    ca_certificate,
    certificate_pem,
    crl_pem,
    fingerprint_sha256,
    leaf_certificate,
    new_ec_key,
    private_key_pem,
    serial_hex,
    subject_name,
)

__all__ = [
    "BROKER_VALIDITY",
    "CLOCK_SKEW",
    "DEFAULT_BIRTH_VALIDITY",
    "DEFAULT_DEVICE_VALIDITY",
    "INTERMEDIATE_VALIDITY",
    "ROOT_VALIDITY",
    "SERVER_CLIENT_CN",
    "CaPaths",
    "CertificateAuthority",
    "DevicePublicKey",
    "fingerprint_sha256",
    "serial_hex",
]

SERVER_CLIENT_CN: Final = "provisioning-server"
"""CN of the server's own MQTT identity; never issued to a device."""

ROOT_VALIDITY: Final = timedelta(days=365 * 30)
INTERMEDIATE_VALIDITY: Final = timedelta(days=365 * 25)
BROKER_VALIDITY: Final = timedelta(days=365 * 5)
DEFAULT_DEVICE_VALIDITY: Final = timedelta(days=90)
DEFAULT_BIRTH_VALIDITY: Final = timedelta(days=365 * 20)

KEY_FILE_MODE: Final = 0o600
CERT_FILE_MODE: Final = 0o644
"""Certificates, chains and the CRL are public and read by Mosquitto (maybe another user)."""


# --- the CA -------------------------------------------------------------------


class CertificateAuthority:
    """Loaded CA material; signs device and birth certificates and the device CRL.

    The root key is not loaded (only ``init`` needs it), so an operator may move it offline.
    """

    def __init__(
        self,
        paths: CaPaths,
        root: x509.Certificate,
        device_ca: x509.Certificate,
        device_key: ec.EllipticCurvePrivateKey,
        factory_ca: x509.Certificate,
        factory_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.paths = paths
        self.root = root
        self.device_ca = device_ca
        self._device_key = device_key
        self.factory_ca = factory_ca
        self._factory_key = factory_key

    def __repr__(self) -> str:  # never show key objects
        return f"CertificateAuthority({str(self.paths.directory)!r})"

    # -- creation / loading --

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        passphrase: bytes | None = None,
        server_names: Sequence[str] = ("localhost",),
        organization: str = "Device Provisioning",
    ) -> CertificateAuthority:
        """Create all CA material in ``directory``; refuse if any of it already exists."""
        paths = CaPaths.of(directory)
        existing = [p.name for p in paths.material() if p.exists() or p.is_symlink()]
        if existing:
            raise CaError(
                f"{paths.directory} already holds CA material ({', '.join(existing)}); "
                "refusing to overwrite it - use another directory or remove it deliberately"
            )
        if not server_names:
            raise CaError("at least one broker server name is needed")
        paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(paths.directory, 0o700)

        # Build everything in memory first, so a failure leaves nothing behind.
        root_key, device_key, factory_key = new_ec_key(), new_ec_key(), new_ec_key()
        root = ca_certificate(
            subject_name(f"{organization} Root CA", organization),
            root_key,
            None,
            root_key,
            1,
            ROOT_VALIDITY,
        )
        device_ca = ca_certificate(
            subject_name(f"{organization} Device CA", organization),
            device_key,
            root,
            root_key,
            0,
            INTERMEDIATE_VALIDITY,
        )
        factory_ca = ca_certificate(
            subject_name(f"{organization} Factory CA", organization),
            factory_key,
            root,
            root_key,
            0,
            INTERMEDIATE_VALIDITY,
        )
        broker_key, client_key = new_ec_key(), new_ec_key()
        san: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        san.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        broker = leaf_certificate(
            subject=subject_name(server_names[0], organization),
            public_key=broker_key.public_key(),
            issuer=root,
            issuer_key=root_key,
            san=san,
            eku=ExtendedKeyUsageOID.SERVER_AUTH,
            validity=BROKER_VALIDITY,
            not_before=None,
        )
        client = leaf_certificate(
            subject=subject_name(SERVER_CLIENT_CN),
            public_key=client_key.public_key(),
            issuer=device_ca,
            issuer_key=device_key,
            san=None,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            validity=BROKER_VALIDITY,
            not_before=None,
        )

        keys = [
            (paths.root_key, private_key_pem(root_key, passphrase)),
            (paths.device_ca_key, private_key_pem(device_key, passphrase)),
            (paths.factory_ca_key, private_key_pem(factory_key, passphrase)),
            (paths.broker_key, private_key_pem(broker_key, None)),
            (paths.server_client_key, private_key_pem(client_key, None)),
        ]
        files = [
            (paths.root_cert, certificate_pem(root)),
            (paths.device_ca_cert, certificate_pem(device_ca)),
            (paths.factory_ca_cert, certificate_pem(factory_ca)),
            (paths.broker_cert, certificate_pem(broker)),
            # Leaf + device CA: the provisioning listener trusts only factory CA + root,
            # so the server must present its intermediate to connect there as well.
            (paths.server_client_cert, certificate_pem(client) + certificate_pem(device_ca)),
            (paths.device_ca_chain, certificate_pem(device_ca) + certificate_pem(root)),
            (paths.factory_ca_chain, certificate_pem(factory_ca) + certificate_pem(root)),
        ]
        written: list[Path] = []
        try:
            for path, data in keys:
                write_new_file(path, data, KEY_FILE_MODE)  # O_EXCL: never overwrite a key
                written.append(path)
            for path, data in files:
                atomic_write(path, data, CERT_FILE_MODE)
                written.append(path)
            fsync_dir(paths.directory)
        except OSError as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise CaError(f"cannot write CA material to {paths.directory}: {exc}") from exc
        return cls(paths, root, device_ca, device_key, factory_ca, factory_key)

    @classmethod
    def load(cls, directory: Path, passphrase: bytes | None = None) -> CertificateAuthority:
        """Load the CA from ``directory``; CaError names the file and the fix."""
        paths = CaPaths.of(directory)
        root = load_cert(paths.root_cert)
        device_ca = load_cert(paths.device_ca_cert)
        factory_ca = load_cert(paths.factory_ca_cert)
        device_key = load_key(paths.device_ca_key, passphrase)
        factory_key = load_key(paths.factory_ca_key, passphrase)
        for cert, key, path in (
            (device_ca, device_key, paths.device_ca_key),
            (factory_ca, factory_key, paths.factory_ca_key),
        ):
            if cert.public_key() != key.public_key():
                raise CaError(f"{path} does not belong to its certificate; the CA is mixed up")
            try:
                cert.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise CaError(f"{cert.subject.rfc4514_string()} is not issued by root.pem") from exc
        return cls(paths, root, device_ca, device_key, factory_ca, factory_key)

    # -- signing --

    def sign_device_certificate(
        self,
        public_key: DevicePublicKey,
        client_id: str,
        mac: str,
        validity: timedelta = DEFAULT_DEVICE_VALIDITY,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        """Operational certificate (device CA): CN=clientId, SAN URI urn:dev:mac, clientAuth."""
        return self._sign_device(
            self.device_ca, self._device_key, public_key, client_id, mac, validity, not_before
        )

    def sign_birth_certificate(
        self,
        public_key: DevicePublicKey,
        client_id: str,
        mac: str,
        validity: timedelta = DEFAULT_BIRTH_VALIDITY,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        """Birth certificate (factory CA); same profile as the operational one, long-lived."""
        return self._sign_device(
            self.factory_ca, self._factory_key, public_key, client_id, mac, validity, not_before
        )

    def _sign_device(
        self,
        issuer: x509.Certificate,
        issuer_key: ec.EllipticCurvePrivateKey,
        public_key: DevicePublicKey,
        client_id: str,
        mac: str,
        validity: timedelta,
        not_before: datetime | None,
    ) -> x509.Certificate:
        if client_id == SERVER_CLIENT_CN:
            # With use_identity_as_username the CN is the broker username.
            raise CaError(f"clientId {client_id!r} is reserved for the server")
        if validity <= timedelta(0):
            raise CaError("certificate validity must be positive")
        return leaf_certificate(
            subject=subject_name(client_id),
            public_key=public_key,
            issuer=issuer,
            issuer_key=issuer_key,
            san=[x509.UniformResourceIdentifier(mac_uri(mac))],
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            validity=validity,
            not_before=not_before,
        )

    # -- revocation --

    def build_crl(
        self,
        revoked: Iterable[tuple[int, datetime]],
        next_update: timedelta = timedelta(days=7),
        *,
        issuer: Literal["device", "factory"] = "device",
    ) -> bytes:
        """PEM CRL of ``(serial, revoked_at)`` pairs, signed by the device (or factory) CA.

        OpenSSL refuses every client once ``nextUpdate`` has passed ("CRL has expired"),
        so the caller must rebuild and reload it well before ``next_update`` runs out.
        OpenSSL (Mosquitto's X509_V_FLAG_CRL_CHECK) checks only the leaf, but needs the
        CRL of the leaf's issuer: a listener with a ``crlfile`` refuses every client whose
        issuer has no CRL in that file (several PEM CRLs may be concatenated in it).
        """
        ca, key = (
            (self.device_ca, self._device_key)
            if issuer == "device"
            else (self.factory_ca, self._factory_key)
        )
        return crl_pem(ca, key, revoked, next_update)

    def write_crl(self, pem: bytes) -> Path:
        """Atomically replace ``crl.pem`` (then SIGHUP Mosquitto to apply it)."""
        atomic_write(self.paths.crl, pem, CERT_FILE_MODE)
        return self.paths.crl

    # -- accessors --

    @property
    def device_ca_chain_pem(self) -> bytes:
        return certificate_pem(self.device_ca) + certificate_pem(self.root)

    @property
    def factory_ca_chain_pem(self) -> bytes:
        return certificate_pem(self.factory_ca) + certificate_pem(self.root)

    @property
    def root_pem(self) -> bytes:
        return certificate_pem(self.root)

    @property
    def broker_cert_path(self) -> Path:
        return self.paths.broker_cert

    @property
    def broker_key_path(self) -> Path:
        return self.paths.broker_key

    @property
    def server_client_cert_path(self) -> Path:
        return self.paths.server_client_cert

    @property
    def server_client_key_path(self) -> Path:
        return self.paths.server_client_key

    def describe(self) -> list[dict[str, str]]:
        """One row per CA certificate, for ``provision-server ca show``."""
        return [
            {
                "name": name,
                "subject": cert.subject.rfc4514_string(),
                "serial": serial_hex(cert),
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "fingerprint_sha256": fingerprint_sha256(cert),
            }
            for name, cert in (
                ("root", self.root),
                ("device-ca", self.device_ca),
                ("factory-ca", self.factory_ca),
            )
        ]

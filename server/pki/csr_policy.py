"""What the server accepts in a device's CSR, and the one thing it takes from it.

The CA copies nothing from a CSR but its public key: subject, SAN and every
extension of the issued certificate are set by the server. The checks here still
reject a CSR that *asks* for anything else, because such a request means a
confused or hostile device and deserves a clear error instead of a silent fix.

Key policy (decided): ECDSA P-256 (what our agent generates) or RSA 2048..4096
(for boards with an RSA-only secure element). Other curves (P-384, P-521),
Ed25519/Ed448 and small RSA keys are refused: one small set keeps every TLS
stack in the fleet and the broker's cipher configuration predictable.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from agent.protocol import MAX_PEM_CHARS, mac_uri, normalise_mac
from server.errors import CsrInvalid
from server.pki.ca import SERVER_CLIENT_CN, DevicePublicKey

_PEM_RE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE REQUEST-----\r?\n"
    rb"[A-Za-z0-9+/=\r\n]+"
    rb"-----END CERTIFICATE REQUEST-----\r?\n?"
)
_ANY_PEM_BEGIN: Final = b"-----BEGIN "
# PKCS#9 extensionRequest; cryptography has no named constant for it.
SIGNATURE_HASHES: Final = frozenset({"sha256", "sha384", "sha512"})
_EXTENSION_REQUEST: Final = x509.ObjectIdentifier("1.2.840.113549.1.9.14")


@dataclass(frozen=True)
class CheckedCsr:
    """The result of a passed check: only what a certificate may be built from."""

    public_key: DevicePublicKey
    fingerprint: str
    """Lowercase hex SHA-256 of the CSR's DER, to recognise an idempotent retry."""


@dataclass(frozen=True)
class CsrPolicy:
    """Limits for device CSRs; ``check`` raises CsrInvalid with the first violation."""

    max_pem_bytes: int = MAX_PEM_CHARS
    ec_curves: tuple[str, ...] = ("secp256r1",)
    rsa_min_bits: int = 2048
    rsa_max_bits: int = 4096

    def check(self, pem: str | bytes, *, client_id: str, mac: str) -> CheckedCsr:
        data = _single_pem(pem, self.max_pem_bytes)
        try:
            csr = x509.load_pem_x509_csr(data)
        except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
            raise CsrInvalid(f"CSR does not parse: {exc}") from None
        _check_signature_hash(csr)
        try:
            signature_valid = csr.is_signature_valid
        except (ValueError, UnsupportedAlgorithm) as exc:  # a mangled key fails only here
            raise CsrInvalid(f"CSR public key does not load: {exc}") from None
        if not signature_valid:
            raise CsrInvalid("CSR signature does not verify against its own public key")
        public_key = self._check_key(csr)
        _check_subject(csr, client_id)
        _check_attributes(csr)
        _check_extensions(csr, mac)
        der = csr.public_bytes(serialization.Encoding.DER)
        return CheckedCsr(public_key=public_key, fingerprint=hashlib.sha256(der).hexdigest())

    def _check_key(self, csr: x509.CertificateSigningRequest) -> DevicePublicKey:
        try:
            key = csr.public_key()
        except (ValueError, TypeError) as exc:
            raise CsrInvalid(f"CSR public key is not supported: {exc}") from None
        if isinstance(key, ec.EllipticCurvePublicKey):
            if key.curve.name not in self.ec_curves:
                raise CsrInvalid(
                    f"EC curve {key.curve.name} is not allowed (allowed: "
                    f"{', '.join(self.ec_curves)})"
                )
            return key
        if isinstance(key, rsa.RSAPublicKey):
            if not self.rsa_min_bits <= key.key_size <= self.rsa_max_bits:
                raise CsrInvalid(
                    f"RSA key of {key.key_size} bits is not allowed "
                    f"(allowed: {self.rsa_min_bits}..{self.rsa_max_bits})"
                )
            return key
        raise CsrInvalid(
            f"key type {type(key).__name__.lstrip('_')} is not allowed (use ECDSA P-256)"
        )


def _check_signature_hash(csr: x509.CertificateSigningRequest) -> None:
    """SHA-256/384/512 only: say so, rather than "does not verify", for SHA-1 or MD5.

    Ed25519 has no separate hash (None); the key check refuses it with its own message.
    """
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise CsrInvalid(f"CSR signature algorithm is not supported ({exc})") from None
    if algorithm is not None and algorithm.name not in SIGNATURE_HASHES:
        raise CsrInvalid(
            f"CSR is signed with {algorithm.name.upper()}; sign it with SHA-256 "
            "(SHA-384 and SHA-512 are accepted too)"
        )


def _single_pem(pem: str | bytes, limit: int) -> bytes:
    """Exactly one PEM CSR block and nothing else (surrounding whitespace allowed)."""
    if isinstance(pem, str):
        try:
            data = pem.encode("ascii")
        except UnicodeEncodeError:
            raise CsrInvalid("CSR must be ASCII PEM text") from None
    elif isinstance(pem, bytes):
        data = pem
    else:
        raise CsrInvalid("CSR must be PEM text")
    if len(data) > limit:
        raise CsrInvalid(f"CSR is {len(data)} bytes, the limit is {limit}")
    data = data.strip()
    if data.count(_ANY_PEM_BEGIN) != 1:
        found = data.count(_ANY_PEM_BEGIN)
        raise CsrInvalid(
            "CSR must be exactly one PEM block" + (f", found {found}" if found else ", found none")
        )
    data += b"\n"
    if not _PEM_RE.fullmatch(data):
        raise CsrInvalid(
            "CSR must be one '-----BEGIN CERTIFICATE REQUEST-----' PEM block with nothing "
            "before or after it"
        )
    return data


def _check_subject(csr: x509.CertificateSigningRequest, client_id: str) -> None:
    attrs = list(csr.subject)
    if len(attrs) != 1 or attrs[0].oid != NameOID.COMMON_NAME or len(csr.subject.rdns) != 1:
        raise CsrInvalid(
            f"CSR subject must be exactly CN={client_id}, got {csr.subject.rfc4514_string()!r}"
        )
    if attrs[0].value != client_id:
        raise CsrInvalid(f"CSR subject CN {attrs[0].value!r} is not this device ({client_id!r})")
    if client_id == SERVER_CLIENT_CN:
        raise CsrInvalid(f"clientId {client_id!r} is reserved for the server")


def _check_attributes(csr: x509.CertificateSigningRequest) -> None:
    for attribute in csr.attributes:
        if attribute.oid != _EXTENSION_REQUEST:
            name = getattr(attribute.oid, "_name", None) or attribute.oid.dotted_string
            raise CsrInvalid(f"CSR attribute {name} is not allowed")


def _check_extensions(csr: x509.CertificateSigningRequest, mac: str) -> None:
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CsrInvalid(f"CSR extensions do not parse: {exc}") from None
    try:
        expected = mac_uri(normalise_mac(mac))
    except ValueError as exc:
        raise CsrInvalid(str(exc)) from None
    for ext in extensions:
        if ext.oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            name = getattr(ext.oid, "_name", None) or ext.oid.dotted_string
            raise CsrInvalid(
                f"CSR requests extension {name}; the server sets extensions itself, "
                "a CSR may only carry subjectAltName"
            )
        assert isinstance(ext.value, x509.SubjectAlternativeName)
        names = list(ext.value)
        if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
            shown = ", ".join(f"{type(n).__name__}:{n.value}" for n in names)
            raise CsrInvalid(
                f"CSR subjectAltName must be exactly one URI {expected}, got [{shown}]"
            )
        if names[0].value != expected:
            raise CsrInvalid(
                f"CSR subjectAltName URI {names[0].value!r} does not match this device ({expected})"
            )

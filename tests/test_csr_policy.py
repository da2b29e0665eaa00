"""CSR policy: each way a CSR can be wrong gets its own, specific CsrInvalid."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID

from agent.protocol import mac_uri
from server.errors import CsrInvalid
from server.pki.ca import SERVER_CLIENT_CN
from server.pki.csr_policy import CsrPolicy

CLIENT_ID = "dev-0001"
MAC = "02:00:5E:10:00:01"
OTHER_MAC = "02:00:5E:10:00:02"
POLICY = CsrPolicy()

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@cache
def _key(kind: str) -> SigningKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    bits = int(kind.removeprefix("rsa"))
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _uri(mac: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(mac_uri(mac))


@dataclass(frozen=True)
class Spec:
    """How to build a test CSR; defaults give a good one."""

    key: str = "p256"
    subject: list[x509.NameAttribute[str]] = field(default_factory=lambda: [_cn(CLIENT_ID)])
    san: list[x509.GeneralName] | None = field(default_factory=lambda: [_uri(MAC)])
    extensions: list[x509.ExtensionType] = field(default_factory=list)
    challenge_password: bool = False


def _build(spec: Spec) -> bytes:
    key = _key(spec.key)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(spec.subject))
    if spec.san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(spec.san), critical=False)
    for ext in spec.extensions:
        builder = builder.add_extension(ext, critical=isinstance(ext, x509.BasicConstraints))
    if spec.challenge_password:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"secret")
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def _good() -> bytes:
    return _build(Spec())


def _tampered_signature() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(_good()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s value: still parses, no longer verifies
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


def _key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


GOOD: dict[str, Callable[[], bytes]] = {
    "p256": _good,
    "p256-without-san": lambda: _build(Spec(san=None)),
    "rsa2048": lambda: _build(Spec(key="rsa2048")),
}

BAD: dict[str, tuple[Callable[[], bytes | str], str]] = {
    "rsa1024": (lambda: _build(Spec(key="rsa1024")), "RSA key of 1024 bits is not allowed"),
    "p384": (lambda: _build(Spec(key="p384")), "EC curve secp384r1 is not allowed"),
    "ed25519": (lambda: _build(Spec(key="ed25519")), "key type .*Ed25519.* is not allowed"),
    "bad-signature": (_tampered_signature, "signature does not verify"),
    "cn-of-another-device": (
        lambda: _build(Spec(subject=[_cn("dev-0002")])),
        "CN 'dev-0002' is not this device",
    ),
    "extra-subject-attribute": (
        lambda: _build(
            Spec(subject=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil"), _cn(CLIENT_ID)])
        ),
        "subject must be exactly CN=dev-0001, got 'CN=dev-0001,O=Evil'",
    ),
    "two-common-names": (
        lambda: _build(Spec(subject=[_cn(CLIENT_ID), _cn(CLIENT_ID)])),
        "subject must be exactly CN=dev-0001",
    ),
    "empty-subject": (lambda: _build(Spec(subject=[])), "subject must be exactly CN=dev-0001"),
    "san-dns": (
        lambda: _build(Spec(san=[x509.DNSName("broker.example")])),
        "subjectAltName must be exactly one URI .*DNSName:broker.example",
    ),
    "san-extra-dns": (
        lambda: _build(
            Spec(san=[x509.UniformResourceIdentifier(mac_uri(MAC)), x509.DNSName("x.example")])
        ),
        "subjectAltName must be exactly one URI",
    ),
    "san-another-mac": (
        lambda: _build(Spec(san=[x509.UniformResourceIdentifier(mac_uri(OTHER_MAC))])),
        "URI 'urn:dev:mac:02005e100002' does not match this device",
    ),
    "basic-constraints-ca": (
        lambda: _build(Spec(extensions=[x509.BasicConstraints(ca=True, path_length=None)])),
        "requests extension basicConstraints",
    ),
    "key-usage": (
        lambda: _build(Spec(extensions=[_key_usage()])),
        "requests extension keyUsage",
    ),
    "extended-key-usage": (
        lambda: _build(Spec(extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])])),
        "requests extension extendedKeyUsage",
    ),
    "challenge-password-attribute": (
        lambda: _build(Spec(challenge_password=True)),
        "attribute challengePassword is not allowed",
    ),
    "garbage": (lambda: "hello, I am a CSR", "exactly one PEM block, found none"),
    "garbage-inside-pem": (
        lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "CSR does not parse",
    ),
    "der": (
        lambda: x509.load_pem_x509_csr(_good()).public_bytes(serialization.Encoding.DER),
        "exactly one PEM block, found none",
    ),
    "two-pems": (lambda: _good() + _good(), "exactly one PEM block, found 2"),
    "certificate-not-csr": (
        lambda: _good().replace(b"CERTIFICATE REQUEST", b"CERTIFICATE"),
        "one '-----BEGIN CERTIFICATE REQUEST-----' PEM block",
    ),
    "trailing-junk": (lambda: _good() + b"junk\n", "nothing before or after it"),
    "leading-junk": (lambda: b"junk\n" + _good(), "nothing before or after it"),
    "not-ascii": (lambda: _good().decode() + "\u00e9", "ASCII"),
    "oversized": (lambda: _good() + b"\n" * 8192, "the limit is 8192"),
}


@pytest.mark.parametrize("make", GOOD.values(), ids=GOOD.keys())
def test_good_csr_gives_only_its_public_key(make: Callable[[], bytes]) -> None:
    pem = make()
    checked = POLICY.check(pem, client_id=CLIENT_ID, mac=MAC)
    csr = x509.load_pem_x509_csr(pem)
    assert checked.public_key == csr.public_key()
    assert len(checked.fingerprint) == 64
    # str and bytes, and any MAC spelling, give the same answer.
    assert POLICY.check(pem.decode(), client_id=CLIENT_ID, mac=MAC.lower()) == checked


@pytest.mark.parametrize(("make", "message"), BAD.values(), ids=BAD.keys())
def test_bad_csr_is_refused_with_a_specific_message(
    make: Callable[[], bytes | str], message: str
) -> None:
    with pytest.raises(CsrInvalid, match=message):
        POLICY.check(make(), client_id=CLIENT_ID, mac=MAC)


def test_fingerprint_identifies_the_exact_csr() -> None:
    first = _good()
    again = POLICY.check(first, client_id=CLIENT_ID, mac=MAC).fingerprint
    assert POLICY.check(first, client_id=CLIENT_ID, mac=MAC).fingerprint == again
    # Same key and subject, new signature (ECDSA is randomised): a different request.
    assert POLICY.check(_good(), client_id=CLIENT_ID, mac=MAC).fingerprint != again


def test_server_identity_cannot_be_requested() -> None:
    pem = _build(Spec(subject=[_cn(SERVER_CLIENT_CN)]))
    with pytest.raises(CsrInvalid, match="reserved for the server"):
        POLICY.check(pem, client_id=SERVER_CLIENT_CN, mac=MAC)


def test_policy_limits_are_configurable() -> None:
    pem = _build(Spec(key="p384"))
    relaxed = CsrPolicy(ec_curves=("secp256r1", "secp384r1"))
    assert relaxed.check(pem, client_id=CLIENT_ID, mac=MAC).public_key is not None
    with pytest.raises(CsrInvalid, match="the limit is 100"):
        CsrPolicy(max_pem_bytes=100).check(_good(), client_id=CLIENT_ID, mac=MAC)


def test_sha1_signed_csr_is_refused_for_its_hash_not_as_a_bad_signature(tmp_path: Path) -> None:
    """cryptography cannot make a SHA-1 CSR any more; OpenSSL still can (an old device)."""
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    made = subprocess.run(
        ["openssl", "req", "-new", "-sha1", "-key", str(key_path), "-subj", f"/CN={CLIENT_ID}",
         "-addext", f"subjectAltName=URI:{mac_uri(MAC)}"],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    algorithm = x509.load_pem_x509_csr(made.stdout).signature_hash_algorithm
    assert algorithm is not None and algorithm.name == "sha1"
    with pytest.raises(CsrInvalid, match="signed with SHA1; sign it with SHA-256"):
        CsrPolicy().check(made.stdout, client_id=CLIENT_ID, mac=MAC)

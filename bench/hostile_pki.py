"""Hostile PKI material: CSRs and birth certificates that each break the policy in one way.

All of them are well-formed and correctly signed, so only the server's checks can refuse them;
the PEM helpers let the message factory mutate bytes and recognise a no-op mutation.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent import protocol
from agent.keystore import build_csr
from server.pki.ca import CertificateAuthority


@dataclass(frozen=True)
class Material:
    """What a provisioned device once sent, plus its unallocated neighbour's identity."""

    client_id: str
    mac: str
    birth_pem: str
    token: str  # the used token
    csr_pem: str  # the CSR the certificate was issued for
    serial: str  # the current certificate's serial
    unallocated_id: str
    unallocated_mac: str
    unallocated_birth_pem: str


def same_signed_content(candidate: str, original: str, label: str) -> bool:
    """True if ``candidate`` parses to the same signed bytes and signature as ``original``."""
    try:
        if label == "CERTIFICATE":
            a = x509.load_pem_x509_certificate(candidate.encode())
            b = x509.load_pem_x509_certificate(original.encode())
            return a.tbs_certificate_bytes == b.tbs_certificate_bytes and a.signature == b.signature
        c = x509.load_pem_x509_csr(candidate.encode())
        d = x509.load_pem_x509_csr(original.encode())
        return c.tbs_certrequest_bytes == d.tbs_certrequest_bytes and c.signature == d.signature
    except Exception:  # anything unparsable is a real mutation
        return False


def pem_der(pem: str) -> bytes:
    lines = [line for line in pem.strip().splitlines() if not line.startswith("-----")]
    return base64.b64decode("".join(lines))


def der_pem(der: bytes, label: str) -> str:
    text = base64.b64encode(der).decode()
    body = "\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def csr_variants(ca: CertificateAuthority, m: Material) -> list[str]:
    """Well-formed, correctly signed CSRs that break the policy in one way each."""
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(protocol.mac_uri(m.mac))])

    def signed(builder: x509.CertificateSigningRequestBuilder, with_key: Any = key) -> str:
        csr = builder.sign(with_key, hashes.SHA256())
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    cn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, m.client_id)])
    base = x509.CertificateSigningRequestBuilder().subject_name(cn)
    return [
        build_csr(key, m.unallocated_id, m.mac).decode(),  # another device's CN
        build_csr(key, m.client_id, m.unallocated_mac).decode(),  # another MAC
        signed(
            base.add_extension(san, False).add_extension(x509.BasicConstraints(True, None), True)
        ),
        signed(
            base.add_extension(san, False).add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False
            )
        ),
        signed(
            x509.CertificateSigningRequestBuilder().subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, m.client_id),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil"),
                    ]
                )
            )
        ),
        signed(base.add_extension(san, False), ec.generate_private_key(ec.SECP384R1())),
        signed(base, rsa.generate_private_key(65537, 1024)),  # noqa: S505 (the point)
        signed(
            base.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(protocol.mac_uri(m.mac)),
                        x509.DNSName("broker.example"),
                    ]
                ),
                False,
            )
        ),
        signed(base.add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, b"secret")),
        build_csr(key, "provisioning-server", m.mac).decode(),
        ca.root_pem.decode(),  # a certificate, not a CSR
        m.csr_pem + m.csr_pem,  # two blocks
        "junk\n" + m.csr_pem,
    ]


def cert_variants(ca: CertificateAuthority, m: Material) -> list[str]:
    """Birth certificates that are real X.509 but not this device's factory identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    long_ago = datetime.now(timezone.utc) - timedelta(days=2)
    return [
        m.unallocated_birth_pem,  # a genuine birth certificate of another device
        ca.sign_device_certificate(key.public_key(), m.client_id, m.mac).public_bytes(pem).decode(),
        ca.sign_birth_certificate(key.public_key(), m.client_id, m.unallocated_mac)
        .public_bytes(pem)
        .decode(),
        ca.sign_birth_certificate(  # expired yesterday
            key.public_key(), m.client_id, m.mac, timedelta(days=1), not_before=long_ago
        )
        .public_bytes(pem)
        .decode(),
        ca.root_pem.decode(),
    ]

"""Does the other side hold the key of a certificate? Key comparison and signature proofs."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa


def public_key_der(key: Any) -> bytes:
    """SubjectPublicKeyInfo DER: equal bytes, same key."""
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def cert_key_matches(cert_pem: object, public_key: Any) -> bool:
    """True if ``cert_pem`` (PEM text) certifies ``public_key``."""
    if not isinstance(cert_pem, str):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except (ValueError, x509.InvalidVersion):
        return False
    return public_key_der(cert.public_key()) == public_key_der(public_key)


def verify_proof(cert: x509.Certificate, message: bytes, signature_b64: str) -> bool:
    """True if ``signature_b64`` (base64 DER) is the certificate key's signature of ``message``.

    ECDSA with SHA-256 for EC keys, PKCS#1 v1.5 with SHA-256 for RSA keys (the two key
    types the CSR policy admits).
    """
    try:
        signature = base64.b64decode(signature_b64.encode("ascii"), validate=True)
    except (ValueError, binascii.Error):
        return False
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True

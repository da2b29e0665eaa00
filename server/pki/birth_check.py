"""Checks the birth certificate a device presents with its token request.

The broker already verified the TLS handshake with this certificate and made
its CN the username, and its ACL only lets that username publish on its own
request topic. We check the PEM the device sends is that same identity and
binds the MAC: issued by the factory CA, CN = clientId, SAN = the MAC's URN.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from agent.protocol import ErrorCode, mac_uri
from server.errors import MacMismatch, ServerError


class BirthCertificateInvalid(ServerError):
    """The presented birth certificate is not a valid factory identity for this device."""

    code = ErrorCode.BAD_REQUEST


def check_birth_certificate(
    pem: str, factory_ca: x509.Certificate, *, client_id: str, mac: str, now: datetime
) -> x509.Certificate:
    """The birth certificate in ``pem``; BirthCertificateInvalid or MacMismatch unless it is
    this device's (whether it is revoked is the caller's question: that needs the database).
    """
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is not a ValueError
        raise BirthCertificateInvalid("birth certificate is not a PEM certificate") from None
    try:
        cert.verify_directly_issued_by(factory_ca)
    except (ValueError, TypeError, InvalidSignature):
        raise BirthCertificateInvalid("birth certificate is not issued by the factory CA") from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise BirthCertificateInvalid("birth certificate is outside its validity period")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [client_id]:
        raise BirthCertificateInvalid(f"birth certificate is not for clientId {client_id!r}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BirthCertificateInvalid("birth certificate has no MAC in its SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [mac_uri(mac)]:
        raise MacMismatch("the MAC in the request does not match the birth certificate's SAN")
    return cert

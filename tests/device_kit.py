"""A simulated device's cryptographic side, for server tests: keys, birth cert, CSRs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.keystore import build_csr
from server.pki.ca import CertificateAuthority


@dataclass
class DeviceKit:
    client_id: str
    mac: str
    ca: CertificateAuthority
    birth_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def __post_init__(self) -> None:
        cert = self.ca.sign_birth_certificate(self.birth_key.public_key(), self.client_id, self.mac)
        self.birth_cert = cert
        self.birth_pem = cert.public_bytes(serialization.Encoding.PEM).decode()

    def csr(self) -> str:
        return build_csr(self.key, self.client_id, self.mac).decode()

    def token_request(self, mac: str | None = None) -> bytes:
        return json.dumps(
            {"v": 1, "op": "token", "mac": mac or self.mac, "cert": self.birth_pem}
        ).encode()

    def csr_request(self, token: str, csr: str | None = None) -> bytes:
        return json.dumps({"v": 1, "op": "csr", "token": token, "csr": csr or self.csr()}).encode()

    def new_key(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

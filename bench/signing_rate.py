"""The ceiling: CSR checks plus certificate signing alone, in-process, on one thread.

This is what the server does per device that no amount of network or database tuning
removes, so the end-to-end rate is reported as a fraction of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from agent.keystore import build_csr
from server.pki.ca import CertificateAuthority
from server.pki.csr_policy import CsrPolicy


@dataclass(frozen=True)
class SigningRate:
    count: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def prepared_csrs(count: int) -> list[tuple[str, str, bytes]]:
    """(clientId, MAC, CSR PEM) for ``count`` devices, made before the clock starts."""
    out: list[tuple[str, str, bytes]] = []
    for index in range(count):
        client_id = f"ceiling-{index:05d}"
        mac = f"02:cc:{index >> 24 & 0xFF:02x}:{index >> 16 & 0xFF:02x}:"
        mac += f"{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"
        key = ec.generate_private_key(ec.SECP256R1())
        out.append((client_id, mac, build_csr(key, client_id, mac)))
    return out


def measure_signing_rate(ca: CertificateAuthority, count: int) -> SigningRate:
    """Time ``CsrPolicy().check`` + ``sign_device_certificate`` over ``count`` CSRs."""
    csrs = prepared_csrs(count)
    policy = CsrPolicy()
    started = time.perf_counter()
    for client_id, mac, pem in csrs:
        checked = policy.check(pem, client_id=client_id, mac=mac)
        ca.sign_device_certificate(checked.public_key, client_id, mac)
    return SigningRate(count, time.perf_counter() - started)

"""A light simulated device: the agent's wire behaviour without its state directory.

Many of these run in one process, each on the calling thread with its own TLS sockets
(``bench.mqtt_wire``: no network thread per connection). Each does exactly what a real
board does on the wire, over real TLS with its own birth certificate: token request, CSR,
then an mTLS session on the operational listener with a retained ``online`` status.
The birth key and certificate are the factory's work, made when the benchmark registers
the device (before the clock); the operational key and the CSR are the device's own
field work and are made inside ``provision``, on the benchmark's clock.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import protocol
from agent.keystore import build_csr
from bench.mqtt_wire import MqttConnection, MqttError
from server.pki.ca import CertificateAuthority

RESPONSE_TIMEOUT_S: Final = 30.0
MAX_ATTEMPTS: Final = 5


class DeviceFailed(Exception):
    """A simulated device could not reach the online state."""


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@dataclass(frozen=True)
class DeviceIdentity:
    """What a board holds after the factory (birth key and certificate).

    ``operational_key`` is where ``provision`` writes the key it makes on the clock.
    ``csr_pem`` is a CSR for the in-process measure only (``measure_service_rate``,
    which has no device); its key is not kept.
    """

    client_id: str
    mac: str
    directory: Path
    birth_cert: Path
    birth_key: Path
    operational_key: Path
    birth_pem: str
    csr_pem: str

    @classmethod
    def create(
        cls, ca: CertificateAuthority, directory: Path, client_id: str, mac: str
    ) -> DeviceIdentity:
        directory.mkdir(mode=0o700, parents=True, exist_ok=False)
        birth_key = ec.generate_private_key(ec.SECP256R1())
        birth = ca.sign_birth_certificate(birth_key.public_key(), client_id, mac)
        birth_pem = birth.public_bytes(serialization.Encoding.PEM).decode()
        key = ec.generate_private_key(ec.SECP256R1())
        paths = (directory / "birth.pem", directory / "birth.key", directory / "op.key")
        paths[0].write_text(birth_pem)
        _write_private(paths[1], _key_pem(birth_key))
        return cls(
            client_id=client_id,
            mac=mac,
            directory=directory,
            birth_cert=paths[0],
            birth_key=paths[1],
            operational_key=paths[2],
            birth_pem=birth_pem,
            csr_pem=build_csr(key, client_id, mac).decode(),
        )


@dataclass(frozen=True)
class DeviceTiming:
    """Client-side monotonic timestamps of one device's provisioning."""

    client_id: str
    token_requested: float
    certificate_received: float
    online_acknowledged: float
    retries: int

    @property
    def to_certificate(self) -> float:
        return self.certificate_received - self.token_requested

    @property
    def to_online(self) -> float:
        return self.online_acknowledged - self.token_requested


def _tls_context(root_ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """The device's TLS client context: our root only, its own certificate and key."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root_ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def _connect(
    identity: DeviceIdentity, context: ssl.SSLContext, port: int, will: bool = False
) -> MqttConnection:
    connection = MqttConnection(context, port, RESPONSE_TIMEOUT_S)
    try:
        status = protocol.encode({"status": "offline"})
        connection.connect(
            identity.client_id,
            (protocol.status_topic(identity.client_id), status) if will else None,
        )
    except BaseException:
        connection.close()
        raise
    return connection


def _request(connection: MqttConnection, client_id: str, body: dict[str, Any]) -> dict[str, Any]:
    raw = connection.request(
        protocol.request_topic(client_id),
        json.dumps(body).encode(),
        protocol.response_topic(client_id),
    )
    answer = json.loads(raw)
    if not isinstance(answer, dict):
        raise DeviceFailed(f"{client_id!r}: the answer to {body.get('op')} is not an object")
    return answer


def provision(
    identity: DeviceIdentity, root_ca: Path, provisioning_port: int, operational_port: int
) -> DeviceTiming:
    """Token, CSR, operational session, retained online; returns the timings.

    Retryable errors (e.g. ``INTERNAL`` under load) are retried after the server's
    ``retryAfter`` or 0.2 s, as the agent would, up to MAX_ATTEMPTS per step.
    """
    client_id = identity.client_id
    retries = 0
    # Field work of the device itself, on the benchmark's clock (design: a real board
    # does it on its own CPU): a fresh operational key and its CSR.
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = identity.operational_key
    _write_private(key_path, _key_pem(key))
    csr_pem = build_csr(key, client_id, identity.mac).decode()
    try:
        context = _tls_context(root_ca, identity.birth_cert, identity.birth_key)
        birth = _connect(identity, context, provisioning_port)
        try:
            birth.subscribe(protocol.response_topic(client_id))
            token_body = {"v": 1, "op": "token", "mac": identity.mac, "cert": identity.birth_pem}
            started = time.monotonic()
            for _ in range(MAX_ATTEMPTS):
                answer = _request(birth, client_id, token_body)
                if answer.get("ok"):
                    csr = {"v": 1, "op": "csr", "token": answer["token"], "csr": csr_pem}
                    answer = _request(birth, client_id, csr)
                    if answer.get("ok"):
                        break
                retries += 1
                error = answer.get("error") or {}
                time.sleep(float(error.get("retryAfter") or 0.2))
            else:
                raise DeviceFailed(f"{client_id}: gave up: {answer}")
            certified = time.monotonic()
        finally:
            birth.close()
        cert_path = identity.directory / "op.pem"
        cert_path.write_text(answer["certificate"])
        context = _tls_context(root_ca, cert_path, key_path)
        session = _connect(identity, context, operational_port, will=True)
        try:
            topic = protocol.status_topic(client_id)
            pid = session.publish(topic, protocol.encode({"status": "online"}), retain=True)
            reason = session.wait_ack(pid)
            if reason >= 0x80:
                raise DeviceFailed(f"publish on {topic} refused: reason 0x{reason:02x}")
            online = time.monotonic()
        finally:
            session.close()
    except (MqttError, OSError) as exc:
        raise DeviceFailed(f"{client_id!r}: {exc}") from None
    return DeviceTiming(client_id, started, certified, online, retries)

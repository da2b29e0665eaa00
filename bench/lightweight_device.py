"""A light simulated device: the agent's wire behaviour without its state directory.

Many of these run in one process (one paho-mqtt network thread each while busy). Each
does exactly what a real board does on the wire, over real TLS with its own birth
certificate: token request, CSR, then an mTLS session on the operational listener with
a retained ``online`` status. The keys, birth certificate and CSR are made beforehand
(a real board makes them on its own CPU, not on the server's), so the timed part is
the network, broker, server and database work.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import protocol
from agent.keystore import build_csr
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
    """What a board holds after the factory, plus its operational key and CSR."""

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
        _write_private(paths[2], _key_pem(key))
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


class _Session:
    """One MQTT v5 connection over mTLS with blocking publish and correlated replies."""

    def __init__(self, client_id: str, root_ca: Path, cert: Path, key: Path) -> None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root_ca))
        context.load_cert_chain(str(cert), str(key))
        self.client_id = client_id
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(context)
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._acks: dict[int, Any] = {}
        self._replies: dict[bytes, dict[str, Any]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self._connack = rc
            self._cond.notify_all()

    def _on_ack(self, _c: mqtt.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._cond:
            self._acks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        self._on_ack(_c, _u, mid, rc, _p)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(correlation, bytes) and isinstance(body, dict):
            with self._cond:
                self._replies[correlation] = body
                self._cond.notify_all()

    def _wait(self, ready: Any, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, RESPONSE_TIMEOUT_S):
                raise DeviceFailed(f"{self.client_id!r}: timed out waiting for {what}")

    def connect(self, port: int) -> None:
        self.client.connect("127.0.0.1", port, keepalive=60)
        # As the server does (server/service/mqtt_transport.py): no Nagle delay on replies.
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self._wait(lambda: self._connack is not None, "CONNACK")
        if self._connack is not None and self._connack.is_failure:
            raise DeviceFailed(f"connection refused: {self._connack}")

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        self._wait(lambda: mid in self._acks, f"SUBACK {topic}")

    def publish_retained(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=True)
        self._wait(lambda: info.mid in self._acks, f"PUBACK {topic}")
        code = self._acks[info.mid]
        if isinstance(code, ReasonCode) and code.is_failure:
            raise DeviceFailed(f"publish on {topic} refused: {code}")

    def request(self, client_id: str, body: dict[str, Any]) -> dict[str, Any]:
        correlation = os.urandom(8)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = protocol.response_topic(client_id)
        props.CorrelationData = correlation
        self.client.publish(
            protocol.request_topic(client_id), json.dumps(body).encode(), qos=1, properties=props
        )
        self._wait(lambda: correlation in self._replies, f"the answer to {body.get('op')}")
        return self._replies.pop(correlation)

    def close(self) -> None:
        self.client.disconnect()  # reason 0: the broker discards the will
        self.client.loop_stop()
        # paho leaves its wake-up socket pair to __del__ (a ResourceWarning otherwise).
        self.client._reset_sockets()


def provision(
    identity: DeviceIdentity, root_ca: Path, provisioning_port: int, operational_port: int
) -> DeviceTiming:
    """Token, CSR, operational session, retained online; returns the timings.

    Retryable errors (e.g. ``INTERNAL`` under load) are retried after the server's
    ``retryAfter`` or 0.2 s, as the agent would, up to MAX_ATTEMPTS per step.
    """
    birth = _Session(identity.client_id, root_ca, identity.birth_cert, identity.birth_key)
    retries = 0
    started = time.monotonic()
    try:
        birth.connect(provisioning_port)
        birth.subscribe(protocol.response_topic(identity.client_id))
        token_body = {"v": 1, "op": "token", "mac": identity.mac, "cert": identity.birth_pem}
        started = time.monotonic()
        for _ in range(MAX_ATTEMPTS):
            answer = birth.request(identity.client_id, token_body)
            if answer.get("ok"):
                csr_body = {"v": 1, "op": "csr", "token": answer["token"], "csr": identity.csr_pem}
                answer = birth.request(identity.client_id, csr_body)
                if answer.get("ok"):
                    break
            retries += 1
            error = answer.get("error") or {}
            time.sleep(float(error.get("retryAfter") or 0.2))
        else:
            raise DeviceFailed(f"{identity.client_id}: gave up: {answer}")
        certified = time.monotonic()
    finally:
        birth.close()
    cert_path = identity.directory / "op.pem"
    cert_path.write_text(answer["certificate"])
    session = _Session(identity.client_id, root_ca, cert_path, identity.operational_key)
    session.client.will_set(
        protocol.status_topic(identity.client_id),
        protocol.encode({"status": "offline"}),
        qos=1,
        retain=True,
    )
    try:
        session.connect(operational_port)
        session.publish_retained(
            protocol.status_topic(identity.client_id), protocol.encode({"status": "online"})
        )
        online = time.monotonic()
    finally:
        session.close()
    return DeviceTiming(identity.client_id, started, certified, online, retries)

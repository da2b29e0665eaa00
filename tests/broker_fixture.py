"""A real Mosquitto per test plus small synchronous MQTT v5 helpers (paho-mqtt, mTLS).

``LocalBroker`` wraps ``harness.local_broker.start_local_broker``; ``MqttClient`` connects
with a client certificate and turns paho's callbacks into return values (CONNACK, PUBACK
and SUBACK reason codes), so a test can assert "Not authorized" (135) directly.
"""

from __future__ import annotations

import contextlib
import os
import queue
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from harness.local_broker import start_local_broker
from harness.local_services import MosquittoBroker
from server.broker.mosquitto_conf import BrokerLayout
from server.pki.ca import CertificateAuthority
from server.store.db import Database

TIMEOUT: Final = 3.0
NOT_AUTHORIZED: Final = 135
ACCEPTED: Final = (0, 16)
"""PUBACK codes of an accepted QoS 1 publish: Success, No matching subscribers."""


@dataclass(frozen=True)
class ClientFiles:
    """A client certificate (PEM, optionally with its issuer) and its key on disk."""

    client_id: str
    cert: Path
    key: Path


def write_identity(
    directory: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    chain: tuple[x509.Certificate, ...] = (),
) -> ClientFiles:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    pems = [c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain)]
    cert_path.write_bytes(b"".join(pems))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    common_name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    return ClientFiles(str(common_name), cert_path, key_path)


class LocalBroker:
    """Mosquitto with generated config on free loopback ports; files from ``database``."""

    def __init__(
        self,
        workdir: Path,
        ca: CertificateAuthority,
        database: Database | None,
        running: tuple[MosquittoBroker, BrokerLayout] | None = None,
    ) -> None:
        """Starts a broker, unless ``running`` gives one started otherwise."""
        self.workdir = workdir
        self.ca = ca
        self.database = database
        self.mosquitto: MosquittoBroker
        self.layout: BrokerLayout
        self.mosquitto, self.layout = running or start_local_broker(
            workdir / "broker", ca, database
        )
        self._identities = workdir / "identities"

    def log_text(self) -> str:
        return self.mosquitto.log_text(tail=8000)

    def stop(self) -> None:
        self.mosquitto.stop()

    # -- identities --

    def device(
        self,
        client_id: str,
        mac: str = "02:00:00:00:00:01",
        *,
        birth: bool = False,
        with_issuer: bool = False,
        validity: timedelta = timedelta(days=1),
    ) -> tuple[ClientFiles, x509.Certificate]:
        """A fresh key and an operational (or birth) certificate for ``client_id``."""
        key = ec.generate_private_key(ec.SECP256R1())
        sign = self.ca.sign_birth_certificate if birth else self.ca.sign_device_certificate
        cert = sign(key.public_key(), client_id, mac, validity)
        issuer = self.ca.factory_ca if birth else self.ca.device_ca
        name = f"{client_id}-{'birth' if birth else 'op'}-{uuid.uuid4().hex[:6]}"
        files = write_identity(
            self._identities, name, cert, key, chain=(issuer,) if with_issuer else ()
        )
        return files, cert

    def server_identity(self) -> ClientFiles:
        paths = self.ca.paths
        return ClientFiles("provisioning-server", paths.server_client_cert, paths.server_client_key)

    # -- clients --

    def client(self, files: ClientFiles, port: int, client_id: str | None = None) -> MqttClient:
        return MqttClient(files, port, self.ca.paths.root_cert, client_id or files.client_id)

    def mosquitto_pub(
        self, files: ClientFiles, port: int, topic: str, message: str = "hi"
    ) -> subprocess.CompletedProcess[str]:
        """The Mosquitto CLI as a second, non-Python client (QoS 1, MQTT v5)."""
        return subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1",
             "--cafile", str(self.ca.paths.root_cert), "--cert", str(files.cert),
             "--key", str(files.key), "-i", f"{files.client_id}-cli", "-t", topic, "-m", message],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip


class ConnectRefused(Exception):
    """The broker did not accept the connection (TLS failure or CONNACK error)."""


class MqttClient:
    """A connected MQTT v5 client over mTLS with blocking publish/subscribe helpers."""

    def __init__(
        self,
        files: ClientFiles,
        port: int,
        root_ca: Path,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        """Connects before returning; ``will`` is a retained QoS 1 (topic, payload).

        ``on_message`` replaces the default of queueing every message on ``messages``.
        """
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root_ca))
        context.load_cert_chain(str(files.cert), str(files.key))
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._settled = threading.Event()
        self._connack: ReasonCode | None = None
        self._acks: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._lock = threading.Lock()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.tls_set_context(context)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        deliver = on_message or self.messages.put
        client.on_message = lambda _c, _u, message: deliver(message)
        self.paho = client
        try:
            client.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self._close_socket()
            raise ConnectRefused(f"connect failed: {exc!r}") from None
        # TLS 1.3 reports a refused client certificate only after the handshake: wait for
        # CONNACK or for the connection to drop (no reconnect: reconnect_on_failure=False).
        client.loop_start()
        self._settled.wait(timeout)
        if not self.connected:
            self.close()
            self._close_socket()
            raise ConnectRefused(f"no successful CONNACK (got {self._connack})")

    def _close_socket(self) -> None:
        sock = self.paho.socket()
        if sock is not None:
            sock.close()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self._connack = rc
        (self._closed if rc.is_failure else self._connected).set()
        self._settled.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self._closed.set()
        self._settled.set()

    def _ack(self, mid: int, value: Any) -> None:
        with self._lock:
            event, box = self._acks.setdefault(mid, (threading.Event(), []))
        box.append(value)
        event.set()

    def _wait_ack(self, mid: int, timeout: float = TIMEOUT) -> Any:
        with self._lock:
            event, box = self._acks.setdefault(mid, (threading.Event(), []))
        if not event.wait(timeout):
            raise TimeoutError(f"no acknowledgement for message id {mid}")
        return box[0]

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self._ack(mid, rc)

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        self._ack(mid, codes)

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and not self._closed.is_set()

    def publish(
        self, topic: str, payload: bytes | str = b"x", properties: Properties | None = None
    ) -> int:
        """QoS 1 publish; returns the PUBACK reason code (0 = accepted, 135 = not authorized)."""
        return int(self.publish_reason(topic, payload, properties).value)

    def publish_reason(
        self,
        topic: str,
        payload: bytes | str,
        properties: Properties | None = None,
        *,
        retain: bool = False,
        timeout: float = TIMEOUT,
    ) -> ReasonCode:
        """QoS 1 publish; returns paho's PUBACK ``ReasonCode``."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain, properties=properties)
        rc: ReasonCode = self._wait_ack(info.mid, timeout)
        return rc

    def subscribe(self, topic_filter: str, timeout: float = TIMEOUT) -> int:
        """Returns the SUBACK reason code (0/1/2 = granted QoS, 135 = not authorized).

        The broker's provisioning_guard plugin refuses a filter the client may not read
        (Mosquitto's acl_file alone grants every subscription).
        """
        result, mid = self.paho.subscribe(topic_filter, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
        codes: list[ReasonCode] = self._wait_ack(mid, timeout)
        return int(codes[0].value)

    def next_message(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.paho.disconnect()
        self.paho.loop_stop()
        # paho leaves its wake-up socket pair to __del__, which a reference
        # cycle may run after the sockets' own finalizers (a ResourceWarning).
        self.paho._reset_sockets()

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def publish_properties(
    response_topic: str | None = None, correlation_data: bytes | None = None
) -> Properties:
    """MQTT v5 PUBLISH properties for request/response."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    return props


def message_property(message: mqtt.MQTTMessage, name: str) -> Any:
    """A property of a received message (None if absent); paho's Properties is untyped."""
    return getattr(message.properties, name, None)


def can_connect(broker: LocalBroker, files: ClientFiles, port: int) -> bool:
    try:
        broker.client(files, port).close()
    except ConnectRefused:
        return False
    return True

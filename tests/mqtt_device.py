"""A bare MQTT v5 device for server tests: TLS with a given cert, request/response."""

from __future__ import annotations

import json
import os
import queue
import ssl
import tempfile
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import protocol


def write_identity(
    directory: Path, cert_pem: str, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_text(cert_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


class MqttDevice:
    """Connects as one device; ``request`` publishes and waits for the correlated answer."""

    def __init__(
        self,
        client_id: str,
        port: int,
        root_ca: Path,
        cert_pem: str,
        key: ec.EllipticCurvePrivateKey,
        *,
        will: bytes | None = None,
    ) -> None:
        self.client_id = client_id
        self._dir = tempfile.TemporaryDirectory()
        cert_path, key_path = write_identity(Path(self._dir.name), cert_pem, key)
        context = ssl.create_default_context(cafile=str(root_ca))
        context.load_cert_chain(str(cert_path), str(key_path))
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(context)
        if will is not None:
            self.client.will_set(protocol.status_topic(client_id), will, qos=1, retain=True)
        self.responses: queue.Queue[tuple[bytes | None, dict[str, Any]]] = queue.Queue()
        self.connected = threading.Event()
        self.connect_reason: ReasonCode | None = None
        self.publish_results: dict[int, ReasonCode] = {}
        self._published = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.port = port

    def _on_connect(
        self, client: mqtt.Client, u: object, f: object, reason: ReasonCode, p: object
    ) -> None:
        self.connect_reason = reason
        if not reason.is_failure:
            self.connected.set()

    def _on_message(self, client: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = {"raw": bytes(message.payload)}
        self.responses.put((correlation, body))

    def _on_publish(
        self, client: mqtt.Client, u: object, mid: int, reason: ReasonCode, p: object
    ) -> None:
        with self._published:
            self.publish_results[mid] = reason
            self._published.notify_all()

    def connect(self, timeout: float = 10.0) -> MqttDevice:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.close()
            raise TimeoutError(f"{self.client_id} could not connect to port {self.port}")
        return self

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=1)
        if not done.wait(5):
            raise TimeoutError(f"no SUBACK for {topic}")

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation: bytes | None = None,
        response_topic: str | None = None,
        retain: bool = False,
        timeout: float = 5.0,
    ) -> ReasonCode:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            props.CorrelationData = correlation
        if response_topic is not None:
            props.ResponseTopic = response_topic
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        with self._published:
            if not self._published.wait_for(lambda: info.mid in self.publish_results, timeout):
                raise TimeoutError(f"no PUBACK for {topic}")
            return self.publish_results[info.mid]

    def request(self, payload: bytes, timeout: float = 10.0) -> dict[str, Any]:
        """Publish on the own request topic and wait for the matching response."""
        correlation = os.urandom(8)
        self.publish(
            protocol.request_topic(self.client_id),
            payload,
            correlation=correlation,
            response_topic=protocol.response_topic(self.client_id),
        )
        while True:
            got, body = self.responses.get(timeout=timeout)
            if got == correlation:
                return body

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # paho leaves its wake-up socket pair to __del__, which a reference
        # cycle may run after the sockets' own finalizers (a ResourceWarning).
        self.client._reset_sockets()
        self._dir.cleanup()

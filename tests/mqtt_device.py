"""A bare MQTT v5 device for server tests: TLS with a given cert, request/response."""

from __future__ import annotations

import json
import os
import queue
import tempfile
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.reasoncodes import ReasonCode

from agent import protocol
from tests.broker_fixture import (
    ClientFiles,
    ConnectRefused,
    MqttClient,
    message_property,
    publish_properties,
)


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
    """Connects as one device; ``request`` publishes and waits for the correlated answer.

    A thin layer over ``tests.broker_fixture.MqttClient``: it takes the certificate as
    PEM text, connects on ``connect()`` and keeps answers as (correlation, JSON body).
    """

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
        self.port = port
        self._root_ca = root_ca
        self._dir = tempfile.TemporaryDirectory()
        cert_path, key_path = write_identity(Path(self._dir.name), cert_pem, key)
        self._files = ClientFiles(client_id, cert_path, key_path)
        self._will = None if will is None else (protocol.status_topic(client_id), will)
        self.responses: queue.Queue[tuple[bytes | None, dict[str, Any]]] = queue.Queue()
        self._session: MqttClient | None = None

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        correlation = message_property(message, "CorrelationData")
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = {"raw": bytes(message.payload)}
        self.responses.put((correlation, body))

    @property
    def client(self) -> mqtt.Client:
        """The connected paho client, for tests that publish around the helpers."""
        if self._session is None:
            raise RuntimeError(f"{self.client_id} is not connected: call connect() first")
        return self._session.paho

    def connect(self, timeout: float = 10.0) -> MqttDevice:
        try:
            self._session = MqttClient(
                self._files,
                self.port,
                self._root_ca,
                self.client_id,
                will=self._will,
                on_message=self._on_message,
                timeout=timeout,
            )
        except ConnectRefused as exc:
            self._dir.cleanup()
            raise TimeoutError(f"{self.client_id} could not connect to port {self.port}") from exc
        return self

    def subscribe(self, topic: str) -> None:
        if self._session is None:
            raise RuntimeError(f"{self.client_id} is not connected: call connect() first")
        self._session.subscribe(topic, timeout=5.0)

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
        if self._session is None:
            raise RuntimeError(f"{self.client_id} is not connected: call connect() first")
        props = publish_properties(response_topic, correlation)
        return self._session.publish_reason(topic, payload, props, retain=retain, timeout=timeout)

    def send(self, topic: str, payload: bytes, *, correlation: bytes, response_topic: str) -> None:
        """A QoS 1 request that does not wait for its PUBACK: many can be in flight at once."""
        props = publish_properties(response_topic, correlation)
        self.client.publish(topic, payload, qos=1, properties=props)

    def request(
        self,
        payload: bytes,
        timeout: float = 10.0,
        *,
        topic: str | None = None,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        """Publish on ``topic`` (default: the own request topic) and wait for the answer."""
        correlation = os.urandom(8)
        self.publish(
            topic or protocol.request_topic(self.client_id),
            payload,
            correlation=correlation,
            response_topic=reply_to or protocol.response_topic(self.client_id),
        )
        while True:
            got, body = self.responses.get(timeout=timeout)
            if got == correlation:
                return body

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        self._dir.cleanup()

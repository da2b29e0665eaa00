"""One MQTT v5 connection over mutual TLS, with blocking request/response helpers.

A thin layer over paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) shared by
the provisioning client and the operational session. It owns its network
thread (a plain ``client.loop()`` loop, so paho never reconnects behind our
back: reconnecting is the caller's decision, with its own backoff), and it
turns TLS refusals into ``LinkError(cert_rejected=True)`` so the caller can
tell "my certificate is no longer accepted" from "the broker is down".

paho is imported here only, so a process that never connects never pays for it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import AgentError
from agent.protocol import ErrorCode
from agent.state import format_fields

log = logging.getLogger("agent.mqtt")

# TLS alerts that mean "the broker does not accept this client certificate"
# (TLS 1.3 reports them on the first read after the handshake, TLS 1.2 in it).
_CERT_REJECTED_MARKERS: Final = (
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_EXPIRED",
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_REQUIRED",
)


def is_cert_rejection(text: str) -> bool:
    upper = text.upper().replace(" ", "_")
    return any(marker in upper for marker in _CERT_REJECTED_MARKERS)


class LinkError(AgentError):
    """The connection failed or was lost; ``cert_rejected`` when TLS refused our certificate,
    ``refused`` when the broker answered an operation with a failure reason code."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str, *, cert_rejected: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.cert_rejected = cert_rejected
        self.refused = refused


@dataclass(frozen=True)
class TlsIdentity:
    """Client certificate + key files and the CA bundle that verifies the broker."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def tls_context(identity: TlsIdentity) -> ssl.SSLContext:
    """A client context that trusts ONLY our CA bundle and checks the broker's name."""
    # cafile= makes create_default_context skip the system store (less memory, less trust).
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(identity.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.load_cert_chain(str(identity.cert_file), str(identity.key_file))
    return context


def disable_nagle(client: mqtt.Client) -> None:
    """TCP_NODELAY on a connected client's socket (paho leaves Nagle's algorithm on).

    With Nagle, a small message written while an earlier segment waits for its delayed
    ACK sits up to 40 ms; a provisioning exchange has several (docs/performance.md).
    """
    sock = client.socket()
    if isinstance(sock, socket.socket):  # ssl.SSLSocket included
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


def _write_in_network_thread(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Nothing to do: the network thread's client.loop() sees the queued packet."""


class MqttLink:
    """A connected client; create, ``connect()``, use, ``close()``. Not reusable."""

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        tls: TlsIdentity,
        *,
        keepalive: int = 60,
        will: Will | None = None,
    ) -> None:
        self.client_id = client_id
        self.host = host
        self.port = port
        self._tls = tls
        self._keepalive = keepalive
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_log = self._on_log
        self._client.on_publish = self._on_publish
        # Only the network thread may touch the TLS socket. Without loop_start(), paho
        # writes a publish (or DISCONNECT) from the calling thread while our network
        # thread may be reading the same SSL object: OpenSSL does not allow that, and
        # the link dropped now and then (seen as a lost connection within a keepalive).
        # With a write callback registered, paho only queues the packet and wakes the
        # network thread through its socket pair; client.loop() then writes it.
        self._client.on_socket_register_write = _write_in_network_thread
        self._publish_reasons: dict[int, ReasonCode] = {}
        self._connack = threading.Event()
        self._connack_reason: ReasonCode | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[bytes, tuple[threading.Event, list[bytes]]] = {}
        self._handlers: dict[str, Callable[[bytes, bytes | None], None]] = {}
        self._last_error = ""
        self._cert_rejected = False
        self._thread: threading.Thread | None = None
        self._closing = False

    # --- paho callbacks (network thread) -------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connack_reason = reason
        self._connack.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if not self._closing:
            self._last_error = self._last_error or f"disconnected: {reason}"
        self._closed.set()
        self._connack.set()

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        # paho calls this before it marks the message published, so publish() finds it.
        with self._lock:
            self._publish_reasons[mid] = reason

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = text
            if is_cert_rejection(text):
                self._cert_rejected = True

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        if correlation is not None:
            with self._lock:
                waiter = self._pending.get(bytes(correlation))
            if waiter is not None:
                waiter[1].append(bytes(message.payload))
                waiter[0].set()
                return
        handler = self._handlers.get(message.topic)
        if handler is not None:
            handler(bytes(message.payload), correlation)
            return
        log.debug("%s", format_fields(event="unmatched_message", topic=message.topic))

    # --- lifecycle -----------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                rc = self._client.loop(timeout=0.2)
            except (OSError, ValueError) as exc:  # socket vanished under us
                self._last_error = self._last_error or str(exc)
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._closed.set()
                self._connack.set()

    def connect(self, timeout: float) -> None:
        """TCP + TLS + CONNECT/CONNACK; raises LinkError (``cert_rejected`` on TLS refusal)."""
        try:
            self._client.tls_set_context(tls_context(self._tls))
        except (OSError, ssl.SSLError) as exc:
            raise LinkError(f"cannot load TLS material: {exc}") from None
        self._client.connect_timeout = timeout
        try:
            self._client.connect(self.host, self.port, keepalive=self._keepalive, clean_start=True)
            disable_nagle(self._client)
        except ssl.SSLCertVerificationError as exc:
            raise LinkError(f"broker certificate not trusted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise LinkError(
                f"TLS handshake failed: {exc}", cert_rejected=is_cert_rejection(str(exc))
            ) from None
        except OSError as exc:
            raise LinkError(f"cannot reach {self.host}:{self.port}: {exc}") from None
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()
        if not self._connack.wait(timeout) or self._closed.is_set():
            self.close()
            raise LinkError(
                f"no CONNACK from {self.host}:{self.port}: {self._last_error or 'timeout'}",
                cert_rejected=self._cert_rejected,
            )
        reason = self._connack_reason
        if reason is not None and reason.is_failure:
            self.close()
            raise LinkError(f"broker refused the connection: {reason}")
        log.info(
            "%s",
            format_fields(
                event="connected", broker=f"{self.host}:{self.port}", client=self.client_id
            ),
        )

    @property
    def connected(self) -> bool:
        return self._connack.is_set() and not self._closed.is_set()

    @property
    def cert_rejected(self) -> bool:
        return self._cert_rejected

    @property
    def last_error(self) -> str:
        return self._last_error

    def wait_closed(self, timeout: float) -> bool:
        return self._closed.wait(timeout)

    def close(self, publish_before: Callable[[], None] | None = None) -> None:
        """Clean DISCONNECT (no last will) and stop the network thread; idempotent."""
        self._closing = True
        if publish_before is not None and self.connected:
            with contextlib.suppress(AgentError):
                publish_before()
        if self.connected:
            self._client.disconnect()
            self._closed.wait(2.0)
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        sock = self._client.socket()
        if sock is not None:  # a connect that never got its CONNACK leaves the socket open
            with contextlib.suppress(OSError):
                sock.close()

    # --- operations ----------------------------------------------------------

    def subscribe(self, topic: str, timeout: float) -> None:
        done = threading.Event()
        granted: list[Any] = []

        def on_subscribe(
            client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any
        ) -> None:
            granted.extend(reasons)
            done.set()

        self._client.on_subscribe = on_subscribe
        result, _mid = self._client.subscribe(topic, qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkError(f"subscribe to {topic} failed: {mqtt.error_string(result)}")
        if not done.wait(timeout):
            raise LinkError(f"no SUBACK for {topic}: {self._last_error or 'timeout'}")
        if any(getattr(r, "is_failure", False) for r in granted):
            raise LinkError(f"broker refused the subscription to {topic}: {granted}")

    def on_topic(self, topic: str, handler: Callable[[bytes, bytes | None], None]) -> None:
        """Call ``handler(payload, correlation)`` for unclaimed messages on ``topic``."""
        self._handlers[topic] = handler

    def publish(
        self,
        topic: str,
        payload: bytes,
        timeout: float,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """QoS 1 publish that returns once the broker acknowledged it."""
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(timeout)
        except RuntimeError as exc:
            raise LinkError(f"publish to {topic} failed: {exc}") from None
        if not info.is_published():
            raise LinkError(f"no PUBACK for {topic}: {self._last_error or 'timeout'}")
        with self._lock:
            reason = self._publish_reasons.pop(info.mid, None)
        if reason is not None and reason.is_failure:
            # e.g. 135 "Not authorized": the broker's ACL no longer lets this certificate in.
            raise LinkError(f"broker refused the publish to {topic}: {reason}", refused=True)

    def request(self, topic: str, payload: bytes, response_topic: str, timeout: float) -> bytes:
        """Publish with Response Topic + fresh Correlation Data; return the matching reply."""
        correlation = secrets.token_bytes(16)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        event = threading.Event()
        box: list[bytes] = []
        with self._lock:
            self._pending[correlation] = (event, box)
        try:
            self.publish(topic, payload, timeout, properties=props)
            if not event.wait(timeout) or not box:
                if self._closed.is_set():
                    raise LinkError(f"connection lost: {self._last_error}")
                raise LinkError(f"no response on {response_topic} within {timeout:g} s")
            return box[0]
        finally:
            with self._lock:
                self._pending.pop(correlation, None)

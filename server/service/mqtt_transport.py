"""``provision-server run``: the provisioning service on the broker.

One paho-mqtt v5 client with the server's own identity, shared subscriptions
(so several processes split the load), a bounded queue and worker threads.
Messages are acknowledged only after they are handled (paho's manual ack),
and SIGTERM unsubscribes first, then drains the queue: no accepted request
is lost.

A full queue loses nothing. CONNECT announces a Receive Maximum equal to the
queue's size (MQTT v5 flow control: the broker should keep the rest until we
acknowledge), and when the queue is full anyway (Mosquitto 2.0.11 was seen a
few messages past it) the network thread waits for room: back-pressure, the
socket is not read and the broker holds the messages. Only QoS 0 messages
(nothing the protocol sends) are dropped when the queue is full.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import uuid
from dataclasses import dataclass
from typing import Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import protocol
from agent.mqtt_link import disable_nagle
from agent.protocol import RequestChannel
from server.pki.ca import CertificateAuthority
from server.service.provisioning import ProvisioningService

log = logging.getLogger("provision.server")

QUEUE_LIMIT: Final = 10_000
FILTERS: Final = (
    protocol.shared(protocol.SERVER_REQUEST_FILTER),
    protocol.shared(protocol.SERVER_RENEW_FILTER),
    protocol.shared(protocol.SERVER_STATUS_FILTER),
)


@dataclass(frozen=True)
class BrokerEndpoint:
    host: str
    port: int
    tls_server_name: str = "localhost"


def server_tls_context(ca: CertificateAuthority) -> ssl.SSLContext:
    """TLS with the server's client identity, trusting only our root."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca.paths.root_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(ca.paths.server_client_cert), str(ca.paths.server_client_key))
    return context


def _subscribe_options(topic_filter: str) -> SubscribeOptions:
    """QoS 1; no retained statuses replayed when the server subscribes.

    Mosquitto 2.0.11 sends every retained ``devices/<id>/status`` to each server that
    subscribes, shared subscription or not: a database write per device of the fleet on
    every start (100,000 at fleet scale), more than the broker queues for one client.
    A retained ``online`` is no evidence that the device is alive now anyway. A device
    whose status changed while no server listened converges through its next heartbeat
    (``online`` every ``heartbeat_s``) or the offline sweep (docs/performance.md).

    Retain as published: a device publishes its first ``online`` of a connection
    retained and its heartbeats not, and the server writes every announcement.
    """
    if topic_filter == protocol.shared(protocol.SERVER_STATUS_FILTER):
        return SubscribeOptions(
            qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND, retainAsPublished=True
        )
    return SubscribeOptions(qos=1)


class ProvisioningServer:
    """Connects the ProvisioningService to the broker and runs it until stopped."""

    def __init__(
        self,
        service: ProvisioningService,
        ca: CertificateAuthority,
        endpoint: BrokerEndpoint,
        *,
        workers: int = 4,
        sweep_interval: float = 10.0,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        self.workers = workers
        self.sweep_interval = sweep_interval
        self.queue_limit = queue_limit
        # Each queue holds queue_limit, which is also the Receive Maximum (module doc).
        self._queue: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(queue_limit)
        # Status messages are applied by ONE worker, in arrival order: a device's
        # last will "offline" and its next session's "online" must not race.
        self._status_queue: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue(queue_limit)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._threads: list[threading.Thread] = []
        self._status_thread = threading.Thread(
            target=self._work, args=(self._status_queue,), name="status-worker", daemon=True
        )
        # Responses not yet acknowledged by the broker: stop() waits for them,
        # since paho drops queued QoS 1 messages beyond its in-flight window
        # once DISCONNECT goes out.
        self._unconfirmed: set[mqtt.MQTTMessageInfo] = set()
        self._unconfirmed_lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"provisioning-server-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        self.client.tls_set_context(server_tls_context(ca))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_inflight_messages_set(200)

    # --- paho callbacks (network thread) ---------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("event=broker-connect result=%s", reason)
            return
        disable_nagle(client)
        client.subscribe([(f, _subscribe_options(f)) for f in FILTERS])
        self._connected.set()
        log.info(
            "event=broker-connect result=ok broker=%s:%d", self.endpoint.host, self.endpoint.port
        )

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("event=broker-disconnect reason=%s (reconnecting)", reason)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        status = message.topic.startswith("devices/") and message.topic.endswith("/status")
        target = self._status_queue if status else self._queue
        if message.qos > 0:
            # Waiting here is back-pressure: unacknowledged, the message stays the
            # broker's until it is handled; dropping it would lose it for good (MQTT
            # redelivers only on a new connection of a persistent session).
            target.put(message)
            return
        try:
            target.put_nowait(message)
        except queue.Full:  # QoS 0 has no delivery guarantee to keep
            log.warning("event=overload dropped topic=%s qos=0", message.topic[:100])

    # --- workers -------------------------------------------------------------

    def _work(self, source: queue.Queue[mqtt.MQTTMessage | None]) -> None:
        while True:
            message = source.get()
            if message is None:
                return
            try:
                self._handle(message)
            finally:
                self.client.ack(message.mid, message.qos)

    def _handle(self, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        try:
            client_id = protocol.client_id_from_topic(topic)
        except protocol.ProtocolError:
            log.info("event=dropped reason=bad-topic topic=%r", topic[:100])
            return
        if topic == protocol.status_topic(client_id):
            self.service.handle_status(
                client_id, bytes(message.payload), announced=bool(message.retain)
            )
            return
        if topic == protocol.request_topic(client_id):
            reply_to, channel = protocol.response_topic(client_id), RequestChannel.PROVISIONING
        elif topic == protocol.renew_topic(client_id):
            reply_to, channel = protocol.renew_response_topic(client_id), RequestChannel.RENEWAL
        else:
            log.info("event=dropped reason=unknown-topic topic=%r", topic[:100])
            return
        props = message.properties
        wanted = getattr(props, "ResponseTopic", None) if props is not None else None
        # Only ever answer on the device's own response topic: a request must
        # not turn the server into a relay to somebody else's topic.
        if wanted is not None and wanted != reply_to:
            log.info("event=dropped reason=foreign-response-topic device=%s", client_id)
            return
        response = self.service.handle_request(client_id, bytes(message.payload), channel)
        out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if correlation is not None:
            out.CorrelationData = correlation
        info = self.client.publish(reply_to, response, qos=1, properties=out)
        with self._unconfirmed_lock:
            self._unconfirmed = {i for i in self._unconfirmed if not i.is_published()}
            self._unconfirmed.add(info)

    def _sweep(self) -> None:
        while not self._stop.wait(self.sweep_interval):
            try:
                self.service.sweep_silent_devices()
            except Exception as exc:  # the database may be down for a while
                log.warning("event=sweep result=failed reason=%r", str(exc)[:160])

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._work, args=(self._queue,), name=f"worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self._status_thread.start()
        sweeper = threading.Thread(target=self._sweep, name="sweeper", daemon=True)
        sweeper.start()
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.ReceiveMaximum = min(self.queue_limit, 65_535)
        self.client.connect_async(
            self.endpoint.host, self.endpoint.port, keepalive=30, properties=connect
        )
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def queue_depths(self) -> dict[str, int]:
        """Accepted messages not yet taken by a worker (read by the metrics)."""
        return {"requests": self._queue.qsize(), "status": self._status_queue.qsize()}

    def stop(self, timeout: float = 30.0) -> None:
        """Unsubscribe, finish every accepted message, then disconnect."""
        self._stop.set()
        if self._connected.is_set():
            self.client.unsubscribe(list(FILTERS))
        for _ in self._threads:
            self._queue.put(None)
        threads = list(self._threads)
        if self._status_thread.is_alive():
            self._status_queue.put(None)
            threads.append(self._status_thread)
        for thread in threads:
            thread.join(timeout)
        with self._unconfirmed_lock:
            unconfirmed = list(self._unconfirmed)
        for info in unconfirmed:
            if self._connected.is_set() and not info.is_published():
                info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes its internal wake-up socket pair only in __del__, which a
        # reference cycle can delay past the sockets' own finalizers.
        self.client._reset_sockets()
        log.info("event=stopped")

"""The agent's MQTT link on a real broker: what the board's connection looks like on the wire."""

from __future__ import annotations

import socket

from agent.mqtt_link import MqttLink, TlsIdentity
from tests.broker_fixture import LocalBroker


def test_the_link_turns_nagle_off(broker: LocalBroker) -> None:
    """Small request/response messages must not wait for a delayed ACK (docs/performance.md)."""
    files, _ = broker.device("nodelay-1")
    tls = TlsIdentity(files.cert, files.key, broker.ca.paths.root_cert)
    link = MqttLink(files.client_id, "127.0.0.1", broker.layout.operational_port, tls)
    link.connect(timeout=10)
    try:
        sock = link._client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        link.close()

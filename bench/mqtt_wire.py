"""A minimal blocking MQTT v5 client over TLS: the packets a light device sends, no more.

The benchmark runs hundreds of simulated devices in one Python process, on the same
cores as the broker, the database and the servers it measures; whatever a simulated
device costs is CPU the system under test does not get. paho-mqtt spends a network
thread per connection (two per device) and a general packet machinery; a device's
exchange is short and strictly sequential, so this client does it on the calling thread
with one TLS socket: CONNECT (with a last will), SUBSCRIBE, QoS 1 PUBLISH with a response
topic and correlation data, PUBACK of what it receives, DISCONNECT. On the wire it is the
same protocol the agent speaks (real TLS with the device's certificate, MQTT v5, QoS 1);
what it does not implement (QoS 2, topic aliases, reconnects, keepalive pings within a
session that lasts under a minute) no light device needs.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Final

CONNECT: Final = 0x10
CONNACK: Final = 0x20
PUBLISH: Final = 0x30
PUBACK: Final = 0x40
SUBSCRIBE: Final = 0x82
SUBACK: Final = 0x90
DISCONNECT: Final = 0xE0
RESPONSE_TOPIC: Final = 0x08
CORRELATION_DATA: Final = 0x09

# MQTT v5 property identifiers by the type of their value (spec 2.2.2.2).
_BYTE: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_TWO: Final = frozenset({0x13, 0x21, 0x22, 0x23})
_FOUR: Final = frozenset({0x02, 0x11, 0x18, 0x27})
_VARINT: Final = frozenset({0x0B})
_STRING: Final = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_BINARY: Final = frozenset({0x09, 0x16})
_PAIR: Final = frozenset({0x26})


class MqttError(Exception):
    """The broker refused something, broke the protocol, or did not answer in time."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = value >> 7, value & 0x7F
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _str(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def parse_properties(data: bytes, pos: int) -> tuple[dict[int, object], int]:
    """The property block at ``pos``: {identifier: value} (last wins) and the end."""
    length, pos = read_varint(data, pos)
    end, props = pos + length, {}
    while pos < end:
        ident = data[pos]
        pos += 1
        value: object
        if ident in _BYTE:
            value, pos = data[pos], pos + 1
        elif ident in _TWO:
            value, pos = struct.unpack_from("!H", data, pos)[0], pos + 2
        elif ident in _FOUR:
            value, pos = struct.unpack_from("!I", data, pos)[0], pos + 4
        elif ident in _VARINT:
            value, pos = read_varint(data, pos)
        elif ident in _STRING or ident in _BINARY:
            size = struct.unpack_from("!H", data, pos)[0]
            value, pos = data[pos + 2 : pos + 2 + size], pos + 2 + size
        elif ident in _PAIR:
            for _ in range(2):
                pos += 2 + struct.unpack_from("!H", data, pos)[0]
            continue
        else:
            raise MqttError(f"unknown MQTT property 0x{ident:02x}")
        props[ident] = value
    return props, end


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    properties: dict[int, object]


class MqttConnection:
    """One MQTT v5 session over TLS, driven by the calling thread."""

    def __init__(self, context: ssl.SSLContext, port: int, timeout: float) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        # As the server does: no Nagle delay on small request/response packets.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise
        self._buffer = b""
        self._next_id = 0
        self.messages: list[Message] = []
        """PUBLISHes received (and acknowledged) while waiting for something else."""
        self.acks: dict[int, int] = {}
        """Packet id -> reason code of PUBACK/SUBACK received and not yet asked for."""

    # --- sending -----------------------------------------------------------------

    def connect(self, client_id: str, will: tuple[str, bytes] | None = None) -> None:
        """CONNECT (clean start, keepalive 60 s, QoS 1 retained will) and wait for CONNACK."""
        flags = 0x02
        payload = _str(client_id)
        if will is not None:
            flags |= 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain
            payload += varint(0) + _str(will[0]) + _str(will[1])
        header = _str("MQTT") + bytes([5, flags]) + struct.pack("!H", 60) + varint(0)
        self.sock.sendall(_packet(CONNECT, header + payload))
        first, body = self._read_packet()
        if first & 0xF0 != CONNACK or len(body) < 2:
            raise MqttError(f"expected CONNACK, got packet 0x{first:02x}")
        if body[1] >= 0x80:
            raise MqttError(f"connection refused: reason 0x{body[1]:02x}")

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def subscribe(self, topic: str) -> None:
        """SUBSCRIBE at QoS 1 and wait for a successful SUBACK."""
        pid = self._packet_id()
        body = struct.pack("!H", pid) + varint(0) + _str(topic) + b"\x01"
        self.sock.sendall(_packet(SUBSCRIBE, body))
        reason = self.wait_ack(pid)
        if reason >= 0x80:
            raise MqttError(f"subscription to {topic} refused: reason 0x{reason:02x}")

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int:
        """A QoS 1 PUBLISH; returns its packet id (``wait_ack`` waits for its PUBACK)."""
        pid = self._packet_id()
        props = b""
        if response_topic is not None:
            props += bytes([RESPONSE_TOPIC]) + _str(response_topic)
        if correlation is not None:
            props += bytes([CORRELATION_DATA]) + _str(correlation)
        body = _str(topic) + struct.pack("!H", pid) + varint(len(props)) + props + payload
        self.sock.sendall(_packet(PUBLISH | 0x02 | (0x01 if retain else 0), body))
        return pid

    def request(self, topic: str, payload: bytes, response_topic: str) -> bytes:
        """Publish with a fresh correlation and wait for the answer that carries it."""
        correlation = os.urandom(8)
        self.publish(topic, payload, response_topic=response_topic, correlation=correlation)
        while True:
            for index, message in enumerate(self.messages):
                if message.properties.get(CORRELATION_DATA) == correlation:
                    return self.messages.pop(index).payload
            self._receive_one()

    def wait_ack(self, pid: int) -> int:
        """The reason code of the PUBACK or SUBACK for ``pid`` (0 = success)."""
        while pid not in self.acks:
            self._receive_one()
        return self.acks.pop(pid)

    def close(self) -> None:
        """DISCONNECT with reason 0 (the broker discards the will), then close."""
        try:
            self.sock.sendall(bytes([DISCONNECT, 0]))
        except OSError:
            pass
        finally:
            self.sock.close()

    # --- receiving ---------------------------------------------------------------

    def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise MqttError("timed out waiting for the broker") from None
            if not chunk:
                raise MqttError("the broker closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _read_packet(self) -> tuple[int, bytes]:
        first = self._read_exactly(1)[0]
        length = shift = 0
        while True:
            byte = self._read_exactly(1)[0]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        return first, self._read_exactly(length)

    def _receive_one(self) -> None:
        first, body = self._read_packet()
        kind = first & 0xF0
        if kind == PUBLISH:
            qos = (first >> 1) & 0x03
            size = struct.unpack_from("!H", body)[0]
            topic, pos = body[2 : 2 + size].decode(), 2 + size
            pid = None
            if qos:
                pid, pos = struct.unpack_from("!H", body, pos)[0], pos + 2
            props, pos = parse_properties(body, pos)
            self.messages.append(Message(topic, body[pos:], props))
            if pid is not None:
                self.sock.sendall(_packet(PUBACK, struct.pack("!H", pid)))
        elif kind in (PUBACK, SUBACK):
            pid = struct.unpack_from("!H", body)[0]
            if kind == PUBACK:
                self.acks[pid] = body[2] if len(body) > 2 else 0
            else:
                _, pos = parse_properties(body, 2)
                self.acks[pid] = body[pos] if pos < len(body) else 0x80
        elif kind == DISCONNECT:
            raise MqttError(f"the broker disconnected: reason 0x{body[0] if body else 0:02x}")
        else:
            raise MqttError(f"unexpected packet 0x{first:02x}")

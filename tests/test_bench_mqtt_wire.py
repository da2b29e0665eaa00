"""The benchmark's minimal MQTT v5 codec (the whole exchange runs in tests/test_bench_smoke.py)."""

from __future__ import annotations

import struct

import pytest

from bench.mqtt_wire import (
    CORRELATION_DATA,
    RESPONSE_TOPIC,
    MqttError,
    parse_properties,
    read_varint,
    varint,
)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 268_435_455])
def test_variable_byte_integers_have_the_spec_lengths(value: int) -> None:
    encoded = varint(value)
    assert len(encoded) == 1 + (value > 127) + (value > 16_383) + (value > 2_097_151)
    assert read_varint(b"x" + encoded + b"rest", 1) == (value, 1 + len(encoded))


def test_properties_of_every_kind_are_skipped_or_read() -> None:
    def s(text: bytes) -> bytes:
        return struct.pack("!H", len(text)) + text

    block = (
        bytes([0x24, 1])  # maximum QoS (byte)
        + bytes([0x21]) + struct.pack("!H", 20)  # receive maximum (two bytes)
        + bytes([0x27]) + struct.pack("!I", 1 << 20)  # maximum packet size (four bytes)
        + bytes([0x0B, 0x81, 0x01])  # subscription identifier (varint 129)
        + bytes([0x26]) + s(b"k") + s(b"v")  # user property (pair): skipped
        + bytes([RESPONSE_TOPIC]) + s(b"provisioning/d/response")
        + bytes([CORRELATION_DATA]) + s(b"\x00\x01\xff")
    )  # fmt: skip
    props, end = parse_properties(varint(len(block)) + block + b"payload", 0)
    assert end == 1 + len(block)
    assert props == {
        0x24: 1, 0x21: 20, 0x27: 1 << 20, 0x0B: 129,
        RESPONSE_TOPIC: b"provisioning/d/response", CORRELATION_DATA: b"\x00\x01\xff",
    }  # fmt: skip


def test_an_unknown_property_is_a_protocol_error() -> None:
    with pytest.raises(MqttError, match="0x7f"):
        parse_properties(b"\x02\x7f\x00", 0)

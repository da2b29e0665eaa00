"""Frames of the factory serial protocol: SLIP framing, header, CRC-32, chunk headers.

A frame on the wire is ``END body END`` with SLIP escaping; the leading END
flushes whatever line noise came before. The body is::

    version u8 | type u8 | flags u8 | seq u16 | session u32 | length u16 | payload | crc32 u32

all big-endian, the CRC (zlib.crc32) covering header and payload. The decoder
is incremental and never raises: garbage, runts and oversize runs are counted
and dropped, bad CRCs and foreign versions come out as ``BadFrame`` so the
link can ask for a resend or report the mismatch.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

SERIAL_PROTOCOL_VERSION: Final = 1

END: Final = 0xC0
ESC: Final = 0xDB
ESC_END: Final = 0xDC
ESC_ESC: Final = 0xDD

HEADER: Final = struct.Struct(">BBBHIH")
CRC: Final = struct.Struct(">I")
MAX_FRAME_PAYLOAD: Final = 1024
MIN_BODY: Final = HEADER.size + CRC.size
MAX_BODY: Final = HEADER.size + MAX_FRAME_PAYLOAD + CRC.size

# Request/response objects are split into chunks, each one frame.
CHUNK: Final = struct.Struct(">HHHHII")  # request id, command, index, count, total, crc32
MAX_CHUNK_DATA: Final = MAX_FRAME_PAYLOAD - CHUNK.size
# ACK (device -> station, for a request chunk) and PULL (station -> device, for a response chunk).
CHUNK_REF: Final = struct.Struct(">HH")  # request id, chunk index
HELLO_ACK_INFO: Final = struct.Struct(">HI")  # max frame payload, max object size

FLAG_RESEND: Final = 0x01  # informational: this frame is a retransmission

_ESCAPED: Final = bytes([ESC, ESC_ESC])
_ESCAPED_END: Final = bytes([ESC, ESC_END])
_BAD_ESCAPE: Final = re.compile(rb"\xdb(?![\xdc\xdd])")


class FrameType(IntEnum):
    HELLO = 1  # station -> device: open a session (payload empty)
    HELLO_ACK = 2  # device -> station: session open (HELLO_ACK_INFO)
    REQUEST = 3  # station -> device: one chunk of a request (CHUNK + data)
    RESPONSE = 4  # device -> station: one chunk of a response (CHUNK + data)
    ACK = 5  # device -> station: request chunk received (CHUNK_REF)
    NACK = 6  # device -> station: a frame failed its CRC, send it again
    ERROR = 7  # device -> station: code + message (see encode_error)
    PULL = 8  # station -> device: send response chunk N (acknowledges N-1)


@dataclass(frozen=True)
class Frame:
    type: FrameType
    seq: int
    session: int
    payload: bytes = b""
    flags: int = 0
    version: int = SERIAL_PROTOCOL_VERSION


@dataclass(frozen=True)
class BadFrame:
    """A delimited frame that failed a check; header fields are untrusted unless kind=version."""

    kind: str  # "crc", "version", "length", "type"
    version: int = 0
    seq: int = 0
    session: int = 0


@dataclass
class DecoderStats:
    frames: int = 0
    crc_errors: int = 0
    bad_version: int = 0
    malformed: int = 0  # bad escape, length mismatch, unknown type
    oversize: int = 0
    garbage_bytes: int = 0  # bytes dropped outside any valid frame


@dataclass
class LinkStats:
    """Counters of one serial link, shared by its host (link) and board halves."""

    frames_sent: int = 0
    resends: int = 0
    nacks_sent: int = 0
    nacks_received: int = 0
    duplicates: int = 0  # frames answered again from the cache (board)
    stale: int = 0  # valid frames ignored: other session, old sequence, unexpected type
    requests_served: int = 0  # handler calls (board)
    decoder: DecoderStats = field(default_factory=DecoderStats)


@dataclass(frozen=True)
class Chunk:
    request_id: int
    command: int
    index: int
    count: int
    total: int
    crc: int
    data: bytes


def encode_frame(frame: Frame) -> bytes:
    """SLIP-encode a frame, delimited by END on both sides."""
    if len(frame.payload) > MAX_FRAME_PAYLOAD:
        raise ValueError(f"frame payload is {len(frame.payload)} bytes, max {MAX_FRAME_PAYLOAD}")
    body = HEADER.pack(
        frame.version, frame.type, frame.flags, frame.seq, frame.session, len(frame.payload)
    )
    body += frame.payload
    body += CRC.pack(zlib.crc32(body))
    escaped = body.replace(bytes([ESC]), _ESCAPED).replace(bytes([END]), _ESCAPED_END)
    return bytes([END]) + escaped + bytes([END])


def split_object(request_id: int, command: int, data: bytes) -> list[Chunk]:
    """Cut an object into chunks that each fit one frame (an empty object is one chunk)."""
    crc = zlib.crc32(data)
    pieces = [data[i : i + MAX_CHUNK_DATA] for i in range(0, len(data), MAX_CHUNK_DATA)] or [b""]
    if len(pieces) > 0xFFFF:
        raise ValueError(f"object of {len(data)} bytes needs too many chunks")
    return [
        Chunk(request_id, command, i, len(pieces), len(data), crc, piece)
        for i, piece in enumerate(pieces)
    ]


def encode_chunk(chunk: Chunk) -> bytes:
    head = CHUNK.pack(
        chunk.request_id, chunk.command, chunk.index, chunk.count, chunk.total, chunk.crc
    )
    return head + chunk.data


def decode_chunk(payload: bytes) -> Chunk | None:
    """Parse a chunk payload; None if it is inconsistent in itself."""
    if len(payload) < CHUNK.size:
        return None
    request_id, command, index, count, total, crc = CHUNK.unpack_from(payload)
    if count == 0 or index >= count:
        return None
    return Chunk(request_id, command, index, count, total, crc, payload[CHUNK.size :])


def encode_error(code: str, message: str) -> bytes:
    code_bytes = code.encode("ascii", "replace")[:64]
    room = MAX_FRAME_PAYLOAD - 1 - len(code_bytes)
    text = message.encode("utf-8")[:room].decode("utf-8", "ignore").encode("utf-8")
    return bytes([len(code_bytes)]) + code_bytes + text


def decode_error(payload: bytes) -> tuple[str, str]:
    if not payload:
        return "INTERNAL", "empty error frame"
    size = payload[0]
    code = payload[1 : 1 + size].decode("ascii", "replace")
    return code, payload[1 + size :].decode("utf-8", "replace")


class ChunkAssembler:
    """Reassembles one object from in-order chunks, checking that they belong together."""

    def __init__(self, first: Chunk, max_object: int) -> None:
        if first.index != 0:
            raise ValueError(f"transfer starts at chunk {first.index}, not 0")
        if first.total > max_object:
            raise OverflowError(f"object of {first.total} bytes exceeds the {max_object} limit")
        if first.count != max(1, -(-first.total // MAX_CHUNK_DATA)):
            raise ValueError(f"{first.count} chunks cannot carry {first.total} bytes")
        self.first = first
        self.next_index = 0
        self._parts: list[bytes] = []
        self.received = 0
        self.add(first)

    @property
    def complete(self) -> bool:
        return self.next_index == self.first.count

    def add(self, chunk: Chunk) -> None:
        f = self.first
        if (chunk.request_id, chunk.command, chunk.count, chunk.total, chunk.crc) != (
            f.request_id,
            f.command,
            f.count,
            f.total,
            f.crc,
        ):
            raise ValueError("chunk belongs to a different object")
        if chunk.index != self.next_index:
            raise ValueError(f"chunk {chunk.index} arrived, expected {self.next_index}")
        if self.received + len(chunk.data) > f.total:
            raise ValueError("chunks carry more bytes than the announced total")
        self._parts.append(chunk.data)
        self.received += len(chunk.data)
        self.next_index += 1

    def result(self) -> bytes:
        data = b"".join(self._parts)
        if len(data) != self.first.total or zlib.crc32(data) != self.first.crc:
            raise ValueError("reassembled object fails its length or CRC check")
        return data


@dataclass
class FrameDecoder:
    """Incremental SLIP decoder; ``feed`` returns the frames (and rejects) completed so far."""

    stats: DecoderStats = field(default_factory=DecoderStats)
    _pending: bytearray = field(default_factory=bytearray)
    _discarding: bool = False

    def reset(self) -> None:
        self.stats.garbage_bytes += len(self._pending)
        self._pending.clear()
        self._discarding = False

    def feed(self, data: bytes) -> list[Frame | BadFrame]:
        out: list[Frame | BadFrame] = []
        pieces = data.split(bytes([END]))
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if self._discarding:
                self.stats.garbage_bytes += len(piece)
                if not last:
                    self._discarding = False
                continue
            self._pending += piece
            if last:
                # Escaped body is at most twice the raw size; beyond that it is noise.
                if len(self._pending) > 2 * MAX_BODY:
                    self.stats.oversize += 1
                    self.stats.garbage_bytes += len(self._pending)
                    self._pending.clear()
                    self._discarding = True
                continue
            raw = bytes(self._pending)
            self._pending.clear()
            if raw:
                item = self._decode_body(raw)
                if item is not None:
                    out.append(item)
        return out

    def _decode_body(self, raw: bytes) -> Frame | BadFrame | None:
        if _BAD_ESCAPE.search(raw):
            self.stats.malformed += 1
            self.stats.garbage_bytes += len(raw)
            return BadFrame("crc")
        body = raw.replace(_ESCAPED_END, bytes([END])).replace(_ESCAPED, bytes([ESC]))
        if len(body) < MIN_BODY:
            self.stats.garbage_bytes += len(raw)  # a runt: noise or a cut-off frame
            return None
        if len(body) > MAX_BODY:
            self.stats.oversize += 1
            self.stats.garbage_bytes += len(raw)
            return None
        (crc,) = CRC.unpack_from(body, len(body) - CRC.size)
        if zlib.crc32(body[: -CRC.size]) != crc:
            self.stats.crc_errors += 1
            self.stats.garbage_bytes += len(raw)
            return BadFrame("crc")
        version, ftype, flags, seq, session, length = HEADER.unpack_from(body)
        if version != SERIAL_PROTOCOL_VERSION:
            self.stats.bad_version += 1
            return BadFrame("version", version, seq, session)
        payload = body[HEADER.size : -CRC.size]
        if length != len(payload):
            self.stats.malformed += 1
            return BadFrame("length", version, seq, session)
        try:
            frame_type = FrameType(ftype)
        except ValueError:
            self.stats.malformed += 1
            return BadFrame("type", version, seq, session)
        self.stats.frames += 1
        return Frame(frame_type, seq, session, payload, flags, version)

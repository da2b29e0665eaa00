"""The factory serial link: sessions, chunked requests, ACK/NACK, retries (esptool-style).

One class, two roles on the same framing (see ``agent.factory.frames``):

* station (host): ``connect()`` opens a session with HELLO, ``request()`` sends
  a command and returns the device's answer. The station drives everything:
  every frame it sends is answered, and it alone times out and resends.
* board (device): ``serve(handler)`` answers frames with an
  ``agent.factory.board.SerialBoard``, which has no timers (see there).

Request flow: REQUEST chunk i -> ACK i, ..., last chunk -> ACK, then the
handler runs and the board sends RESPONSE chunk 0 unsolicited (or ERROR); the
station pulls chunk k with PULL k, which also acknowledges chunk k-1. If chunk
0 is lost or the handler is slow the station PULLs chunk 0 until
``handler_timeout``. The board keeps the last response, so a lost frame or a
repeated whole request (same request id) never runs the handler twice.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, Final

from agent.errors import SerialProtocolError
from agent.factory.board import Handler, SerialBoard
from agent.factory.frames import (
    CHUNK_REF,
    FLAG_RESEND,
    HELLO_ACK_INFO,
    SERIAL_PROTOCOL_VERSION,
    BadFrame,
    ChunkAssembler,
    Frame,
    FrameDecoder,
    FrameType,
    LinkStats,
    decode_chunk,
    decode_error,
    encode_chunk,
    encode_frame,
    split_object,
)
from agent.protocol import ErrorCode

log = logging.getLogger(__name__)

EXPECTED_BAUD: Final = 115200
MAX_OBJECT_BYTES: Final = 1024 * 1024
_POLL: Final = 0.05  # read slice: how quickly serve() notices stop, the host its deadline

Progress = Callable[[int, int], None]


class LinkTimeout(SerialProtocolError):
    """The other end did not answer at all."""

    code = ErrorCode.UNAVAILABLE


class LinkCorrupted(SerialProtocolError):
    """Data arrived but never a valid, consistent frame (noise, wrong baud rate)."""

    code = ErrorCode.BAD_REQUEST


class LinkVersionMismatch(SerialProtocolError):
    """The other end speaks another version of the serial protocol."""

    code = ErrorCode.UNSUPPORTED_VERSION


class ObjectTooLarge(SerialProtocolError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class RemoteError(SerialProtocolError):
    """The board answered with an ERROR frame; ``remote_code`` is the code it sent."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"board reported {code}: {message}")
        self.remote_code = code
        self.remote_message = message
        try:
            self.code = ErrorCode(code)
        except ValueError:
            self.code = ErrorCode.INTERNAL


class SerialLink:
    """A framed, retrying link over a ``serial.Serial``-like port (real UART, gadget, pty)."""

    def __init__(
        self,
        port: Any,
        *,
        timeout: float = 1.0,
        retries: int = 5,
        handler_timeout: float = 30.0,
        max_object: int = MAX_OBJECT_BYTES,
    ) -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.handler_timeout = handler_timeout
        self.max_object = max_object
        self._decoder = FrameDecoder()
        self._inbox: deque[Frame | BadFrame] = deque()  # decoded, not yet looked at
        self.stats = LinkStats(decoder=self._decoder.stats)
        # station state
        self.session = 0
        self.remote_max_object = max_object
        self._seq = 0
        self._request_id = 0

    @property
    def port_name(self) -> str:
        return str(getattr(self.port, "name", None) or getattr(self.port, "port", None) or "port")

    # --- wire ---------------------------------------------------------------

    def _send(self, frame: Frame) -> None:
        self.port.write(encode_frame(frame))
        self.port.flush()
        self.stats.frames_sent += 1

    def _receive(self, deadline: float) -> list[Frame | BadFrame]:
        if time.monotonic() >= deadline:
            return []
        if self.port.timeout != _POLL:
            self.port.timeout = _POLL  # pyserial reconfigures the tty on every change: set once
        data = self.port.read(max(1, self.port.in_waiting))
        return self._decoder.feed(data) if data else []

    # --- station side -----------------------------------------------------------

    def connect(self) -> int:
        """Open a fresh session (HELLO / HELLO_ACK); returns the session id."""
        self.port.reset_input_buffer()
        self._decoder.reset()
        self._inbox.clear()
        session = self.session
        while session in (0, self.session):
            session = secrets.randbits(32)
        self.session = session
        self._seq = secrets.randbits(16)
        hello = Frame(FrameType.HELLO, self._next_seq(), session)
        reply = self._exchange(hello, partial(_is_hello_ack, hello.seq), {hello.seq}, "HELLO")
        if len(reply.payload) >= HELLO_ACK_INFO.size:
            _, self.remote_max_object = HELLO_ACK_INFO.unpack_from(reply.payload)
        log.debug("serial event=connected port=%s session=%08x", self.port_name, session)
        return session

    def request(self, command: int, payload: bytes, progress: Progress | None = None) -> bytes:
        """Send one command and return the board's answer.

        ``progress(done, total)`` is called after every acknowledged chunk: first
        for the request bytes sent, then (if the answer spans several frames)
        for the response bytes received.
        """
        if not self.session:
            raise SerialProtocolError("the serial link has no session: call connect() first")
        if len(payload) > min(self.remote_max_object, self.max_object):
            raise ObjectTooLarge(
                f"request of {len(payload)} bytes exceeds the board's limit of "
                f"{self.remote_max_object} bytes"
            )
        self._request_id = (self._request_id + 1) & 0xFFFF
        rid = self._request_id
        what = f"command {command:#x}"
        sent: set[int] = set()
        chunks = split_object(rid, command, payload)
        reply: Frame | None = None
        done = 0
        for chunk in chunks:
            frame = Frame(FrameType.REQUEST, self._next_seq(), self.session, encode_chunk(chunk))
            sent.add(frame.seq)
            last = chunk.index == chunk.count - 1
            accept = partial(_is_request_ack, frame.seq, rid, chunk.index, command if last else -1)
            reply = self._exchange(frame, accept, sent, what)
            done += len(chunk.data)
            if progress is not None:
                progress(done, len(payload))
        assert reply is not None  # at least one chunk, even for an empty payload
        if reply.type is not FrameType.RESPONSE:
            reply = self._first_response(rid, command, sent, what)
        return self._download(reply, rid, command, sent, what, progress)

    def _first_response(self, rid: int, command: int, sent: set[int], what: str) -> Frame:
        accept = partial(_is_response, rid, command, 0)
        # The board sends chunk 0 by itself once the handler returns.
        got = self._await(accept, sent, time.monotonic() + self.timeout)
        if isinstance(got, Frame):
            return got
        pull = Frame(FrameType.PULL, self._next_seq(), self.session, CHUNK_REF.pack(rid, 0))
        sent.add(pull.seq)
        tries = max(self.retries + 1, math.ceil(self.handler_timeout / self.timeout))
        return self._exchange(pull, accept, sent, what, tries=tries)

    def _download(
        self,
        first: Frame,
        rid: int,
        command: int,
        sent: set[int],
        what: str,
        progress: Progress | None,
    ) -> bytes:
        chunk = decode_chunk(first.payload)
        assert chunk is not None  # _is_response checked it
        try:
            assembler = ChunkAssembler(chunk, self.max_object)
            while not assembler.complete:
                index = assembler.next_index
                pull = Frame(
                    FrameType.PULL, self._next_seq(), self.session, CHUNK_REF.pack(rid, index)
                )
                sent.add(pull.seq)
                reply = self._exchange(pull, partial(_is_response, rid, command, index), sent, what)
                chunk = decode_chunk(reply.payload)
                assert chunk is not None
                assembler.add(chunk)
                if progress is not None:
                    progress(assembler.received, chunk.total)
            return assembler.result()
        except (ValueError, OverflowError) as exc:
            raise LinkCorrupted(f"bad response from {self.port_name} to {what}: {exc}") from None

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def _exchange(
        self,
        frame: Frame,
        accept: Callable[[Frame], bool],
        sent: set[int],
        what: str,
        *,
        tries: int | None = None,
    ) -> Frame:
        """Send ``frame`` until an accepted answer arrives; resend on timeout, NACK or noise."""
        limit = self.retries + 1 if tries is None else tries
        started = time.monotonic()
        garbage_before = self._decoder.stats.garbage_bytes
        corrupt = 0
        attempt = 0
        while attempt < limit:
            if attempt:
                self.stats.resends += 1
            self._send(frame if attempt == 0 else replace(frame, flags=frame.flags | FLAG_RESEND))
            attempt += 1
            got = self._await(accept, sent, time.monotonic() + self.timeout)
            if isinstance(got, Frame):
                return got
            corrupt += got
        elapsed = time.monotonic() - started
        garbage = self._decoder.stats.garbage_bytes - garbage_before
        baud = getattr(self.port, "baudrate", None)
        at = f", the port is at {baud}" if baud is not None else ""
        if corrupt or garbage:
            raise LinkCorrupted(
                f"only corrupted data from {self.port_name} for {what} after {attempt} tries in "
                f"{elapsed:.1f} s ({corrupt} bad frames, {garbage} garbage bytes): a noisy "
                f"line or a wrong baud rate (expected {EXPECTED_BAUD}{at})"
            )
        raise LinkTimeout(
            f"no answer from {self.port_name} to {what} after {attempt} tries in {elapsed:.1f} s: "
            f"check the cable, the baud rate (expected {EXPECTED_BAUD}{at}) and that the "
            f"factory console runs"
        )

    def _await(
        self, accept: Callable[[Frame], bool], sent: set[int], deadline: float
    ) -> Frame | int:
        """The accepted frame, or the number of bad frames seen when it is time to resend.

        Frames decoded together are queued: the ACK of a last chunk and the
        response right behind it often arrive in one read.
        """
        bad = 0
        while True:
            if not self._inbox:
                if bad or time.monotonic() >= deadline:
                    return bad  # after noise or a NACK, resend now rather than wait
                self._inbox.extend(self._receive(deadline))
                continue
            item = self._inbox.popleft()
            if isinstance(item, BadFrame):
                if item.kind == "version":
                    raise LinkVersionMismatch(
                        f"{self.port_name} speaks serial protocol version {item.version}, "
                        f"this side speaks {SERIAL_PROTOCOL_VERSION}: update one of them"
                    )
                bad += 1
            elif item.session != self.session:
                self.stats.stale += 1
            elif item.type is FrameType.ERROR and item.seq in sent:
                raise RemoteError(*decode_error(item.payload))
            elif accept(item):
                return item
            elif item.type is FrameType.NACK:
                self.stats.nacks_received += 1
                bad += 1
            else:
                self.stats.stale += 1

    # --- board side -------------------------------------------------------------

    def serve(self, handler: Handler, stop: threading.Event | None = None) -> None:
        """Answer the station until ``stop`` is set; ``handler(command, payload)`` runs commands."""
        stop = stop or threading.Event()
        board = SerialBoard(self._send, handler, self.stats, self.max_object)
        self._decoder.reset()
        while not stop.is_set():
            for item in self._receive(time.monotonic() + _POLL):
                board.on_item(item)


# --- station-side matchers (module level so partial() binds them, not a loop variable) ---


def _is_hello_ack(seq: int, frame: Frame) -> bool:
    return frame.type is FrameType.HELLO_ACK and frame.seq == seq


def _is_response(rid: int, command: int, index: int, frame: Frame) -> bool:
    if frame.type is not FrameType.RESPONSE:
        return False
    chunk = decode_chunk(frame.payload)
    return (
        chunk is not None
        and chunk.request_id == rid
        and chunk.command == command
        and chunk.index == index
    )


def _is_request_ack(seq: int, rid: int, index: int, last_command: int, frame: Frame) -> bool:
    """ACK of this chunk, or (for the last chunk) the response overtaking a lost ACK."""
    if frame.type is FrameType.ACK and frame.seq == seq:
        return frame.payload == CHUNK_REF.pack(rid, index)
    return last_command >= 0 and _is_response(rid, last_command, 0, frame)

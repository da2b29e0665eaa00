"""The factory serial link: sessions, chunked requests, ACK/NACK, retries (esptool-style).

One class, two roles on the same framing (see ``agent.serial_frames``):

* station (host): ``connect()`` opens a session with HELLO, ``request()`` sends
  a command and returns the device's answer. The station drives everything:
  every frame it sends is answered, and it alone times out and resends.
* board (device): ``serve(handler)`` answers frames. It has no timers, so it is
  a pure function of its state and the next frame: a resent frame (same
  session and sequence) gets the cached answer again, never a second
  delivery, and a HELLO with a new session id drops whatever was half done.

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
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from typing import Any, Final

from agent.errors import SerialProtocolError
from agent.protocol import ErrorCode
from agent.serial_frames import (
    CHUNK_REF,
    FLAG_RESEND,
    HELLO_ACK_INFO,
    MAX_FRAME_PAYLOAD,
    SERIAL_PROTOCOL_VERSION,
    BadFrame,
    Chunk,
    ChunkAssembler,
    DecoderStats,
    Frame,
    FrameDecoder,
    FrameType,
    decode_chunk,
    decode_error,
    encode_chunk,
    encode_error,
    encode_frame,
    split_object,
)

log = logging.getLogger(__name__)

EXPECTED_BAUD: Final = 115200
MAX_OBJECT_BYTES: Final = 1024 * 1024
_POLL: Final = 0.05  # read slice: how quickly serve() notices stop, the host its deadline

Handler = Callable[[int, bytes], bytes]
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


@dataclass
class LinkStats:
    frames_sent: int = 0
    resends: int = 0
    nacks_sent: int = 0
    nacks_received: int = 0
    duplicates: int = 0  # frames answered again from the cache (board)
    stale: int = 0  # valid frames ignored: other session, old sequence, unexpected type
    requests_served: int = 0  # handler calls (board)
    decoder: DecoderStats = field(default_factory=DecoderStats)


@dataclass(frozen=True)
class _Outcome:
    """The board's answer to one whole request, kept to answer duplicates."""

    key: tuple[int, int, int, int]  # request id, command, crc, total
    chunks: tuple[Chunk, ...] = ()
    error: tuple[str, str] | None = None


@dataclass
class _BoardState:
    session: int = 0
    last_seq: int | None = None
    last_replies: list[Frame] = field(default_factory=list)
    assembler: ChunkAssembler | None = None
    outcome: _Outcome | None = None


def _error_of(exc: Exception) -> tuple[str, str]:
    code: Any = getattr(exc, "code", None)
    message: Any = getattr(exc, "message", None)
    if code is None or message is None:
        log.exception("serial event=handler_crash")
        return ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}"
    return (code.value if isinstance(code, Enum) else str(code)), str(message)


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
        # board state
        self._board = _BoardState()

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
        self._board = _BoardState()
        self._decoder.reset()
        while not stop.is_set():
            for item in self._receive(time.monotonic() + _POLL):
                self._on_board_item(item, handler)

    def _reply(self, replies: list[Frame], frame: Frame) -> None:
        replies.append(frame)
        self._send(frame)

    def _on_board_item(self, item: Frame | BadFrame, handler: Handler) -> None:
        board = self._board
        if isinstance(item, BadFrame):
            if item.kind == "version":
                message = f"this board speaks serial protocol version {SERIAL_PROTOCOL_VERSION}"
                payload = encode_error(ErrorCode.UNSUPPORTED_VERSION.value, message)
                self._send(Frame(FrameType.ERROR, item.seq, item.session, payload))
            else:
                self.stats.nacks_sent += 1
                self._send(Frame(FrameType.NACK, 0, board.session))
            return
        if item.type not in (FrameType.HELLO, FrameType.REQUEST, FrameType.PULL):
            self.stats.stale += 1  # station-bound frames (an echo?) are not for us
            return
        if item.type is FrameType.HELLO and item.session not in (0, board.session):
            if board.session:
                log.info("serial event=new_session old=%08x new=%08x", board.session, item.session)
            self._board = board = _BoardState(session=item.session)
        if not board.session or item.session != board.session:
            self.stats.stale += 1
            message = f"no open session {item.session:08x} (board restarted or another station)"
            error = encode_error(ErrorCode.WRONG_STATE.value, message + ": send HELLO")
            self._send(Frame(FrameType.ERROR, item.seq, item.session, error))
            return
        if item.seq == board.last_seq:
            self.stats.duplicates += 1
            for frame in board.last_replies:
                self._send(replace(frame, flags=frame.flags | FLAG_RESEND))
            return
        replies: list[Frame] = []
        board.last_seq, board.last_replies = item.seq, replies
        if item.type is FrameType.HELLO:
            info = HELLO_ACK_INFO.pack(MAX_FRAME_PAYLOAD, self.max_object)
            self._reply(replies, Frame(FrameType.HELLO_ACK, item.seq, item.session, info))
        elif item.type is FrameType.REQUEST:
            self._on_request(item, handler, replies)
        else:
            self._on_pull(item, replies)

    def _error(self, replies: list[Frame], seq: int, code: ErrorCode | str, message: str) -> None:
        text = code.value if isinstance(code, ErrorCode) else code
        payload = encode_error(text, message)
        self._reply(replies, Frame(FrameType.ERROR, seq, self._board.session, payload))

    def _on_request(self, frame: Frame, handler: Handler, replies: list[Frame]) -> None:
        board = self._board
        chunk = decode_chunk(frame.payload)
        if chunk is None:
            self._error(replies, frame.seq, ErrorCode.BAD_REQUEST, "malformed request chunk")
            return
        try:
            if chunk.index == 0:
                board.assembler = ChunkAssembler(chunk, self.max_object)
            elif board.assembler is None:
                raise ValueError(f"chunk {chunk.index} without chunk 0")
            else:
                board.assembler.add(chunk)
        except OverflowError as exc:
            board.assembler = None
            self._error(replies, frame.seq, ErrorCode.PAYLOAD_TOO_LARGE, str(exc))
            return
        except ValueError as exc:
            board.assembler = None
            self._error(replies, frame.seq, ErrorCode.BAD_REQUEST, str(exc))
            return
        ref = CHUNK_REF.pack(chunk.request_id, chunk.index)
        self._reply(replies, Frame(FrameType.ACK, frame.seq, board.session, ref))
        if not board.assembler.complete:
            return
        assembler, board.assembler = board.assembler, None
        try:
            data = assembler.result()
        except ValueError as exc:
            self._error(replies, frame.seq, ErrorCode.BAD_REQUEST, str(exc))
            return
        first = assembler.first
        key = (first.request_id, first.command, first.crc, first.total)
        if board.outcome is None or board.outcome.key != key:
            board.outcome = self._run(handler, key, data)
        else:
            self.stats.duplicates += 1  # the same whole request again: same answer
        self._send_outcome(replies, frame.seq, 0)

    def _run(self, handler: Handler, key: tuple[int, int, int, int], data: bytes) -> _Outcome:
        self.stats.requests_served += 1
        try:
            response = handler(key[1], data)
        except Exception as exc:
            return _Outcome(key, error=_error_of(exc))
        if len(response) > self.max_object:
            message = f"response of {len(response)} bytes exceeds {self.max_object}"
            return _Outcome(key, error=(ErrorCode.PAYLOAD_TOO_LARGE.value, message))
        return _Outcome(key, chunks=tuple(split_object(key[0], key[1], response)))

    def _send_outcome(self, replies: list[Frame], seq: int, index: int) -> None:
        outcome = self._board.outcome
        assert outcome is not None
        if outcome.error is not None:
            self._error(replies, seq, *outcome.error)
        elif index < len(outcome.chunks):
            payload = encode_chunk(outcome.chunks[index])
            self._reply(replies, Frame(FrameType.RESPONSE, seq, self._board.session, payload))
        else:
            self._error(replies, seq, ErrorCode.BAD_REQUEST, f"no response chunk {index}")

    def _on_pull(self, frame: Frame, replies: list[Frame]) -> None:
        if len(frame.payload) != CHUNK_REF.size:
            self._error(replies, frame.seq, ErrorCode.BAD_REQUEST, "malformed PULL")
            return
        rid, index = CHUNK_REF.unpack(frame.payload)
        outcome = self._board.outcome
        if outcome is None or outcome.key[0] != rid:
            self._error(replies, frame.seq, ErrorCode.WRONG_STATE, f"no response for request {rid}")
            return
        self._send_outcome(replies, frame.seq, index)


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

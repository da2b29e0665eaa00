"""The board (device) half of the factory serial link: a timer-free frame responder.

``SerialLink.serve`` feeds every decoded frame to a ``SerialBoard``. The board
has no timers, so it is a pure function of its state and the next frame: a
resent frame (same session and sequence) gets the cached answer again, never a
second delivery, and a HELLO with a new session id drops whatever was half done.

Per request: REQUEST chunk i -> ACK i, ..., last chunk -> ACK, then the handler
runs and the board sends RESPONSE chunk 0 unsolicited (or ERROR); PULL k asks
for chunk k. The board keeps the last outcome, so a lost frame or a repeated
whole request (same request id) never runs the handler twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from agent.factory.frames import (
    CHUNK_REF,
    FLAG_RESEND,
    HELLO_ACK_INFO,
    MAX_FRAME_PAYLOAD,
    SERIAL_PROTOCOL_VERSION,
    BadFrame,
    Chunk,
    ChunkAssembler,
    Frame,
    FrameType,
    LinkStats,
    decode_chunk,
    encode_chunk,
    encode_error,
    split_object,
)
from agent.protocol import ErrorCode

log = logging.getLogger("agent.factory.link")  # one logger for both halves of the link

Handler = Callable[[int, bytes], bytes]
"""``handler(command, payload) -> response``; raise an error with ``code``/``message`` to refuse."""


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


class SerialBoard:
    """Answers station frames through ``send``; ``handler`` runs each complete request."""

    def __init__(
        self,
        send: Callable[[Frame], None],
        handler: Handler,
        stats: LinkStats,
        max_object: int,
    ) -> None:
        self._send = send
        self._handler = handler
        self.stats = stats
        self.max_object = max_object
        self._board = _BoardState()

    def _reply(self, replies: list[Frame], frame: Frame) -> None:
        replies.append(frame)
        self._send(frame)

    def on_item(self, item: Frame | BadFrame) -> None:
        """React to one decoded frame (or one undecodable one) from the station."""
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
            self._on_request(item, replies)
        else:
            self._on_pull(item, replies)

    def _error(self, replies: list[Frame], seq: int, code: ErrorCode | str, message: str) -> None:
        text = code.value if isinstance(code, ErrorCode) else code
        payload = encode_error(text, message)
        self._reply(replies, Frame(FrameType.ERROR, seq, self._board.session, payload))

    def _on_request(self, frame: Frame, replies: list[Frame]) -> None:
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
            board.outcome = self._run(key, data)
        else:
            self.stats.duplicates += 1  # the same whole request again: same answer
        self._send_outcome(replies, frame.seq, 0)

    def _run(self, key: tuple[int, int, int, int], data: bytes) -> _Outcome:
        self.stats.requests_served += 1
        try:
            response = self._handler(key[1], data)
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

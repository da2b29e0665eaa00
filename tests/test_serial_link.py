"""The factory serial link over real raw ptys, through a proxy that mangles the line."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.errors import SerialProtocolError
from agent.factory.frames import (
    END,
    ESC,
    FLAG_RESEND,
    MAX_FRAME_PAYLOAD,
    BadFrame,
    Frame,
    FrameDecoder,
    FrameType,
    decode_chunk,
    decode_error,
    encode_chunk,
    encode_frame,
    split_object,
)
from agent.factory.link import (
    LinkCorrupted,
    LinkTimeout,
    LinkVersionMismatch,
    RemoteError,
    SerialLink,
)
from agent.protocol import ErrorCode, ProtocolError
from tests.serial_pty import LineFaults, LineProxy, open_port

ECHO, BIG, FAIL, CRASH, SLOW = 1, 2, 3, 4, 5
TEN_KB = bytes(range(256)) * 40  # 10,240 bytes, every byte value incl. END and ESC


@dataclass
class Board:
    link: SerialLink
    calls: list[tuple[int, bytes]] = field(default_factory=list)

    def handle(self, command: int, payload: bytes) -> bytes:
        self.calls.append((command, payload))
        if command == BIG:
            return payload[::-1]
        if command == FAIL:
            raise ProtocolError(ErrorCode.WRONG_STATE, "board already finalized")
        if command == CRASH:
            raise RuntimeError("disk on fire")
        if command == SLOW:
            time.sleep(0.5)
        return b"ok:" + payload


@contextmanager
def line(
    to_board: LineFaults | None = None,
    to_station: LineFaults | None = None,
    *,
    board_runs: bool = True,
    timeout: float = 0.3,
    retries: int = 4,
) -> Iterator[tuple[SerialLink, Board, LineProxy]]:
    """A station link and a serving board, joined through a LineProxy."""
    with LineProxy(to_board, to_station) as proxy:
        station_port = open_port(proxy.station_path)
        board_port = open_port(proxy.board_path)
        board = Board(SerialLink(board_port, timeout=timeout, retries=retries))
        stop = threading.Event()
        thread = threading.Thread(target=board.link.serve, args=(board.handle, stop), daemon=True)
        if board_runs:
            thread.start()
        try:
            yield SerialLink(station_port, timeout=timeout, retries=retries), board, proxy
        finally:
            stop.set()
            if board_runs:
                thread.join(timeout=2)
                assert not thread.is_alive()
            station_port.close()
            board_port.close()


# --- round trips on a clean line ----------------------------------------------


def test_round_trip_small_and_10k_with_progress() -> None:
    with line() as (station, board, _):
        session = station.connect()
        assert session != 0
        assert station.request(ECHO, b"hello") == b"ok:hello"
        assert station.request(ECHO, b"") == b"ok:"
        seen: list[tuple[int, int]] = []
        assert (
            station.request(BIG, TEN_KB, lambda done, total: seen.append((done, total)))
            == (TEN_KB[::-1])
        )
        assert board.calls == [(ECHO, b"hello"), (ECHO, b""), (BIG, TEN_KB)]
        upload = seen[:11]
        assert [total for _, total in upload] == [len(TEN_KB)] * 11  # 11 chunks of <= 1008
        assert [done for done, _ in upload] == sorted({done for done, _ in upload})
        assert seen[10] == (len(TEN_KB), len(TEN_KB))
        assert seen[-1] == (len(TEN_KB), len(TEN_KB))  # download finished too
        assert station.stats.resends == 0
        assert board.link.stats.decoder.crc_errors == 0


def test_paced_at_115200_baud_is_close_to_the_line_rate() -> None:
    rate = 11_520.0
    paced = (LineFaults(bytes_per_second=rate), LineFaults(bytes_per_second=rate))
    with line(*paced, timeout=1.0) as (station, _, _):
        station.connect()
        started = time.monotonic()
        assert station.request(ECHO, TEN_KB) == b"ok:" + TEN_KB
        elapsed = time.monotonic() - started
    # 10 KB each way plus escaping and headers: about 1.9 s at the line rate.
    floor = 2 * len(TEN_KB) / rate
    assert floor < elapsed < floor * 1.6 + 0.5, elapsed


def test_handler_errors_become_remote_errors_and_the_link_survives() -> None:
    with line() as (station, _, _):
        station.connect()
        with pytest.raises(RemoteError) as caught:
            station.request(FAIL, b"x")
        assert caught.value.code is ErrorCode.WRONG_STATE
        assert "board already finalized" in str(caught.value)
        with pytest.raises(RemoteError) as crashed:
            station.request(CRASH, b"x")
        assert crashed.value.code is ErrorCode.INTERNAL
        assert "disk on fire" in crashed.value.remote_message
        assert station.request(ECHO, b"again") == b"ok:again"


def test_slow_handler_is_polled_not_rerun() -> None:
    with line(timeout=0.15) as (station, board, _):
        station.connect()
        assert station.request(SLOW, b"keygen") == b"ok:keygen"
        assert board.calls == [(SLOW, b"keygen")]


def test_request_without_session_is_refused() -> None:
    with line() as (station, _, _), pytest.raises(SerialProtocolError, match="connect"):
        station.request(ECHO, b"x")


# --- a mangled line -------------------------------------------------------------


def test_flipped_bits_are_caught_by_crc_and_resent() -> None:
    # station frames: 0 HELLO, 1.. REQUEST chunks; board frames: 0 HELLO_ACK, 1.. ACKs
    to_board = LineFaults(flip={2: 300})
    to_station = LineFaults(flip={3: 6})
    with line(to_board, to_station) as (station, board, _):
        station.connect()
        assert station.request(BIG, TEN_KB) == TEN_KB[::-1]
        assert board.calls == [(BIG, TEN_KB)]
        assert board.link.stats.decoder.crc_errors == 1
        assert station.stats.decoder.crc_errors == 1
        assert station.stats.resends >= 2


def test_corruption_triggers_an_immediate_resend() -> None:
    # a bad frame to the board (it NACKs) and one to the station (it resends by itself)
    with line(LineFaults(flip={1: 20}), LineFaults(flip={3: 9}), timeout=2.0) as (
        station,
        board,
        _,
    ):
        station.connect()
        started = time.monotonic()
        assert station.request(BIG, TEN_KB) == TEN_KB[::-1]
        assert time.monotonic() - started < 1.0  # not after the 2 s timeout
        assert board.link.stats.nacks_sent == 1
        assert station.stats.nacks_received == 1
        assert station.stats.decoder.crc_errors == 1
        assert station.stats.resends == 2


def test_dropped_bytes_are_recovered() -> None:
    with line(LineFaults(drop={1: 40, 4: 0}), LineFaults(drop={2: 3})) as (station, board, _):
        station.connect()
        assert station.request(BIG, TEN_KB) == TEN_KB[::-1]
        assert board.calls == [(BIG, TEN_KB)]


def test_truncated_frames_are_recovered() -> None:
    # board frame 2 is RESPONSE chunk 0 of the small request: the station must PULL it.
    with line(LineFaults(truncate={1: 9}), LineFaults(truncate={2: 12})) as (station, board, _):
        station.connect()
        assert station.request(ECHO, b"abc") == b"ok:abc"
        assert board.calls == [(ECHO, b"abc")]
        # HELLO, REQUEST, REQUEST again (runt: no NACK, so after the timeout), PULL 0
        assert station.stats.frames_sent == 4
        assert station.stats.resends == 1


def test_lost_answers_never_run_a_command_twice() -> None:
    # ACK and RESPONSE of the last chunk are both lost: the station resends the chunk.
    with line(to_station=LineFaults(lose={1, 2})) as (station, board, _):
        station.connect()
        assert station.request(ECHO, b"once") == b"ok:once"
        assert board.calls == [(ECHO, b"once")]
        assert board.link.stats.duplicates >= 1


def test_stale_bytes_from_a_previous_session_before_hello() -> None:
    old = 0x0BADF00D
    stale_request = encode_frame(
        Frame(FrameType.REQUEST, 9, old, encode_chunk(split_object(1, ECHO, b"stale")[0]))
    )
    stale_response = encode_frame(
        Frame(FrameType.RESPONSE, 9, old, encode_chunk(split_object(1, ECHO, b"old")[0]))
    )
    with line() as (station, board, proxy):
        proxy.inject(
            to_board=b"\x00garbage\xff" + stale_request + stale_request[:12],
            to_station=b"noise" + stale_response + bytes([END, ESC, 0x01]),
        )
        time.sleep(0.1)
        station.connect()
        proxy.inject(to_station=stale_response + b"\x55" * 40)  # after the flush, mid-session
        assert station.request(ECHO, b"new") == b"ok:new"
        assert board.calls == [(ECHO, b"new")]
        assert station.stats.stale >= 1


def test_board_that_never_answers_times_out_quickly() -> None:
    with line(board_runs=False, timeout=0.2, retries=3) as (station, _, proxy):
        started = time.monotonic()
        with pytest.raises(LinkTimeout) as caught:
            station.connect()
        assert time.monotonic() - started < 3
    message = str(caught.value)
    assert proxy.station_path in message
    assert "after 4 tries" in message
    assert "115200" in message
    assert "factory console" in message
    assert caught.value.code is ErrorCode.UNAVAILABLE


def test_wrong_baud_rate_gives_a_clear_error_and_delivers_nothing() -> None:
    garbled = (LineFaults(garble=True), LineFaults(garble=True))
    with line(*garbled, timeout=0.2, retries=3) as (
        station,
        board,
        _,
    ):
        started = time.monotonic()
        with pytest.raises((LinkTimeout, LinkCorrupted)) as caught:
            station.connect()
        assert time.monotonic() - started < 3
        assert "baud rate" in str(caught.value)
        assert board.calls == []
        assert board.link.stats.requests_served == 0
        assert board.link.stats.decoder.frames == 0


def test_second_hello_mid_transfer_drops_the_partial_request() -> None:
    with line() as (station, board, _):
        station.connect()
        other = SerialLink(station.port, timeout=0.3, retries=4)

        def hijack(done: int, total: int) -> None:
            if done < total and not other.session:
                other.connect()  # a second station (or a restarted one) takes over

        with pytest.raises(RemoteError) as caught:
            station.request(BIG, TEN_KB, hijack)
        assert caught.value.code is ErrorCode.WRONG_STATE
        assert "send HELLO" in str(caught.value)
        assert board.calls == []  # the half-sent request was never delivered
        assert other.request(ECHO, b"fresh") == b"ok:fresh"
        assert board.calls == [(ECHO, b"fresh")]


# --- the board's answers to raw frames --------------------------------------------


class RawStation:
    """Writes hand-made frames to the board and collects what it answers."""

    def __init__(self, port: Any) -> None:
        self.port = port
        self.decoder = FrameDecoder()

    def send(self, frame: Frame, wait_for: int = 1) -> list[Frame]:
        self.port.write(encode_frame(frame))
        got: list[Frame] = []
        deadline = time.monotonic() + 2
        while len(got) < wait_for and time.monotonic() < deadline:
            for item in self.decoder.feed(self.port.read(max(1, self.port.in_waiting))):
                assert isinstance(item, Frame), item
                got.append(item)
        return got


def test_duplicates_are_answered_from_the_cache() -> None:
    session = 0x12345678
    with line() as (station, board, _):
        raw = RawStation(station.port)
        (hello_ack,) = raw.send(Frame(FrameType.HELLO, 1, session))
        assert hello_ack.type is FrameType.HELLO_ACK
        request = encode_chunk(split_object(7, ECHO, b"idem")[0])
        first = raw.send(Frame(FrameType.REQUEST, 2, session, request), wait_for=2)
        assert [(f.type, f.seq, f.flags) for f in first] == [
            (FrameType.ACK, 2, 0),
            (FrameType.RESPONSE, 2, 0),
        ]
        # same sequence (our ACK was lost): the cached frames, replayed
        replay = raw.send(Frame(FrameType.REQUEST, 2, session, request), wait_for=2)
        assert [(f.type, f.seq, f.flags) for f in replay] == [
            (FrameType.ACK, 2, FLAG_RESEND),
            (FrameType.RESPONSE, 2, FLAG_RESEND),
        ]
        # the same whole request again (same request id, new sequence): the cached answer
        again = raw.send(Frame(FrameType.REQUEST, 3, session, request), wait_for=2)
        assert [(f.type, f.seq, f.flags) for f in again] == [
            (FrameType.ACK, 3, 0),
            (FrameType.RESPONSE, 3, 0),
        ]
        for answer in (replay, again):
            chunk = decode_chunk(answer[1].payload)
            assert chunk is not None and chunk.data == b"ok:idem"
        assert board.calls == [(ECHO, b"idem")]
        # a new session forgets the cache: request id 7 is a new command there
        raw.send(Frame(FrameType.HELLO, 1, session + 1))
        raw.send(Frame(FrameType.REQUEST, 2, session + 1, request), wait_for=2)
        assert len(board.calls) == 2
        # and so is a new request id with the same bytes
        other_id = encode_chunk(split_object(8, ECHO, b"idem")[0])
        raw.send(Frame(FrameType.REQUEST, 3, session + 1, other_id), wait_for=2)
        assert len(board.calls) == 3


def test_wrong_version_is_reported_both_ways() -> None:
    with line() as (station, board, proxy):
        raw = RawStation(station.port)
        (answer,) = raw.send(Frame(FrameType.HELLO, 5, 0xABCDEF01, version=2))
        assert answer.type is FrameType.ERROR
        assert decode_error(answer.payload)[0] == "UNSUPPORTED_VERSION"
        assert board.link.stats.decoder.bad_version == 1

    with line(board_runs=False, timeout=0.3, retries=5) as (station, _, proxy):
        future_board = encode_frame(Frame(FrameType.HELLO_ACK, 0, 0, version=2))
        timer = threading.Timer(0.2, proxy.inject, kwargs={"to_station": future_board})
        timer.start()
        try:
            with pytest.raises(LinkVersionMismatch, match="version 2"):
                station.connect()
        finally:
            timer.cancel()


# --- the decoder alone -----------------------------------------------------------------


def test_decoder_survives_garbage_splits_and_oversize() -> None:
    frames = [
        Frame(FrameType.REQUEST, 1, 42, bytes([END, ESC, END, ESC]) * 10),
        Frame(FrameType.ACK, 2, 42, b"\x00\x01\x00\x02"),
        Frame(FrameType.RESPONSE, 3, 42, b"\xc0" * MAX_FRAME_PAYLOAD),
    ]
    wire = b"junk" + encode_frame(frames[0]) + b"\x01\x02" + encode_frame(frames[1])
    wire += bytes([END]) + b"\x07" * 5000  # an endless run: oversize
    wire += bytes([END]) + encode_frame(frames[2])
    bad = bytearray(encode_frame(frames[1]))
    bad[8] ^= 0x01
    wire += bytes(bad) + bytes([END, ESC, 0x42, END])  # bad CRC, bad escape
    decoder = FrameDecoder()
    out: list[Frame | BadFrame] = []
    for i in range(0, len(wire), 3):  # byte-trickle, as a UART delivers it
        out += decoder.feed(wire[i : i + 3])
    assert [f for f in out if isinstance(f, Frame)] == frames
    assert [b.kind for b in out if isinstance(b, BadFrame)] == ["crc", "crc"]
    assert decoder.stats.crc_errors == 1
    assert decoder.stats.oversize == 1
    assert decoder.stats.malformed == 1
    assert decoder.stats.garbage_bytes > 5000
    with pytest.raises(ValueError):
        encode_frame(Frame(FrameType.RESPONSE, 1, 1, b"x" * (MAX_FRAME_PAYLOAD + 1)))

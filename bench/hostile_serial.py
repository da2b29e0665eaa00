"""Mutated serial frames at a factory console served on a real raw pty.

The console (``FactoryConsole.serve``) runs in a thread on the pty's slave side; we
write hostile bytes to the master and drain its answers in another thread. At the
end a real station ``SerialLink`` asks INFO over the same line. Nothing generated
is a valid GEN_KEY or COMMIT, so the state directory must stay empty.
"""

from __future__ import annotations

import json
import os
import random
import select
import threading
import time
import tty
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import serial

from agent.factory import commands as fc
from agent.factory.console import FactoryConsole
from agent.factory.frames import (
    CHUNK,
    CHUNK_REF,
    CRC,
    END,
    HEADER,
    MAX_CHUNK_DATA,
    Frame,
    FrameType,
    encode_frame,
)
from agent.factory.link import SerialLink
from harness.simulated_board import make_board_files, make_sysfs

MAC = "02:00:00:5E:00:01"


def raw_frame(
    version: int, ftype: int, seq: int, session: int, payload: bytes, length: int | None = None
) -> bytes:
    """A frame with any header values and a correct CRC (so the CRC check passes)."""
    size = len(payload) if length is None else length
    body = HEADER.pack(version, ftype, 0, seq, session, size & 0xFFFF) + payload
    body += CRC.pack(zlib.crc32(body))
    escaped = body.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc")
    return bytes([END]) + escaped + bytes([END])


def chunk(
    rid: int, command: int, index: int, count: int, total: int, crc: int, data: bytes
) -> bytes:
    return CHUNK.pack(rid, command, index, count, total & 0xFFFFFFFF, crc & 0xFFFFFFFF) + data


class FrameFactory:
    """Hostile byte strings for the board, reproducible from ``seed``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.session = 0x5EED0001
        self.seq = 0
        self.families = [
            self.random_bytes,
            self.flipped,
            self.garbage_payload,
            self.wrong_version,
            self.absurd_chunk,
            self.handler_garbage,
            self.replay,
            self.hello,
        ]
        self._last = self.info_request()

    def next(self) -> bytes:
        return self.rng.choice(self.families)()

    def _seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFF
        return self.seq

    def info_request(self) -> bytes:
        data = fc.encode({})
        payload = chunk(1, fc.Command.INFO, 0, 1, len(data), zlib.crc32(data), data)
        return encode_frame(Frame(FrameType.REQUEST, self._seq(), self.session, payload))

    def hello(self) -> bytes:
        if self.rng.random() < 0.3:
            self.session = self.rng.randrange(1, 2**32)
        return encode_frame(Frame(FrameType.HELLO, self._seq(), self.session))

    def random_bytes(self) -> bytes:
        data = self.rng.randbytes(self.rng.choice([1, 5, 17, 64, 300, 1100, 2500, 5000]))
        return bytes([END]) + data if self.rng.random() < 0.5 else data

    def flipped(self) -> bytes:
        data = bytearray(self.rng.choice([self.info_request(), self.hello()]))
        for _ in range(self.rng.randint(1, 3)):
            data[self.rng.randrange(1, len(data) - 1)] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def garbage_payload(self) -> bytes:
        ftype = self.rng.choice([*FrameType, 0, 9, 200, 255])
        payload = self.rng.randbytes(self.rng.choice([0, 1, 3, 12, 16, 100, 1024]))
        length = self.rng.choice([None, None, 0, 1, 1024, 65535])
        return raw_frame(1, int(ftype), self._seq(), self.session, payload, length)

    def wrong_version(self) -> bytes:
        version = self.rng.choice([0, 2, 3, 127, 255])
        data = fc.encode({})
        payload = chunk(1, fc.Command.INFO, 0, 1, len(data), zlib.crc32(data), data)
        return raw_frame(version, FrameType.REQUEST, self._seq(), self.session, payload)

    def absurd_chunk(self) -> bytes:
        r = self.rng
        data = r.randbytes(r.choice([0, 10, MAX_CHUNK_DATA]))
        index, count, total = r.choice(
            [
                (0, 65535, 2**32 - 1),
                (0, 65535, 65535 * MAX_CHUNK_DATA),
                (0, 1, 2**31),
                (5, 3, 10),
                (0, 0, 0),
                (7, 9000, 9000 * MAX_CHUNK_DATA),
                (1, 2, 2 * MAX_CHUNK_DATA),
                (0, 2, 1),
                (0, 1, 0),
                (65535, 65535, 1),
            ]
        )
        payload = chunk(
            r.randrange(65536), r.randrange(65536), index, count, total, r.randrange(2**32), data
        )
        ftype = r.choice([FrameType.REQUEST, FrameType.REQUEST, FrameType.PULL])
        if ftype is FrameType.PULL:
            payload = CHUNK_REF.pack(r.randrange(65536), r.randrange(65536))
        return encode_frame(Frame(ftype, self._seq(), self.session, payload[:1024]))

    def handler_garbage(self) -> bytes:
        """A consistent one-chunk object the handler sees: garbage or a refused command."""
        r = self.rng
        data = r.choice(
            [
                r.randbytes(r.randrange(1, 400)),
                b"[" * 900 + b"]" * 0,
                b'{"a":' * 190 + b"1" + b"}" * 190,
                json.dumps({"clientId": r.choice(["", "-x", "a" * 80, "a b", 5])}).encode(),
                json.dumps({"item": "nope", "data": "x"}).encode(),
                json.dumps({"sha256": r.randbytes(32).hex()}).encode(),
                json.dumps({"sha256": 7}).encode(),
                b"\xff\xfe",
            ]
        )[:MAX_CHUNK_DATA]
        command = r.choice([fc.Command.GEN_KEY, fc.Command.PUT, fc.Command.COMMIT, 0, 0x15, 0xFFFF])
        payload = chunk(r.randrange(65536), int(command), 0, 1, len(data), zlib.crc32(data), data)
        return encode_frame(Frame(FrameType.REQUEST, self._seq(), self.session, payload))

    def replay(self) -> bytes:
        if self.rng.random() < 0.3:
            self._last = self.info_request()
        return self._last


class FdPort:
    """The station end of a pty master with the few pyserial methods SerialLink uses."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.timeout: float | None = 0.05
        self.name = "pty-master"

    @property
    def in_waiting(self) -> int:
        ready, _, _ = select.select([self.fd], [], [], 0)
        return 4096 if ready else 0

    def read(self, size: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout or 0)
        return os.read(self.fd, size) if ready else b""

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)

    def flush(self) -> None:
        pass

    def reset_input_buffer(self) -> None:
        while self.in_waiting:
            os.read(self.fd, 4096)


@dataclass
class FrameOutcome:
    sent: int = 0
    bytes_sent: int = 0
    bytes_answered: int = 0  # what the board wrote back (NACKs, ERRORs, ACKs, answers)
    console_alive: bool = False
    info_after: dict[str, Any] = field(default_factory=dict)
    state_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def failures(self) -> list[str]:
        problems = []
        if not self.console_alive:
            problems.append("the factory console thread died")
        if self.info_after.get("mac") != MAC:
            problems.append(f"INFO after the frames failed: {self.info_after}")
        if self.sent and not self.bytes_answered:
            problems.append("the console never answered")
        if self.state_files:
            problems.append(f"files written in the state dir: {self.state_files[:5]}")
        return problems


def run_frames(workdir: Path, count: int, seed: int) -> FrameOutcome:
    """Feed ``count`` hostile byte strings to a console on a pty, then ask INFO."""
    board = workdir / "board"
    sysfs = make_sysfs(board / "sys", {"eth0": (MAC, True)})
    make_board_files(board, machine_id="hostile-serial\n")
    state_dir = board / "state"
    console = FactoryConsole(state_dir, sysfs_root=sysfs, root=board)
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    port = serial.Serial(os.ttyname(slave), baudrate=115200, timeout=0.05, exclusive=True)
    stop, draining = threading.Event(), threading.Event()
    draining.set()
    server = threading.Thread(target=console.serve, args=(port, stop), daemon=True)
    server.start()

    out = FrameOutcome()

    def drain() -> None:
        while draining.is_set():
            ready, _, _ = select.select([master], [], [], 0.02)
            if ready:
                out.bytes_answered += len(os.read(master, 65536))

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    factory = FrameFactory(seed)
    started = time.monotonic()
    station = FdPort(master)
    try:
        for _ in range(count):
            data = factory.next()
            station.write(data)
            out.sent += 1
            out.bytes_sent += len(data)
        station.write(bytes([END]))
        time.sleep(0.3)  # let the board catch up with the last frames
        draining.clear()
        drainer.join()
        out.console_alive = server.is_alive()
        link = SerialLink(station, timeout=1.0, retries=10)
        link.connect()
        out.info_after = fc.decode(link.request(fc.Command.INFO, fc.encode({})), "INFO")
        out.state_files = (
            sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if p.is_file())
            if state_dir.exists()
            else []
        )
    finally:
        out.seconds = time.monotonic() - started
        stop.set()
        draining.clear()
        server.join(timeout=5)
        port.close()
        os.close(master)
        os.close(slave)
    return out

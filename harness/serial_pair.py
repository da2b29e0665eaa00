"""A serial cable made of real ptys, for the demo, tests and benchmarks.

``LineProxy`` opens two raw pty pairs: the station opens ``station_path``, the
board opens ``board_path``, and a thread copies bytes between the two masters
(a null-modem cable; each side sees an ordinary tty). Each direction can
carry ``LineFaults``: corrupt, drop, truncate, delay or pace bytes like a real
UART. Faults are addressed by frame index within a direction (a frame is a
run of bytes between SLIP END bytes, counted from 0), so a test can say
"corrupt the 2nd frame the station sends" without knowing frame sizes.
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field
from types import TracebackType

END = 0xC0
# A wrong baud rate samples bits at the wrong time: model it as a fixed byte scramble.
_WRONG_BAUD = bytes((b * 7 + 3) & 0xFF for b in range(256))


@dataclass
class LineFaults:
    """What happens to the bytes flowing in one direction (all empty = a clean line)."""

    flip: dict[int, int] = field(default_factory=dict)  # frame index -> byte pos to XOR 0x10
    drop: dict[int, int] = field(default_factory=dict)  # frame index -> byte pos to drop
    truncate: dict[int, int] = field(default_factory=dict)  # frame index -> keep this many
    lose: set[int] = field(default_factory=set)  # frame indexes dropped whole (END kept)
    garble: bool = False  # every byte replaced (a wrong baud rate)
    blackhole: bool = False  # nothing gets through (the board is off)
    bytes_per_second: float | None = None  # pace like a UART (115200 baud = 11,520 B/s)
    latency: float = 0.0  # added before each burst is forwarded
    # bookkeeping
    frame: int = 0
    pos: int = 0
    forwarded: int = 0

    def apply(self, data: bytes) -> bytes:
        if self.blackhole:
            return b""
        if self.garble:
            return data.translate(_WRONG_BAUD)
        out = bytearray()
        for byte in data:
            if byte == END:
                if self.pos:
                    self.frame += 1
                    self.pos = 0
                out.append(byte)
                continue
            index, pos = self.frame, self.pos
            self.pos += 1
            if index in self.lose:
                continue
            if index in self.truncate and pos >= self.truncate[index]:
                continue
            if self.drop.get(index) == pos:
                continue
            out.append(byte ^ 0x10 if self.flip.get(index) == pos else byte)
        return bytes(out)


def open_raw_pty() -> tuple[int, int, str]:
    """A pty pair with the slave in raw mode: (master fd, slave fd, slave path)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


class LineProxy:
    """station <-> proxy <-> board over two real pty pairs, with per-direction faults."""

    def __init__(
        self,
        to_board: LineFaults | None = None,
        to_station: LineFaults | None = None,
    ) -> None:
        self.to_board = to_board or LineFaults()
        self.to_station = to_station or LineFaults()
        self._station_master, self._station_slave, self.station_path = open_raw_pty()
        self._board_master, self._board_slave, self.board_path = open_raw_pty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="line-proxy", daemon=True)
        self._thread.start()

    def inject(self, *, to_station: bytes = b"", to_board: bytes = b"") -> None:
        """Write raw bytes (stale garbage, foreign frames) into a direction, unmangled."""
        if to_station:
            os.write(self._station_master, to_station)
        if to_board:
            os.write(self._board_master, to_board)

    def _forward(self, source: int, target: int, faults: LineFaults) -> None:
        try:
            data = os.read(source, 4096)
        except OSError:
            return  # the other side closed its slave; nothing to forward
        if faults.latency:
            time.sleep(faults.latency)
        data = faults.apply(data)
        rate = faults.bytes_per_second
        step = max(1, int(rate / 100)) if rate else len(data) or 1
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            os.write(target, piece)
            faults.forwarded += len(piece)
            if rate:
                time.sleep(len(piece) / rate)

    def _run(self) -> None:
        masters = [self._station_master, self._board_master]
        while not self._stop.is_set():
            ready, _, _ = select.select(masters, [], [], 0.02)
            if self._station_master in ready:
                self._forward(self._station_master, self._board_master, self.to_board)
            if self._board_master in ready:
                self._forward(self._board_master, self._station_master, self.to_station)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for fd in (
            self._station_master,
            self._station_slave,
            self._board_master,
            self._board_slave,
        ):
            os.close(fd)

    def __enter__(self) -> LineProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

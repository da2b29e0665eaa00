"""Many boards at once: one thread per serial port, progress lines, a table and a report file."""

from __future__ import annotations

import csv
import glob
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Final

from server.errors import ConfigError
from server.station.programmer import BoardProgrammer, BoardResult, Step, StepHook

REPORT_COLUMNS: Final = (
    "port",
    "mac",
    "client_id",
    "certificate_serial",
    "result",
    "duration_s",
    "error",
    "step",
)
_STEPS: Final = list(Step)
_BAR: Final = 20
DEFAULT_WATCH_GLOBS: Final = ("/dev/ttyUSB*", "/dev/ttyACM*")
MAX_PARALLEL_BOARDS: Final = 64  # threads; more plugged boards wait for a free one


def program_many(
    ports: Sequence[str],
    make_programmer: Callable[[StepHook | None], BoardProgrammer],
    on_step: StepHook | None = None,
) -> list[BoardResult]:
    """Program every port in parallel (one thread each); results in the order of ``ports``."""
    if len(set(ports)) != len(ports):
        raise ConfigError("a port is listed twice: one station thread per board")
    if not ports:
        return []
    with ThreadPoolExecutor(max_workers=len(ports), thread_name_prefix="station") as pool:
        return list(pool.map(lambda port: make_programmer(on_step).program(port), ports))


class PortWatcher:
    """Serial ports that appeared since the last poll, for a station watching its USB hub.

    A port is ready once two polls in a row have seen it (udev needs a moment to
    set its permissions); it is handed out once, and again only after it has
    disappeared (the board was unplugged and the next one plugged in).
    """

    def __init__(self, patterns: Iterable[str] = DEFAULT_WATCH_GLOBS) -> None:
        self.patterns = tuple(patterns)
        self._seen: set[str] = set()
        self._handed_out: set[str] = set()

    def present(self) -> set[str]:
        return {path for pattern in self.patterns for path in glob.glob(pattern)}

    def poll(self) -> list[str]:
        present = self.present()
        ready = sorted((present & self._seen) - self._handed_out)
        self._handed_out = (self._handed_out & present) | set(ready)
        self._seen = present
        return ready


def watch_ports(
    watcher: PortWatcher,
    make_programmer: Callable[[StepHook | None], BoardProgrammer],
    on_step: StepHook | None = None,
    *,
    count: int | None = None,
    poll_interval: float = 0.5,
    on_found: Callable[[str], None] | None = None,
) -> list[BoardResult]:
    """Program every board that gets plugged in until ``count`` boards or Ctrl-C.

    Ctrl-C stops the watching; boards already being programmed finish (each is
    bounded by the link's timeouts). Results come in the order boards finished.
    """
    results: list[BoardResult] = []
    running: set[Future[BoardResult]] = set()
    started = 0

    def collect(done: Iterable[Future[BoardResult]]) -> None:
        for future in done:
            running.discard(future)
            results.append(future.result())

    with ThreadPoolExecutor(MAX_PARALLEL_BOARDS, thread_name_prefix="station") as pool:
        try:
            while count is None or started < count:
                for port in watcher.poll()[: None if count is None else count - started]:
                    if on_found is not None:
                        on_found(port)
                    running.add(pool.submit(lambda p: make_programmer(on_step).program(p), port))
                    started += 1
                collect([f for f in running if f.done()])
                time.sleep(poll_interval)
        except KeyboardInterrupt:
            pass  # the operator ends the session: finish the boards on the bench
        collect(wait(running).done)
    return results


class ProgressPrinter:
    """A progress line per board and step: ``/dev/ttyUSB0  [#####.....]  commit``."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self.width = 0

    def __call__(self, port: str, step: Step) -> None:
        done = (_STEPS.index(step) + 1) * _BAR // len(_STEPS)
        with self._lock:
            self.width = max(self.width, len(port))
            bar = "#" * done + "." * (_BAR - done)
            self.stream.write(f"{port:<{self.width}}  [{bar}]  {step.value}\n")
            self.stream.flush()


def format_table(results: Sequence[BoardResult]) -> str:
    headers = ("PORT", "MAC", "CLIENT ID", "CERT SERIAL", "RESULT", "SECONDS", "ERROR")
    rows = [
        (
            r.port,
            r.mac or "-",
            r.client_id or "-",
            r.certificate_serial or "-",
            r.result,
            f"{r.duration_s:.2f}",
            r.error or "",
        )
        for r in results
    ]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]
    ok = sum(r.ok for r in results)
    lines.append(f"{ok} of {len(results)} boards programmed")
    return "\n".join(lines)


def write_report(path: Path, results: Sequence[BoardResult]) -> None:
    """Write the per-board report; the format follows the extension (.csv or .json)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ConfigError(f"report file {path} must end in .csv or .json")
    rows = [r.to_row() for r in results]
    if suffix == ".json":
        path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

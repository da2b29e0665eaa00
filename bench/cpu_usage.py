"""Where the CPU goes during a timed run: CPU seconds per process, and database commands.

Everything the benchmark starts shares the machine's cores, so the end-to-end rate is
(cores available) / (CPU per device, summed over every process). ``CpuMeter`` reads
``/proc/<pid>/stat`` (utime + stime: every thread of the process) for each named process
and ``/proc/stat`` for the whole machine before and after a run; the difference per
provisioned device says which part to make cheaper. "other" is the machine's busy time
not spent in the processes named (other users of a shared machine, the kernel's own
threads); a quiet machine shows it near zero.

The database's command count comes from its ``serverStatus``: ``network.numRequests``
(every command of every client: the servers', the benchmark's progress polling, the
drivers' monitoring) and ``opcounters`` (by kind), minus the commands the benchmark's
own client sent in the window (counted by a pymongo command listener), so the rest is
what the servers sent.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pymongo.monitoring

TICKS: Final = os.sysconf("SC_CLK_TCK")
OPCOUNTERS: Final = ("insert", "query", "update", "delete", "getmore", "command")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid`` so far (0 once it has gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the machine spent not idle (all cores), from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    return (sum(values[:8]) - values[3] - values[4]) / TICKS


class BenchCommandCounter(pymongo.monitoring.CommandListener):
    """Counts the commands this process's pymongo clients send (all threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def started(self, event: pymongo.monitoring.CommandStartedEvent) -> None:
        with self._lock:
            self.count += 1

    def succeeded(self, event: pymongo.monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: pymongo.monitoring.CommandFailedEvent) -> None:
        pass


BENCH_COMMANDS: Final = BenchCommandCounter()
pymongo.monitoring.register(BENCH_COMMANDS)


@dataclass(frozen=True)
class DbCounters:
    requests: int
    ops: dict[str, int]


def db_counters(server_status: Callable[[], Mapping[str, Any]]) -> DbCounters | None:
    """``serverStatus``'s request and operation counters; None if the server has none."""
    try:
        status = server_status()
        requests = int(status["network"]["numRequests"])
        ops = {kind: int(status["opcounters"].get(kind, 0)) for kind in OPCOUNTERS}
    except Exception:  # a server without them (or without the right): no count, no failure
        return None
    return DbCounters(requests, ops)


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds per process (and for the machine) over one timed window."""

    seconds: float
    """Wall time of the window."""
    processes: dict[str, float]
    machine_busy: float
    db_commands: int | None = None
    """Commands the database received from everyone but the benchmark's own client."""
    db_ops: dict[str, int] | None = None

    @property
    def other(self) -> float:
        return max(0.0, self.machine_busy - sum(self.processes.values()))

    def per_device_ms(self, devices: int) -> dict[str, float]:
        """CPU milliseconds per device by process, plus ``other`` and ``total`` (the machine)."""
        if devices <= 0:
            return {}
        out = {name: 1000 * cpu / devices for name, cpu in self.processes.items()}
        out["other"] = 1000 * self.other / devices
        out["total"] = 1000 * self.machine_busy / devices
        return out

    def cores(self) -> dict[str, float]:
        """Average cores busy during the window, by process (1.0 = one core all the time)."""
        if self.seconds <= 0:
            return {}
        out = {name: cpu / self.seconds for name, cpu in self.processes.items()}
        out["other"] = self.other / self.seconds
        out["total"] = self.machine_busy / self.seconds
        return out


class CpuMeter:
    """``start()`` then ``stop()`` around a run; ``pids`` is read at both ends."""

    def __init__(
        self,
        pids: Callable[[], Mapping[str, list[int]]],
        server_status: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.pids = pids
        self.server_status = server_status
        self._start: tuple[float, dict[str, float], float] | None = None
        self._db: DbCounters | None = None
        self._bench_commands = 0

    def _sample(self) -> dict[str, float]:
        return {
            name: sum(process_cpu_seconds(pid) for pid in pids)
            for name, pids in self.pids().items()
        }

    def start(self) -> None:
        if self.server_status is not None:
            self._db = db_counters(self.server_status)
        self._bench_commands = BENCH_COMMANDS.count
        self._start = (time.monotonic(), self._sample(), machine_busy_seconds())

    def stop(self) -> CpuUsage:
        assert self._start is not None, "CpuMeter.stop() before start()"
        wall, before, busy = self._start
        after, busy_after = self._sample(), machine_busy_seconds()
        seconds = time.monotonic() - wall
        commands = ops = None
        if self._db is not None and self.server_status is not None:
            bench_commands = BENCH_COMMANDS.count - self._bench_commands
            end = db_counters(self.server_status)
            if end is not None:
                # The benchmark's own commands in the window (progress polling, and the
                # serverStatus that opened it), not the servers'.
                commands = end.requests - self._db.requests - bench_commands
                ops = {k: end.ops[k] - self._db.ops[k] for k in OPCOUNTERS}
        return CpuUsage(
            seconds=seconds,
            processes={name: after.get(name, 0.0) - before.get(name, 0.0) for name in before},
            machine_busy=busy_after - busy,
            db_commands=commands,
            db_ops=ops,
        )

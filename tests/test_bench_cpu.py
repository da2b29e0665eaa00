"""The benchmark's CPU accounting: real processes' /proc counters, a real database's counters."""

from __future__ import annotations

import os
import subprocess
import sys

import pymongo

from bench.cpu_usage import CpuMeter, machine_busy_seconds, process_cpu_seconds

BURN = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\n"


def test_a_busy_process_is_charged_its_cpu_and_an_idle_one_nothing() -> None:
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy_before = machine_busy_seconds()
        meter = CpuMeter(lambda: {"burner": [burner.pid], "sleeper": [idle.pid]})
        burner = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()\n" + BURN],
                                  stdin=subprocess.PIPE)  # fmt: skip
        meter.start()
        assert burner.stdin is not None
        burner.stdin.close()  # now it burns 0.4 s of CPU
        while burner.poll() is None and process_cpu_seconds(burner.pid) < 0.4:
            pass
        usage = meter.stop()
        burner.wait()
    finally:
        idle.kill()
        idle.wait()
    assert 0.35 <= usage.processes["burner"] <= 0.6, usage
    assert usage.processes["sleeper"] < 0.05, usage
    # The machine was at least as busy as the burner (and this test's own polling).
    assert usage.machine_busy >= usage.processes["burner"] * 0.9
    assert machine_busy_seconds() > busy_before
    per_device = usage.per_device_ms(4)
    assert abs(per_device["burner"] - 1000 * usage.processes["burner"] / 4) < 1e-9
    assert per_device["total"] >= per_device["burner"] * 0.9
    assert process_cpu_seconds(os.getpid()) > 0
    assert process_cpu_seconds(2**22 + 7) == 0.0  # no such process


def test_database_commands_exclude_the_benchmarks_own(mongodb_uri: str) -> None:
    """Commands from another client count; this process's own (the bench client) do not."""
    ours: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(mongodb_uri)
    other = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pymongo\n"
         "c = pymongo.MongoClient(sys.argv[1])\n"
         "col = c.get_default_database()['cpu_meter']\n"
         "sys.stdin.read()\n"
         "for n in range(25): col.insert_one({'n': n})\n"
         "for n in range(5): col.find_one({'n': n})\n",
         mongodb_uri],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        meter = CpuMeter(lambda: {}, lambda: ours.admin.command("serverStatus"))
        meter.start()
        for n in range(40):  # the benchmark's own bookkeeping: not counted
            ours.get_default_database()["cpu_meter_bench"].find_one({"n": n})
        assert other.stdin is not None
        other.stdin.close()
        assert other.wait(30) == 0
        usage = meter.stop()
    finally:
        ours.close()
    assert usage.db_commands is not None and usage.db_ops is not None
    # 30 commands from the other client, plus its driver's handshake and monitoring.
    assert 30 <= usage.db_commands <= 40, usage
    assert usage.db_ops["insert"] == 25
    assert usage.db_ops["query"] >= 5

"""The README's main job, run as a user would: twice, without cleanup in between."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the demo's workdir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def test_demo_provisions_the_fleet_and_a_second_run_works(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    for run in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "harness.demo", "--workdir", str(tmp_path / "demo"),
             "--no-keep-running"],
            capture_output=True, text=True, timeout=240, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, f"run {run}: {proc.stderr[-3000:]}"
        rows = [line for line in proc.stdout.splitlines() if line.startswith("demo-board-")]
        statuses = sorted(line.split()[2] for line in rows)
        assert statuses == ["ACTIVE", "ACTIVE", "OFFLINE"], proc.stdout
        assert "mosquitto_sub" in proc.stdout and "device list" in proc.stdout
        metrics_lines = [line for line in proc.stdout.splitlines() if line.startswith("metrics:")]
        assert len(metrics_lines) == 1, proc.stdout
        assert re.fullmatch(r"metrics: http://127\.0\.0\.1:\d+/metrics", metrics_lines[0])
    # Everything it started (broker, database, server, agents) is gone.
    assert processes_mentioning(str(tmp_path / "demo")) == []


@pytest.mark.parametrize("interrupt_at", ["/dev/pts", "press Ctrl-C"])
def test_ctrl_c_stops_everything_it_started(tmp_path: Path, interrupt_at: str) -> None:
    """Ctrl-C while the station programs the boards, and once everything runs."""
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    workdir = tmp_path / "demo"
    with subprocess.Popen(
        [sys.executable, "-m", "harness.demo", "--workdir", str(workdir), "--keep-running"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    ) as proc:  # fmt: skip
        try:
            assert proc.stderr is not None
            seen = []
            for line in proc.stderr:
                seen.append(line)
                if interrupt_at in line:
                    break
            else:
                raise AssertionError("".join(seen))
            assert processes_mentioning(str(workdir)) != []
            proc.send_signal(signal.SIGINT)
            assert "stopping what the demo started" in proc.stderr.read()
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert processes_mentioning(str(workdir)) == []

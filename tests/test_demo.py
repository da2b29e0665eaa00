"""The README's main job, run as a user would: twice, without cleanup in between."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


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
            [sys.executable, "-m", "server.demo", "--workdir", str(tmp_path / "demo"),
             "--no-keep-running"],
            capture_output=True, text=True, timeout=240, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, f"run {run}: {proc.stderr[-3000:]}"
        rows = [line for line in proc.stdout.splitlines() if line.startswith("demo-board-")]
        statuses = sorted(line.split()[2] for line in rows)
        assert statuses == ["ACTIVE", "ACTIVE", "OFFLINE"], proc.stdout
        assert "mosquitto_sub" in proc.stdout and "device list" in proc.stdout
    # Everything it started (broker, database, server, agents) is gone.
    assert processes_mentioning(str(tmp_path / "demo")) == []

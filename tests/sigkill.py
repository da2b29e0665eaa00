"""Kill a child Python script with SIGKILL at a random moment of its work."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time


def kill_at_random_point(script: str, args: list[str], rng: random.Random, max_delay: float) -> int:
    """Run ``script`` (it prints ``ready`` before its work), SIGKILL it after a random delay.

    Returns the child's return code (``-SIGKILL`` unless it finished first).
    """
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, max_delay))
        child.send_signal(signal.SIGKILL)
        return child.wait()
    finally:
        child.stdout.close()

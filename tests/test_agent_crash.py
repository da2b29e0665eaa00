"""SIGKILL the real agent at each state of provisioning; a restart must converge.

Converged means: ACTIVE on the device and in MongoDB, exactly one active certificate,
the key on disk matches it, no stray operational key, and no certificate was issued
twice (nothing was superseded, so nothing is on the revocation list).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.store.schema import CERTIFICATE_REVOCATIONS
from tests.test_agent_provisioning import (
    REPO,
    AgentProcess,
    Fleet,
    agent_factory,  # noqa: F401 (fixture)
    assert_converged,
    fleet_factory,  # noqa: F401 (fixture)
    wait_for,
)

pytestmark = pytest.mark.slow

ORDER = ["UNPROVISIONED", "NEED_TOKEN", "HAVE_TOKEN", "CSR_SENT", "CERT_STORED", "ACTIVE"]


def _state_now(agent: AgentProcess) -> str:
    try:
        return str(json.loads((agent.state_dir / "state.json").read_text()).get("state", ""))
    except (FileNotFoundError, json.JSONDecodeError):
        return ""


def kill_at(agent: AgentProcess, target: str, timeout: float = 30) -> str:
    """SIGKILL as soon as state.json shows ``target`` (or a later state); return what was hit."""
    assert agent.process is not None
    wanted = ORDER.index(target)
    deadline = time.monotonic() + timeout
    while True:
        state = _state_now(agent)
        if state in ORDER and ORDER.index(state) >= wanted:
            agent.process.send_signal(signal.SIGKILL)
            break
        assert agent.process.poll() is None, agent.log_text()
        assert time.monotonic() < deadline, f"never reached {target}:\n{agent.log_text()}"
        time.sleep(0.0005)
    agent.process.wait(10)
    agent.process = None
    return _state_now(agent)  # what the crash left on disk


@pytest.mark.parametrize("target", ORDER[1:])
def test_sigkill_at_each_state_then_restart_converges(
    target: str,
    fleet_factory: Callable[..., Fleet],  # noqa: F811
    agent_factory: Callable[..., AgentProcess],  # noqa: F811
) -> None:
    fleet = fleet_factory()
    if target != "NEED_TOKEN":
        fleet.allocate()
    agent = agent_factory(fleet)
    agent.start()
    if target == "NEED_TOKEN":  # deterministic: an unallocated device waits in NEED_TOKEN
        wait_for(lambda: "event=waiting_for_allocation" in agent.log_text(), 30, "NOT_ALLOCATED")
    hit = kill_at(agent, target)
    assert ORDER.index(hit) >= ORDER.index(target), hit
    if target == "NEED_TOKEN":
        assert hit == "NEED_TOKEN"
        fleet.allocate()
    agent.start()
    assert_converged(fleet, agent)
    revoked = list(fleet.database.collection(CERTIFICATE_REVOCATIONS).find({}))
    assert revoked == [], f"a second certificate was issued after a crash at {hit}"


def test_repeated_crashes_converge(
    fleet_factory: Callable[..., Fleet],  # noqa: F811
    agent_factory: Callable[..., AgentProcess],  # noqa: F811
) -> None:
    """Kill the agent again and again early in its life; it still ends with one certificate."""
    fleet = fleet_factory()
    fleet.allocate()
    agent = agent_factory(fleet)
    for delay in (0.05, 0.15, 0.25, 0.35, 0.5):
        agent.start()
        time.sleep(delay)
        agent.kill(signal.SIGKILL)
    agent.start()
    assert_converged(fleet, agent)


def test_stop_signal_pending_at_a_restart_stops_the_new_process(tmp_path: Path) -> None:
    """A restart (``exec_service``) keeps SIGTERM/SIGINT blocked across ``execve``; the new
    service process takes the pending signal once its handler is in place and exits 0,
    instead of running on with the stop lost (or dying by the signal)."""
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\n')
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from agent.runner import STOP_SIGNALS, exec_service, service_argv\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)\n"
        "os.kill(os.getpid(), signal.SIGTERM)  # arrives while the process switches\n"
        "exec_service(service_argv(Path(sys.argv[1]), False))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_AGENT_")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(config)],
        cwd=REPO, env=env, capture_output=True, timeout=30,
    )  # fmt: skip
    log = done.stderr.decode()
    assert done.returncode == 0, log
    assert "event=start" in log and "event=exit" in log, log

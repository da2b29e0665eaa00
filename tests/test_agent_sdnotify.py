"""The agent as systemd sees it: READY, STATUS, WATCHDOG and STOPPING on a real socket."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_agent_provisioning import (
    AgentProcess,
    Fleet,
    agent_factory,  # noqa: F401 (fixture)
    fleet_factory,  # noqa: F401 (fixture)
    wait_for,
)


def test_agent_notifies_systemd_over_a_real_datagram_socket(
    fleet_factory: Callable[..., Fleet],  # noqa: F811
    agent_factory: Callable[..., AgentProcess],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # 1 s: the agent pings every 0.5 s
    messages: list[str] = []

    def drain() -> None:
        while True:
            try:
                messages.append(receiver.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return

    try:
        fleet = fleet_factory()
        fleet.allocate()
        agent = agent_factory(fleet)
        agent.start()

        def active() -> bool:
            drain()
            return fleet.status() == "ACTIVE"

        wait_for(active, 40, "ACTIVE")
        time.sleep(1.5)
        drain()
        lines = [line for m in messages for line in m.splitlines()]
        assert "READY=1" in lines
        assert sum(line == "WATCHDOG=1" for line in lines) >= 2
        statuses = [line for line in lines if line.startswith("STATUS=")]
        assert statuses and any("ACTIVE" in s for s in statuses), statuses
        assert not any("BEGIN" in m or '"token"' in m or "sha256:" in m for m in messages)
        assert agent.kill(signal.SIGTERM) == 0
        drain()
        assert any("STOPPING=1" in m for m in messages)
    finally:
        receiver.close()

"""SIGTERM when the broker is already gone: the agent still exits 0, promptly."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from tests.test_agent_provisioning import (
    AgentProcess,
    Fleet,
    agent_factory,  # noqa: F401 (fixture)
    assert_converged,
    fleet_factory,  # noqa: F401 (fixture)
)


def test_sigterm_without_a_broker_exits_cleanly_and_quickly(
    fleet_factory: Callable[..., Fleet],  # noqa: F811
    agent_factory: Callable[..., AgentProcess],  # noqa: F811
) -> None:
    fleet = fleet_factory()
    fleet.allocate()
    agent = agent_factory(fleet)
    agent.start()
    assert_converged(fleet, agent)
    fleet.broker.mosquitto.stop()
    time.sleep(0.5)
    started = time.monotonic()
    assert agent.kill(signal.SIGTERM) == 0
    # systemd's stop timeout is 90 s by default; a board must not sit there.
    assert time.monotonic() - started < 10, agent.log_text()[-2000:]

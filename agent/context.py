"""What provisioning and the operational session share about one device.

``AgentRunner`` builds one ``DeviceContext`` per state run and hands it to
``Provisioner`` or ``OperationalSession``. This module is imported by the
long-running ACTIVE service: it must not import cryptography (or click).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.birth import BirthIdentity, Endpoints
from agent.config import TimingConfig
from agent.state import StateStore
from agent.storage import CertificateStore

Sleep = Callable[[float], bool]  # sleeps up to n seconds; True when the agent must stop


def _no_tick() -> None:
    return None


@dataclass(frozen=True)
class DeviceContext:
    """Who the device is, where it connects, where it keeps its state, and how it waits.

    ``key_dir`` is a directory, not a key store: opening the key store loads
    cryptography, which only provisioning and renewal may do.
    ``tick`` is called from waiting loops (watchdog and STATUS in the runner).
    """

    identity: BirthIdentity
    endpoints: Endpoints
    ca_file: Path
    timing: TimingConfig
    states: StateStore
    key_dir: Path
    certs: CertificateStore
    sleep: Sleep
    stop: threading.Event
    tick: Callable[[], None] = _no_tick

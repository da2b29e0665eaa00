"""The agent's one state machine and its crash-safe record (``state.json``).

States, in the order a healthy device walks them::

    UNPROVISIONED  no (finalized) birth identity yet; wait for the factory
    NEED_TOKEN     ask the provisioning listener for a single-use token
    HAVE_TOKEN     token (and its expiry) persisted; next: key + CSR
    CSR_SENT       key slot + CSR persisted before the first send, so every retry
                   resends the SAME CSR with the SAME token (the server answers
                   with the same certificate)
    CERT_STORED    certificate stored and live; next: connect
    ACTIVE         operational mTLS session (reconnects stay in ACTIVE)
    RENEWING       renewal key + CSR persisted; the old certificate stays live
                   until the new one has connected
    REJECTED       a non-retryable error; retried only at ``retry_at`` (long delay)

Every change goes through ``StateStore.save`` (atomic JSON, 0600) and is
logged as one ``key=value`` line. The token is persisted but never logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Final

from agent.errors import StorageError
from agent.storage import ensure_private_dir, read_json, write_json_atomic

STATE_FILE: Final = "state.json"
# A REJECTED device retries after this many times the backoff cap (1 h by default).
REJECTED_RETRY_FACTOR: Final = 12.0
log = logging.getLogger("agent.state")


class AgentState(str, Enum):
    UNPROVISIONED = "UNPROVISIONED"
    NEED_TOKEN = "NEED_TOKEN"  # noqa: S105 (a state name)
    HAVE_TOKEN = "HAVE_TOKEN"  # noqa: S105 (a state name)
    CSR_SENT = "CSR_SENT"
    CERT_STORED = "CERT_STORED"
    ACTIVE = "ACTIVE"
    RENEWING = "RENEWING"
    REJECTED = "REJECTED"


# Fields that must never reach a log line.
_SECRET_FIELDS: Final = frozenset({"token", "csr"})


@dataclass(frozen=True)
class StateRecord:
    """What survives a crash. Times are Unix seconds (wall clock)."""

    state: AgentState = AgentState.UNPROVISIONED
    token: str | None = None
    token_expires_at: float | None = None
    # The operational key being provisioned/renewed, and the CSR made with it.
    key_slot: str | None = None
    csr: str | None = None
    # Monotonic counter for key slot names ("op-1", "op-2", ...): a slot is never reused.
    slot_counter: int = 0
    cert_version: int | None = None
    cert_serial: str | None = None
    renew_version: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_at: float | None = None
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        obj["state"] = self.state.value
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: Path) -> StateRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in obj.items() if k in known}
        try:
            values["state"] = AgentState(values.get("state", AgentState.UNPROVISIONED.value))
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise StorageError(f"{where}: invalid agent state ({exc})") from None


def format_fields(**values: object) -> str:
    """``key=value`` pairs for one log line; values with spaces are quoted."""
    parts = []
    for key, value in values.items():
        if value is None:
            continue
        text = str(value.value if isinstance(value, Enum) else value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


class StateStore:
    """Reads and writes ``<state_dir>/state.json``; logs every transition."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / STATE_FILE

    def load(self) -> StateRecord:
        obj = read_json(self.path)
        return StateRecord() if obj is None else StateRecord.from_json(obj, self.path)

    def save(self, record: StateRecord) -> StateRecord:
        ensure_private_dir(self.state_dir)
        record = replace(record, updated_at=time.time())
        write_json_atomic(self.path, record.to_json())
        return record

    def transition(
        self, record: StateRecord, new: AgentState, reason: str = "", **changes: Any
    ) -> StateRecord:
        """Persist ``record`` moved to ``new`` with ``changes`` applied; log one line."""
        updated = self.save(replace(record, state=new, **changes))
        shown = {k: v for k, v in changes.items() if k not in _SECRET_FIELDS}
        if "token" in changes:
            shown["token"] = "set" if changes["token"] else "cleared"
        log.info(
            "%s",
            format_fields(
                **{"event": "state", "from": record.state, "to": new, "reason": reason or None},
                **shown,
            ),
        )
        return updated

    def update(self, record: StateRecord, **changes: Any) -> StateRecord:
        """Persist changes that keep the state (no transition line)."""
        return self.save(replace(record, **changes))

    def next_slot(self, record: StateRecord, prefix: str = "op") -> tuple[StateRecord, str]:
        """Reserve a fresh key slot name and persist the counter before the key exists."""
        counter = record.slot_counter + 1
        return self.update(record, slot_counter=counter), f"{prefix}-{counter}"

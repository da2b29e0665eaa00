"""Batched status writes: many devices' online/offline changes in one bulk write.

Status messages are the bulk of the database traffic (every connect, every
heartbeat past the throttle, and the broker's replay of every retained status
when a server subscribes). Each change is still guarded by the expected
status, but they travel to MongoDB as one unordered ``bulk_write`` per
interval: one round trip for hundreds of devices (design.md §7).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from pymongo import UpdateOne

from server.db import Database, Document
from server.errors import DatabaseUnavailable
from server.schema import DEVICES, DeviceStatus

log = logging.getLogger("provision.server")


@dataclass(frozen=True)
class StatusChange:
    expected: frozenset[DeviceStatus]
    new: DeviceStatus
    fields: Document


class StatusBatcher:
    """Collects the latest status change per device and writes them together."""

    def __init__(self, database: Database, interval: float = 0.2, max_batch: int = 1000) -> None:
        self.database = database
        self.interval = interval
        self.max_batch = max_batch
        self._pending: dict[str, StatusChange] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0

    def submit(self, client_id: str, change: StatusChange) -> None:
        """Queue a change; a later one for the same device replaces it (latest wins)."""
        with self._lock:
            self._pending[client_id] = change
            full = len(self._pending) >= self.max_batch
        if full:
            self._wake.set()

    def flush(self) -> int:
        """Write what is pending now; returns how many devices changed status."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        operations: list[UpdateOne] = [
            UpdateOne(
                {"clientId": client_id, "status": {"$in": [s.value for s in change.expected]}},
                {"$set": {"status": change.new.value, **change.fields}},
            )
            for client_id, change in batch.items()
        ]
        try:
            result: Any = self.database.call(
                lambda: self.database.collection(DEVICES).bulk_write(operations, ordered=False)
            )
        except DatabaseUnavailable:
            with self._lock:  # keep them, unless a newer change arrived meanwhile
                self._pending = {**batch, **self._pending}
            raise
        self.written += len(batch)
        log.info("event=status-batch devices=%d matched=%d", len(batch), result.matched_count)
        return int(result.modified_count)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except DatabaseUnavailable as exc:
                log.warning("event=status-batch result=retry reason=%r", exc.message[:160])
                self._stop.wait(1.0)
            except Exception:
                log.exception("event=status-batch result=internal-error")

    def start(self) -> StatusBatcher:
        self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and write what is still pending."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
        except DatabaseUnavailable as exc:
            log.warning("event=status-batch result=lost-on-stop reason=%r", exc.message[:160])

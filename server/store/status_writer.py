"""Batched status writes: many devices' online/offline changes in one bulk write.

Status messages are the bulk of the database traffic (every connect, every
heartbeat past the throttle). Each change is still guarded by the expected
status, but they travel to MongoDB as unordered ``bulk_write``s: one round trip
for up to ``max_batch`` devices (design.md §7).

Group commit, no timer: the writer thread writes as soon as a change arrives;
the changes that arrive while it is writing form its next bulk. A lone device
is written at once (no fixed wait on its way to ACTIVE) and a busy server gets
bulks as large as its database is slow.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from pymongo import UpdateOne

from server.errors import DatabaseUnavailable
from server.store.db import Database, Document
from server.store.schema import DEVICES, DeviceStatus

log = logging.getLogger("provision.server")


@dataclass(frozen=True)
class StatusChange:
    expected: frozenset[DeviceStatus]
    new: DeviceStatus
    fields: Document


class StatusBatcher:
    """Collects the latest status change per device and writes them together."""

    def __init__(self, database: Database, max_batch: int = 100) -> None:
        self.database = database
        self.max_batch = max_batch
        self._pending: dict[str, StatusChange] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.batches = 0

    def submit(self, client_id: str, change: StatusChange) -> None:
        """Queue a change; a later one for the same device replaces it (latest wins)."""
        with self._lock:
            self._pending[client_id] = change
        self._wake.set()

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write what is pending now, ``max_batch`` devices per bulk write.

        Small bulks keep each call well inside the socket timeout: the embedded
        database handles about 1,700 updates/s in bulks of 100 (design.md §7),
        and one bulk of thousands could time out and be retried forever.
        Returns how many devices changed status.
        """
        with self._lock:
            batch, self._pending = self._pending, {}
        items = list(batch.items())
        modified = 0
        for start in range(0, len(items), self.max_batch):
            chunk = items[start : start + self.max_batch]
            try:
                modified += self._write(chunk)
            except DatabaseUnavailable:
                with self._lock:  # keep the rest, unless a newer change arrived meanwhile
                    self._pending = {**dict(items[start:]), **self._pending}
                raise
        return modified

    def _write(self, chunk: list[tuple[str, StatusChange]]) -> int:
        operations: list[UpdateOne] = [
            UpdateOne(
                {"clientId": client_id, "status": {"$in": [s.value for s in change.expected]}},
                {"$set": {"status": change.new.value, **change.fields}},
            )
            for client_id, change in chunk
        ]
        result: Any = self.database.call(
            lambda: self.database.collection(DEVICES).bulk_write(operations, ordered=False)
        )
        self.written += len(chunk)
        self.batches += 1
        log.info("event=status-batch devices=%d matched=%d", len(chunk), result.matched_count)
        return int(result.modified_count)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            try:
                self.flush()
            except DatabaseUnavailable as exc:
                log.warning("event=status-batch result=retry reason=%r", exc.message[:160])
                self._stop.wait(1.0)
                self._wake.set()  # the kept changes are retried without a new arrival
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

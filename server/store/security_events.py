"""``security_events`` (ours): what the server refused because it looked like an attack.

Today one kind: ``probable-clone``, a token request with a device's birth certificate
while that device holds a live operational session. The document is
``{device_id, kind, at, detail}``. Writes are throttled per device and kind
(``min_interval`` seconds, per server process), so a client asking in a loop cannot
grow the collection faster than that.
"""

from __future__ import annotations

import threading
import time
from typing import Final

from bson import ObjectId

from server.store.db import Database, Document
from server.store.devices import utcnow
from server.store.schema import SECURITY_EVENTS

PROBABLE_CLONE: Final = "probable-clone"


class SecurityEvents:
    MAX_TRACKED: Final = 100_000

    def __init__(self, database: Database, min_interval: float = 60.0) -> None:
        self.database = database
        self.collection = database.collection(SECURITY_EVENTS)
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}

    def record(self, device_id: str, kind: str, detail: str) -> bool:
        """Insert one event unless the same one was recorded moments ago; True if written."""
        now = time.monotonic()
        key = (device_id, kind)
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.min_interval:
                return False
            if len(self._last) >= self.MAX_TRACKED:
                self._last = {k: v for k, v in self._last.items() if now - v < self.min_interval}
            self._last[key] = now
        doc: Document = {
            "_id": ObjectId(),
            "device_id": device_id,
            "kind": kind,
            "at": utcnow(),
            "detail": detail[:512],
        }
        self.database.call(lambda: self.collection.insert_one(doc))
        return True

    def of(self, device_id: str) -> list[Document]:
        return self.database.call(
            lambda: list(self.collection.find({"device_id": device_id}).sort("at", 1))
        )

"""No scan on a periodic path: the offline sweep reads only the devices it turns OFFLINE.

Proof by the database's own explain (tests/index_plan.py): the sweep's query is bounded
by the status+lastSeenAt index, so the documents it examines are the silent devices,
not every ACTIVE device of the fleet (it runs every 10 s on every server).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from server.store.db import Database, Document
from server.store.devices import DeviceRepository, silent_query
from server.store.schema import DEVICES, DeviceStatus
from tests.index_plan import assert_index_bounded


def _device(n: int, status: DeviceStatus, seen: datetime | None) -> Document:
    doc: Document = {"clientId": f"d-{n:05d}", "macID": f"m-{n:05d}", "status": status.value}
    if seen is not None:
        doc["lastSeenAt"] = seen
    return doc


def test_the_offline_sweep_examines_only_the_silent_devices(database: Database) -> None:
    devices = database.collection(DEVICES)
    now = datetime.now(timezone.utc)
    long_ago = now - timedelta(hours=1)
    fleet = (
        [_device(n, DeviceStatus.ACTIVE, now) for n in range(2000)]  # heard from lately
        + [_device(2000 + n, DeviceStatus.ACTIVE, long_ago) for n in range(7)]  # silent
        + [_device(3000 + n, DeviceStatus.OFFLINE, long_ago) for n in range(300)]  # swept
        + [_device(4000 + n, DeviceStatus.ALLOCATED, None) for n in range(100)]  # never seen
    )
    devices.insert_many(fleet)
    cutoff = now - timedelta(minutes=3)

    # 7 documents examined of 2,407: neither the 2,000 ACTIVE ones nor the OFFLINE ones.
    assert_index_bounded(devices, silent_query(cutoff), {"status": 1, "lastSeenAt": 1}, returned=7)
    assert DeviceRepository(database).mark_silent_offline(cutoff) == 7
    assert devices.count_documents({"clientId": {"$regex": "^d-020"}, "status": "OFFLINE"}) == 7
    assert DeviceRepository(database).mark_silent_offline(cutoff) == 0

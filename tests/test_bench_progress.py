"""The benchmark's progress polling: the batch's own devices, by clientId, never a scan.

Regression for the "one device of 1,000 never reached ACTIVE" of the 2-server run
(issue 14): the benchmark counted ``{status: ACTIVE, lastSeenAt >= start}`` over the
whole collection, so a device outside the batch whose status was written after the
start (a retained status handled late by a starting server) counted for the batch; the
run ended with a device of the batch still on its way to ACTIVE and read it as lost.
"""

from __future__ import annotations

from datetime import datetime, timezone

from bench.batch_progress import BatchProgress, batch_query, lookup_statuses
from server.store.db import Database, Document
from server.store.schema import DEVICES, DeviceStatus
from tests.index_plan import assert_index_bounded


def _device(client_id: str, status: DeviceStatus, seen: datetime | None = None) -> Document:
    doc: Document = {"clientId": client_id, "macID": f"mac-{client_id}", "status": status.value}
    if seen is not None:
        doc["lastSeenAt"] = seen
    return doc


def test_devices_outside_the_batch_never_complete_it(database: Database) -> None:
    devices = database.collection(DEVICES)
    now = datetime.now(timezone.utc)
    batch = ["b-0", "b-1", "b-2"]
    devices.insert_many(
        [_device("b-0", DeviceStatus.ACTIVE, now), _device("b-1", DeviceStatus.ACTIVE, now)]
        + [_device("b-2", DeviceStatus.PROVISIONED)]
        # Earlier devices whose status a server rewrote after the batch started: a count
        # over the collection sees 2 + 5 ACTIVE devices "since the start" for a batch of 3.
        + [_device(f"old-{n}", DeviceStatus.ACTIVE, now) for n in range(5)]
    )
    progress = BatchProgress(devices, batch)
    assert progress.poll() == 0  # no client has finished: nothing is looked up
    for client_id in batch:
        progress.finished(client_id)

    assert progress.poll() == 2
    assert not progress.done and progress.pending == {"b-2"}
    assert lookup_statuses(devices, ["b-2", "never-registered"]) == {
        "b-2": "PROVISIONED",
        "never-registered": "missing",
    }

    devices.update_one({"clientId": "b-2"}, {"$set": {"status": DeviceStatus.ACTIVE.value}})
    assert progress.poll() == 3 and progress.done


def test_a_device_seen_active_stays_counted_and_is_not_asked_again(database: Database) -> None:
    devices = database.collection(DEVICES)
    devices.insert_many([_device("a", DeviceStatus.ACTIVE), _device("b", DeviceStatus.PROVISIONED)])
    progress = BatchProgress(devices, ["a", "b"])
    progress.finished("a")
    progress.finished("b")
    assert progress.poll() == 1
    # The next poll asks only about "b"; "a" going OFFLINE (a real board's will) later
    # does not undo the moment it was first ACTIVE, which is what the rate measures.
    devices.update_one({"clientId": "a"}, {"$set": {"status": DeviceStatus.OFFLINE.value}})
    assert progress.poll() == 1 and progress.pending == {"b"}


def test_progress_lookups_read_only_the_batch_documents(database: Database) -> None:
    devices = database.collection(DEVICES)
    now = datetime.now(timezone.utc)
    devices.insert_many(
        [_device(f"fleet-{n:04d}", DeviceStatus.ACTIVE, now) for n in range(1000)]
        + [_device(f"batch-{n}", DeviceStatus.PROVISIONED) for n in range(20)]
    )
    pending = [f"batch-{n}" for n in range(20)]
    # 20 documents of 1,020, found through the unique clientId index, nothing re-checked.
    assert_index_bounded(devices, batch_query(pending), {"clientId": 1}, returned=20)

"""Group commit on a real MongoDB-wire server: shared round trips, one answer per operation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from bench.db_proxy import LatencyProxy
from server.errors import DatabaseUnavailable
from server.store.db import Database, Document
from server.store.schema import DEVICE_ACLS, DEVICES


@pytest.fixture
def grouped(database: Database) -> Iterator[Database]:
    database.start_group_commit()
    try:
        yield database
    finally:
        database.stop_group_commit()


def together(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls on as many threads, released at once; results (or errors) in order."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = calls[index]()
        except BaseException as exc:  # handed back to the test
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def _device(n: int, status: str) -> Document:
    return {"clientId": f"g-{n:03d}", "macID": f"02:00:00:00:{n >> 8:02X}:{n & 255:02X}",
            "status": status, "tokenUsed": False}  # fmt: skip


def test_concurrent_inserts_share_commands_and_a_duplicate_is_told_apart(
    grouped: Database,
) -> None:
    grouped.collection(DEVICE_ACLS).insert_one({"device_id": "taken", "tier": "1"})
    docs = [{"device_id": f"acl-{n}", "tier": "1"} for n in range(40)]
    docs.append({"device_id": "taken", "tier": "2"})
    results = together([partial(grouped.insert_new, DEVICE_ACLS, d) for d in docs])

    assert results == [True] * 40 + [False]
    assert grouped.collection(DEVICE_ACLS).count_documents({}) == 41
    assert grouped.collection(DEVICE_ACLS).find_one({"device_id": "taken"})["tier"] == "1"  # type: ignore[index]
    group = grouped.group
    assert group is not None and group.operations == 41
    assert group.batches < group.operations  # requests in flight shared round trips


def test_each_guarded_update_learns_whether_it_matched(grouped: Database) -> None:
    devices = grouped.collection(DEVICES)
    devices.insert_many([_device(n, "ALLOCATED" if n % 2 else "UNALLOCATED") for n in range(30)])

    def issue(n: int) -> bool:
        guard = {"clientId": f"g-{n:03d}", "status": {"$in": ["ALLOCATED", "PROVISIONING"]}}
        update = {"$set": {"status": "PROVISIONING", "provisioningToken": f"sha256:{n}"}}
        return grouped.update_guarded(
            DEVICES, ("clientId", f"g-{n:03d}"), guard, update, ("provisioningToken", f"sha256:{n}")
        )

    results = together([partial(issue, n) for n in range(30)])

    assert results == [n % 2 == 1 for n in range(30)]
    assert devices.count_documents({"status": "PROVISIONING"}) == 15
    assert (
        devices.count_documents({"status": "UNALLOCATED", "provisioningToken": {"$exists": True}})
        == 0
    )


def test_two_updates_racing_for_one_guard_have_exactly_one_winner(grouped: Database) -> None:
    grouped.collection(DEVICES).insert_one(_device(1, "PROVISIONING"))

    def sign(serial: str) -> bool:
        guard = {"clientId": "g-001", "status": "PROVISIONING", "tokenUsed": False}
        update = {"$set": {"status": "PROVISIONED", "tokenUsed": True, "certificateSerial": serial}}
        return grouped.update_guarded(
            DEVICES, ("clientId", "g-001"), guard, update, ("certificateSerial", serial)
        )

    for _ in range(5):
        grouped.collection(DEVICES).update_one(
            {"clientId": "g-001"}, {"$set": {"status": "PROVISIONING", "tokenUsed": False}}
        )
        results = together([partial(sign, s) for s in ("AA01", "BB02", "CC03")])
        assert sorted(results, key=str) == [False, False, True]
        winner = ("AA01", "BB02", "CC03")[results.index(True)]
        stored = grouped.collection(DEVICES).find_one({"clientId": "g-001"})
        assert stored is not None and stored["certificateSerial"] == winner


def test_lookups_by_a_unique_key_are_answered_each_with_its_document(grouped: Database) -> None:
    grouped.collection(DEVICES).insert_many([_device(n, "ACTIVE") for n in range(10)])
    keys = [f"g-{n:03d}" for n in range(10)] + ["g-404"]
    results = together(
        [partial(grouped.find_by, DEVICES, ("clientId", k), ["status"]) for k in keys]
    )
    for key, found in zip(keys[:10], results[:10], strict=True):
        assert isinstance(found, dict) and found["clientId"] == key and found["status"] == "ACTIVE"
        assert "macID" not in found
    assert results[10] is None


def test_without_a_committer_the_same_helpers_answer_the_same(database: Database) -> None:
    database.collection(DEVICES).insert_one(_device(7, "ALLOCATED"))
    assert database.insert_new(DEVICES, _device(8, "ALLOCATED"))
    assert not database.insert_new(DEVICES, _device(8, "ALLOCATED"))
    guard = {"clientId": "g-007", "status": "ALLOCATED"}
    update = {"$set": {"status": "PROVISIONING", "provisioningToken": "sha256:x"}}
    key, proof = ("clientId", "g-007"), ("provisioningToken", "sha256:x")
    assert database.update_guarded(DEVICES, key, guard, update, proof)
    assert not database.update_guarded(DEVICES, key, guard, update, proof)
    assert database.find_by(DEVICES, key, ["status"]) == {
        "_id": database.collection(DEVICES).find_one({"clientId": "g-007"})["_id"],  # type: ignore[index]
        "clientId": "g-007",
        "status": "PROVISIONING",
    }


def test_an_unreachable_database_is_unavailable_to_every_waiting_request() -> None:
    database = Database("mongodb://127.0.0.1:9/nowhere?retryWrites=false", timeout_ms=300)
    database.start_group_commit()
    try:
        results = together(
            [partial(database.insert_new, DEVICE_ACLS, {"device_id": f"x{n}"}) for n in range(5)]
        )
    finally:
        database.close()
    assert all(isinstance(r, DatabaseUnavailable) for r in results), results


def test_find_all_answers_each_request_with_all_its_documents(grouped: Database) -> None:
    ledger = grouped.collection("certificate_issuances")
    ledger.insert_many(
        [{"serial": f"S{n}", "device_id": f"dev-{n % 4}", "state": "current"} for n in range(12)]
    )
    keys = ["dev-0", "dev-1", "dev-3", "dev-none"]
    results = together(
        [partial(grouped.find_all_by, "certificate_issuances", ("device_id", k)) for k in keys]
    )
    serials = [sorted(str(doc["serial"]) for doc in found) for found in results]  # type: ignore[attr-defined]
    assert serials == [["S0", "S4", "S8"], ["S1", "S5", "S9"], ["S11", "S3", "S7"], []]


def _insert_later(database: Database, delay: float, doc: Document) -> bool:
    time.sleep(delay)
    return database.insert_new(DEVICE_ACLS, doc)


@pytest.mark.parametrize("in_flight", [1, 3])
def test_batches_in_flight_bound_how_finely_requests_are_split(
    mongodb_uri: str, tmp_path: Path, in_flight: int
) -> None:
    """With one batch out at a time, what arrives during its round trip goes as one.

    The database is 100 ms away (the benchmark's latency proxy); 40 inserts arrive in
    4 waves 20 ms apart. One slot: the first batch goes, everything after it waits for
    its round trip and goes together (2 batches; 3 if the first wave was split). Three
    slots: each wave finds one free and goes on its own (4 or more).
    """
    with LatencyProxy(mongodb_uri, 100, tmp_path / "proxy.log") as proxy:
        database = Database(proxy.uri)
        group = database.start_group_commit(in_flight)
        try:
            database.ping()
            calls: list[Callable[[], object]] = [
                partial(_insert_later, database, 0.02 * (n // 10),
                        {"device_id": f"slot-{in_flight}-{n}", "tier": "1"})
                for n in range(40)
            ]  # fmt: skip
            results = together(calls)
        finally:
            database.close()
    assert results == [True] * 40
    assert group.in_flight == in_flight and group.operations == 40
    if in_flight == 1:
        assert group.batches <= 3
    else:
        assert group.batches >= 4

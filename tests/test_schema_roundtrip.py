"""Our documents against the web app's schema, on the real MongoDB-wire server."""

from __future__ import annotations

import threading
from datetime import datetime

import pymongo.errors
import pytest
from bson import ObjectId

from server.errors import DeviceConflict, UnknownDevice, WrongState
from server.store.db import Database
from server.store.devices import DeviceRepository, utcnow
from server.store.schema import DEVICE_FIELDS, DEVICES, INDEXES, USERS, WEB_APP_COLLECTIONS
from server.store.users import UserRepository
from tests.dbdump import snapshot


def test_init_creates_the_five_collections_and_every_seed_index(database: Database) -> None:
    names = set(database.db.list_collection_names())
    assert set(WEB_APP_COLLECTIONS) <= names
    for spec in INDEXES:
        info = database.collection(spec.collection).index_information()
        matching = [i for i in info.values() if [k for k, _ in i["key"]] == [spec.field]]
        assert len(matching) == 1, spec
        assert bool(matching[0].get("unique", False)) == spec.unique, spec


def test_init_is_idempotent_and_accepts_the_web_apps_own_index_names(
    mongodb_uri: str,
) -> None:
    database = Database(mongodb_uri)
    try:
        # The web app (Prisma) got there first, under its own index names.
        database.collection(DEVICES).create_index("macID", unique=True, name="Device_macID_key")
        database.collection(DEVICES).insert_one({"macID": "AA:00:00:00:00:01", "extra": 1})
        first = database.init()
        assert "devices.macID (unique)" in first.present
        second = database.init()
        assert second.created == ()
        assert database.collection(DEVICES).count_documents({}) == 1
    finally:
        database.close()


def test_added_device_has_exactly_the_seed_fields_and_bson_types(database: Database) -> None:
    repo = DeviceRepository(database)
    repo.add("aa-bb-cc-dd-ee-01", "board-1")
    raw = database.collection(DEVICES).find_one({"clientId": "board-1"})
    assert raw is not None
    assert set(raw) <= DEVICE_FIELDS
    assert isinstance(raw["_id"], ObjectId)
    assert raw["macID"] == "AA:BB:CC:DD:EE:01"
    assert raw["status"] == "UNALLOCATED"
    assert raw["tokenUsed"] is False  # Prisma's default, written explicitly


def test_default_client_id_is_derived_from_the_mac(database: Database) -> None:
    doc = DeviceRepository(database).add("AABBCCDDEE02")
    assert doc["clientId"] == "dev-aabbccddee02"


def test_allocation_sets_object_id_user_and_bson_date(database: Database) -> None:
    users = UserRepository(database)
    owner = users.add("owner@example.com", "Owner")
    repo = DeviceRepository(database)
    repo.add("AA:BB:CC:DD:EE:03", "board-3")
    before = utcnow()
    repo.allocate("board-3", str(owner["_id"]))
    raw = database.collection(DEVICES).find_one({"clientId": "board-3"})
    assert raw is not None
    assert raw["status"] == "ALLOCATED"
    assert isinstance(raw["userId"], ObjectId) and raw["userId"] == owner["_id"]
    assert isinstance(raw["allocatedAt"], datetime) and raw["allocatedAt"] >= before


def test_documents_written_the_web_app_way_are_handled(database: Database) -> None:
    """The seed's `prisma.device.create` then `prisma.device.update` allocation."""
    user_id = ObjectId()
    database.collection(USERS).insert_one({"_id": user_id, "email": "w@example.com"})
    database.collection(DEVICES).insert_one(
        {
            "macID": "AA:BB:CC:DD:EE:04",
            "clientId": "device-001",
            "status": "UNALLOCATED",
            "tokenUsed": False,
            "webAppOnlyField": {"keep": True},
        }
    )
    database.collection(DEVICES).update_one(
        {"macID": "AA:BB:CC:DD:EE:04"},
        {"$set": {"userId": user_id, "status": "ALLOCATED", "allocatedAt": utcnow()}},
    )
    repo = DeviceRepository(database)
    doc = repo.find("aa:bb:cc:dd:ee:04")
    assert doc["clientId"] == "device-001" and doc["status"] == "ALLOCATED"
    # Our transition keeps the web app's extra field untouched.
    from server.store.schema import DeviceStatus

    repo.transition("device-001", expected={DeviceStatus.ALLOCATED}, new=DeviceStatus.PROVISIONING)
    raw = database.collection(DEVICES).find_one({"clientId": "device-001"})
    assert raw is not None and raw["webAppOnlyField"] == {"keep": True}


def test_unique_indexes_are_enforced(database: Database) -> None:
    repo = DeviceRepository(database)
    repo.add("AA:BB:CC:DD:EE:05", "board-5")
    before = snapshot(database)
    with pytest.raises(DeviceConflict, match="macID"):
        repo.add("AA:BB:CC:DD:EE:05", "board-other")
    with pytest.raises(DeviceConflict, match="clientId"):
        repo.add("AA:BB:CC:DD:EE:06", "board-5")
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        database.collection(DEVICES).insert_one({"macID": "X", "clientId": "board-5"})
    assert snapshot(database) == before


def test_transition_reports_the_actual_status_and_changes_nothing(database: Database) -> None:
    from server.store.schema import DeviceStatus

    repo = DeviceRepository(database)
    repo.add("AA:BB:CC:DD:EE:07", "board-7")
    before = snapshot(database)
    with pytest.raises(WrongState, match="'UNALLOCATED', expected ALLOCATED"):
        repo.transition("board-7", expected={DeviceStatus.ALLOCATED}, new=DeviceStatus.ACTIVE)
    with pytest.raises(UnknownDevice):
        repo.transition("nope", expected={DeviceStatus.ALLOCATED}, new=DeviceStatus.ACTIVE)
    assert snapshot(database) == before


def test_two_concurrent_allocations_exactly_one_wins(database: Database) -> None:
    users = UserRepository(database)
    alice = str(users.add("alice@example.com")["_id"])
    bob = str(users.add("bob@example.com")["_id"])
    DeviceRepository(database).add("AA:BB:CC:DD:EE:08", "board-8")
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def allocate(user_id: str) -> None:
        repo = DeviceRepository(database)
        barrier.wait()
        try:
            repo.allocate("board-8", user_id)
            outcomes.append("won:" + user_id)
        except WrongState:
            outcomes.append("lost")

    threads = [threading.Thread(target=allocate, args=(u,)) for u in (alice, bob)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split(":")[0] for o in outcomes) == ["lost", "won"]
    winner = next(o.split(":")[1] for o in outcomes if o.startswith("won"))
    raw = database.collection(DEVICES).find_one({"clientId": "board-8"})
    assert raw is not None and str(raw["userId"]) == winner

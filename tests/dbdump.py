"""Byte-level snapshot of a database, to prove a rejected input changed nothing."""

from __future__ import annotations

import bson

from server.store.db import Database


def snapshot(database: Database) -> dict[str, list[bytes]]:
    """Every document of every collection, BSON-encoded, in ``_id`` order."""
    result: dict[str, list[bytes]] = {}
    for name in sorted(database.db.list_collection_names()):
        docs = database.db[name].find({}).sort("_id", 1)
        result[name] = [bson.encode(doc) for doc in docs]
    return result

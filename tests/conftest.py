"""Session-wide real services: one MongoDB-wire server (or MONGODB_URI) per run."""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.db import Database
from server.local_services import MongoWireServer


def with_database(uri: str, name: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def mongo_base_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB-wire server for the whole run: MONGODB_URI if set, else secantusd-py."""
    external = os.environ.get("MONGODB_URI")
    if external:
        yield external
        return
    server = MongoWireServer(tmp_path_factory.mktemp("mongo")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def mongodb_uri(mongo_base_uri: str) -> Iterator[str]:
    """A URI naming a fresh database for this test (dropped afterwards)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    uri = with_database(mongo_base_uri, name)
    yield uri
    database = Database(uri)
    try:
        database.client.drop_database(name)
    finally:
        database.close()


@pytest.fixture
def database(mongodb_uri: str) -> Iterator[Database]:
    """The test's database with the web app's collections and indexes."""
    database = Database(mongodb_uri)
    database.init()
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent

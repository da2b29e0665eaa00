"""Session-wide real services: one MongoDB-wire server (or MONGODB_URI) per run."""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from harness.local_services import MongoWireServer
from server.pki.ca import CertificateAuthority
from server.store.db import Database
from tests.broker_fixture import LocalBroker


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


# --- broker fixtures (harness.local_broker): a CA per session, a Mosquitto per test ---


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report: pytest.TestReport = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """One CA for the whole run (creating it costs a few key generations)."""
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "pki")


@pytest.fixture
def broker(
    request: pytest.FixtureRequest, tmp_path: Path, ca: CertificateAuthority, database: Database
) -> Iterator[LocalBroker]:
    """A fresh Mosquitto (≈ 0.06 s to start) whose files come from the test's database.

    When the test fails, the broker's log is printed (pytest shows it with the failure).
    """
    local = LocalBroker(tmp_path, ca, database)
    try:
        yield local
    finally:
        local.stop()
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            print(f"--- mosquitto log ({local.layout.log_path}) ---\n{local.log_text()}")

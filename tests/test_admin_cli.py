"""`provision-server db|user|device` against the real MongoDB-wire server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from server.cli.main import main
from server.store.db import Database
from tests.dbdump import snapshot


def run(uri: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--mongodb-uri", uri, *args], catch_exceptions=False)


@pytest.fixture
def user_id(database: Database, mongodb_uri: str) -> str:
    result = run(mongodb_uri, "user", "add", "--email", "op@example.com")
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_help_documents_every_command() -> None:
    runner = CliRunner()
    for args in (
        [],
        ["db"],
        ["db", "init"],
        ["device"],
        ["device", "add"],
        ["device", "allocate"],
        ["device", "list"],
        ["device", "show"],
        ["device", "history"],
        ["user", "add"],
    ):
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0, args
        assert "Usage:" in result.output


def test_db_init_twice_reports_created_then_present(mongodb_uri: str) -> None:
    first = run(mongodb_uri, "db", "init", "--json")
    assert first.exit_code == 0
    assert len(json.loads(first.stdout)["created"]) >= 15
    second = json.loads(run(mongodb_uri, "db", "init", "--json").stdout)
    assert second["created"] == []


def test_add_allocate_list_show(database: Database, mongodb_uri: str, user_id: str) -> None:
    added = run(mongodb_uri, "device", "add", "--mac", "aa:bb:cc:00:00:01", "--json")
    assert added.exit_code == 0
    assert json.loads(added.stdout)["clientId"] == "dev-aabbcc000001"
    allocated = run(mongodb_uri, "device", "allocate", "AA:BB:CC:00:00:01", "--user", user_id)
    assert allocated.exit_code == 0, allocated.output
    listed = json.loads(
        run(mongodb_uri, "device", "list", "--status", "ALLOCATED", "--json").stdout
    )
    assert [d["macID"] for d in listed] == ["AA:BB:CC:00:00:01"]
    assert listed[0]["userId"] == user_id
    assert (
        json.loads(run(mongodb_uri, "device", "list", "--status", "ACTIVE", "--json").stdout) == []
    )
    shown = run(mongodb_uri, "device", "show", "dev-aabbcc000001")
    assert "ALLOCATED" in shown.stdout and "allocatedAt" in shown.stdout
    table = run(mongodb_uri, "device", "list").stdout
    assert "dev-aabbcc000001" in table and "ALLOCATED" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["device", "add", "--mac", "not-a-mac"], "is not a MAC address"),
        (["device", "add", "--mac", "00:00:00:00:00:00"], "all-zero or broadcast"),
        (["device", "add", "--mac", "AA:BB:CC:00:00:09"], "macID 'AA:BB:CC:00:00:09' already"),
        (
            ["device", "add", "--mac", "AA:BB:CC:00:00:0A", "--client-id", "taken"],
            "clientId 'taken' already",
        ),
        (
            ["device", "add", "--mac", "AA:BB:CC:00:00:0B", "--client-id", "bad id!"],
            "clientId 'bad id!' is invalid",
        ),
        (
            ["device", "allocate", "unknown-device", "--user", "0123456789abcdef01234567"],
            "no device with clientId 'unknown-device'",
        ),
        (
            ["device", "allocate", "taken", "--user", "not-an-object-id"],
            "is not a MongoDB ObjectId",
        ),
        (["device", "allocate", "taken", "--user", "0123456789abcdef01234567"], "no user with id"),
        (
            ["device", "allocate", "allocated", "--user", "USER"],
            "is 'ALLOCATED', expected UNALLOCATED",
        ),
        (["device", "show", "AA:BB:CC:99:99:99"], "no device with MAC"),
    ],
)
def test_bad_input_is_a_one_line_error_and_changes_nothing(
    database: Database, mongodb_uri: str, user_id: str, args: list[str], message: str
) -> None:
    assert (
        run(
            mongodb_uri, "device", "add", "--mac", "AA:BB:CC:00:00:09", "--client-id", "taken"
        ).exit_code
        == 0
    )
    assert (
        run(
            mongodb_uri, "device", "add", "--mac", "AA:BB:CC:00:00:10", "--client-id", "allocated"
        ).exit_code
        == 0
    )
    assert run(mongodb_uri, "device", "allocate", "allocated", "--user", user_id).exit_code == 0
    before = snapshot(database)
    result = run(mongodb_uri, *[user_id if a == "USER" else a for a in args])
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert snapshot(database) == before


def test_web_app_fields_survive_our_writes(
    database: Database, mongodb_uri: str, user_id: str
) -> None:
    database.collection("devices").insert_one(
        {
            "macID": "AA:BB:CC:00:00:20",
            "clientId": "web-1",
            "status": "UNALLOCATED",
            "tokenUsed": False,
            "name": "Kitchen sensor",
            "metadata": {"floor": 2},
        }
    )
    assert run(mongodb_uri, "device", "allocate", "web-1", "--user", user_id).exit_code == 0
    raw = database.collection("devices").find_one({"clientId": "web-1"})
    assert raw is not None
    assert raw["name"] == "Kitchen sensor" and raw["metadata"] == {"floor": 2}


def test_unreachable_database_fails_fast_without_leaking_the_password(tmp_path: Path) -> None:
    from harness.local_services import free_port

    uri = f"mongodb://admin:s3cret-pw@127.0.0.1:{free_port()}/fleet"
    script = Path(sys.executable).with_name("provision-server")
    started = time.monotonic()
    proc = subprocess.run(
        [str(script), "--mongodb-uri", uri, "device", "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert elapsed < 10
    assert "s3cret-pw" not in proc.stderr + proc.stdout
    assert "mongodb://admin:***@127.0.0.1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2() -> None:
    result = CliRunner().invoke(main, ["device", "add"])
    assert result.exit_code == 2

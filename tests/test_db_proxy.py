"""The benchmark's latency proxy: a real MongoDB-wire server behind it, commands intact."""

from __future__ import annotations

import time
from pathlib import Path

import pymongo

from bench.db_proxy import LatencyProxy, proxied_uri


def test_proxied_uri_keeps_credentials_database_and_options() -> None:
    uri = "mongodb://u:p%40ss@db.example:27018/fleet?retryWrites=false&tls=true"
    assert proxied_uri(uri, 4000) == (
        "mongodb://u:p%40ss@127.0.0.1:4000/fleet?retryWrites=false&tls=true&directConnection=true"
    )
    assert proxied_uri("mongodb://db:1/?directConnection=false", 5) == (
        "mongodb://127.0.0.1:5/?directConnection=true"
    )


def test_commands_pass_through_and_each_round_trip_costs_the_rtt(
    mongodb_uri: str, tmp_path: Path
) -> None:
    with LatencyProxy(mongodb_uri, 60, tmp_path / "proxy.log") as proxy:
        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(proxy.uri)
        try:
            collection = client.get_default_database()["proxied"]
            collection.insert_many([{"n": n, "blob": "x" * 50_000} for n in range(40)])
            assert collection.count_documents({}) == 40
            assert sum(1 for _ in collection.find({}, {"blob": 1})) == 40  # several batches
            started = time.monotonic()
            for _ in range(3):
                client.admin.command("ping")
            # A lower bound only: load can make it slower, never faster than 3 x 60 ms.
            assert time.monotonic() - started >= 3 * 0.060
        finally:
            client.close()
    assert proxy.process is None

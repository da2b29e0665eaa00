"""Database outages and the server's configuration loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bson import ObjectId

from harness.local_services import MongoWireServer
from server.config import load_server_config
from server.errors import ConfigError
from server.pki.ca import CertificateAuthority
from server.service.provisioning import ProvisioningService
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.schema import DEVICES, USERS
from tests.device_kit import DeviceKit


def test_database_down_gives_retryable_unavailable_and_the_service_recovers(
    tmp_path: Path,
) -> None:
    mongo = MongoWireServer(tmp_path / "mongo").start()
    ca = CertificateAuthority.init(tmp_path / "ca")
    database = Database(mongo.database_uri("outage"), timeout_ms=1000)
    try:
        database.init()
        kit = DeviceKit("board-db", "02:00:00:00:0D:01", ca)
        DeviceRepository(database).add(kit.mac, kit.client_id)
        user = ObjectId()
        database.collection(USERS).insert_one({"_id": user, "email": "o@example.com"})
        DeviceRepository(database).allocate(kit.client_id, str(user))
        service = ProvisioningService(database, ca)
        mongo.stop()
        down = json.loads(service.handle_request(kit.client_id, kit.token_request()))
        assert down["ok"] is False
        assert down["error"]["code"] == "UNAVAILABLE" and down["error"]["retryAfter"] > 0
        assert "mongodb://" in down["error"]["message"]
        mongo.start()  # same port, same storage: the outage ends
        token = json.loads(service.handle_request(kit.client_id, kit.token_request()))
        assert token["ok"], token
        cert = json.loads(service.handle_request(kit.client_id, kit.csr_request(token["token"])))
        assert cert["ok"], cert
        doc = database.collection(DEVICES).find_one({"clientId": kit.client_id})
        assert doc is not None and doc["status"] == "PROVISIONED"
    finally:
        database.close()
        mongo.stop()


def test_config_file_env_and_options_in_order(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        '[database]\nuri = "mongodb://db.example/fleet"\n[ca]\ndir = "ca"\n'
        "[policy]\ntoken_lifetime_s = 120\n[service]\nworkers = 8\ndb_batches_in_flight = 1\n"
    )
    config = load_server_config(path, env={"PROVISION_SERVER_POLICY_OFFLINE_TIMEOUT_S": "90"})
    assert config.mongodb_uri == "mongodb://db.example/fleet"
    assert config.ca_dir == tmp_path / "ca"  # relative to the file
    assert config.token_lifetime_s == 120 and config.workers == 8
    assert config.db_batches_in_flight == 1
    assert load_server_config(None, env={}).db_batches_in_flight == 3
    assert config.offline_timeout_s == 90
    env = {"MONGODB_URI": "mongodb://other/x"}
    assert load_server_config(path, env=env).mongodb_uri == "mongodb://other/x"
    assert load_server_config(path, env=env, broker_port=9000).broker_port == 9000


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[policy]\ntoken_lifetime_s = -1\n", {}, "policy.token_lifetime_s: expected a positive"),
        ("[policy]\ntoken_lifetme_s = 5\n", {}, "unknown key policy.token_lifetme_s"),
        ("[broker]\nport = 70000\n", {}, "broker.port: expected a positive integer"),
        ("not toml [", {}, "not valid TOML"),
        ("", {"PROVISION_SERVER_NOPE": "1"}, "PROVISION_SERVER_NOPE is not a server setting"),
        ("", {"PROVISION_SERVER_SERVICE_WORKERS": "many"}, "SERVICE_WORKERS: expected"),
    ],
)
def test_bad_config_names_the_key_and_the_file(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as info:
        load_server_config(path, env=env)
    if not env:
        assert str(path) in str(info.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_server_config(tmp_path / "absent.toml", env={})

"""``provision-server doctor``: a healthy backend passes; each check, broken on purpose, fails.

Real parts: the test database (with its indexes), the session CA, a real Mosquitto whose
ACL file and CRLs were written from the database, and the config file `run` would read.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from server.broker.layout_file import save_layout
from server.cli.doctor import diagnose
from server.cli.main import main
from server.config import ServerConfig, load_server_config
from server.pki.ca import CertificateAuthority
from server.pki.ca_files import load_cert
from server.store.db import Database
from server.store.schema import CERTIFICATE_REVOCATIONS, DEVICE_ACLS, DEVICES
from tests.broker_fixture import LocalBroker

# Nothing listens on port 1 (tcpmux, privileged): refused at once, and unlike a port that
# was free a moment ago, no other process on this shared machine can have taken it.
CLOSED_PORT = 1


@pytest.fixture
def config_path(
    tmp_path: Path, mongodb_uri: str, ca: CertificateAuthority, broker: LocalBroker
) -> Path:
    save_layout(broker.layout)
    path = tmp_path / "server.toml"
    path.write_text(
        f'[database]\nuri = "{mongodb_uri}"\n[ca]\ndir = "{ca.paths.directory}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.layout.server_port}\n'
        f'config_dir = "{broker.layout.directory}"\n'
    )
    return path


def config_of(path: Path, **overrides: object) -> ServerConfig:
    return load_server_config(path, env={}, **overrides)


def checks(config: ServerConfig, now: datetime | None = None) -> dict[str, tuple[str, str]]:
    return {r.name: (r.outcome.value, r.message) for r in diagnose(config, now)}


def test_a_healthy_backend_passes_every_check(config_path: Path) -> None:
    result = CliRunner().invoke(main, ["doctor", "--config", str(config_path)], env={})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[1] for line in lines] == [
        "config", "database", "indexes", "ca", "crl", "broker", "broker-files",
    ]  # fmt: skip
    assert all(line.startswith("PASS") for line in lines), result.output
    as_json = CliRunner().invoke(main, ["doctor", "--json", "--config", str(config_path)], env={})
    assert json.loads(as_json.output)["ok"] is True


def test_inconsistent_config_fails(config_path: Path) -> None:
    config = config_of(config_path, offline_timeout_s=10, status_write_interval_s=30)
    status, message = checks(config)["config"]
    assert status == "fail"
    assert "offline_timeout_s must exceed policy.status_write_interval_s" in message


def test_metrics_open_beyond_loopback_warn(config_path: Path) -> None:
    config = config_of(config_path, metrics_port=9464, metrics_host="0.0.0.0")  # noqa: S104
    assert checks(config)["config"] == (
        "warn",
        "metrics.host 0.0.0.0 is not loopback: /metrics has no authentication",
    )


def test_an_unreachable_database_fails_with_the_cli_exit_code(config_path: Path) -> None:
    uri = f"mongodb://127.0.0.1:{CLOSED_PORT}/x"
    result = CliRunner().invoke(main, ["--mongodb-uri", uri, "doctor", "--config",
                                       str(config_path)], env={})  # fmt: skip
    assert result.exit_code == 1
    assert f"FAIL  database  MongoDB at {uri} is unreachable" in result.output


def test_a_missing_index_fails(config_path: Path, database: Database) -> None:
    database.collection(DEVICES).drop_index("status_1")
    status, message = checks(config_of(config_path))["indexes"]
    assert (status, message) == (
        "fail",
        "missing devices.status: run `provision-server db init`",
    )


def test_ca_horizons_warn_then_fail(config_path: Path, ca: CertificateAuthority) -> None:
    config = config_of(config_path)
    broker_expiry = load_cert(ca.paths.broker_cert).not_valid_after_utc
    # The broker and server certificates (5 years) go first: 30 days before they expire ...
    status, message = checks(config, broker_expiry - timedelta(days=30))["ca"]
    assert status == "warn" and "broker certificate expires in 30 days" in message
    # ... and once the device CA itself has expired.
    status, message = checks(config, ca.device_ca.not_valid_after_utc)["ca"]
    assert status == "fail" and "device CA expired on" in message


def test_crl_horizons_warn_then_fail(config_path: Path) -> None:
    config = config_of(config_path)
    now = datetime.now(timezone.utc)
    status, message = checks(config, now + timedelta(days=3))["crl"]
    assert status == "warn" and "device CRL nextUpdate in 4 days" in message
    status, message = checks(config, now + timedelta(days=8))["crl"]
    assert status == "fail"
    assert "device CRL nextUpdate passed" in message and "refuses every client" in message


def test_an_unreachable_broker_fails(config_path: Path) -> None:
    port = CLOSED_PORT
    status, message = checks(config_of(config_path, broker_port=port))["broker"]
    assert status == "fail"
    assert f"cannot connect to 127.0.0.1:{port}" in message


def test_broker_files_behind_the_database_fail(config_path: Path, database: Database) -> None:
    database.collection(DEVICE_ACLS).insert_one({"device_id": "dev-new", "tier": "2", "rules": []})
    database.collection(CERTIFICATE_REVOCATIONS).insert_one(
        {"device_id": "dev-old", "serial": "0A1B2C", "reason": "test"}
    )
    status, message = checks(config_of(config_path))["broker-files"]
    assert status == "fail"
    assert "acl-operational differs from device_acls" in message
    assert "lists 0 serial(s), the database 1" in message
    assert "is `provision-server run` with broker.config_dir running?" in message

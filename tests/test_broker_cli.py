"""`provision-server broker-config`, `run --broker-config-dir` and `device revoke` together."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import protocol
from harness.local_services import MosquittoBroker, free_port
from server.broker.layout_file import load_layout
from server.errors import CaError
from server.pki.ca import CertificateAuthority
from server.store.db import Database
from tests.mqtt_device import write_identity
from tests.test_server_mqtt import (
    allocated_device,
    birth_session,
    status_of,
    wait_for,
    wait_subscribed,
)

BIN = Path(sys.executable).parent


def cli(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "provision-server"), "--mongodb-uri", uri, *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_broker_config_then_revoke_refuses_the_device_without_restart(
    database: Database, mongodb_uri: str, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    assert cli(mongodb_uri, "ca", "init", "--dir", str(ca_dir)).returncode == 0
    ca = CertificateAuthority.load(ca_dir)
    ports = [free_port(), free_port(), free_port()]
    out = tmp_path / "broker"
    made = cli(mongodb_uri, "broker-config", "--out", str(out), "--ca-dir", str(ca_dir),
               "--provisioning-port", str(ports[0]), "--operational-port", str(ports[1]),
               "--server-port", str(ports[2]), "--bind", "127.0.0.1",
               "--run-as", getpass.getuser())  # fmt: skip
    assert made.returncode == 0, made.stderr
    layout = load_layout(out)
    broker = MosquittoBroker(out, layout.conf_path, layout.ports).start()
    with (tmp_path / "server.log").open("ab") as log:
        server = subprocess.Popen(
            [str(BIN / "provision-server"), "--mongodb-uri", mongodb_uri, "run", "--ca-dir",
             str(ca_dir), "--broker-port", str(ports[2]), "--broker-config-dir", str(out)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        kit = allocated_device(database, ca, 40)
        wait_subscribed(tmp_path / "server.log")
        device = birth_session(kit, layout, ca)
        token = device.request(kit.token_request(), timeout=15)
        issued = device.request(kit.csr_request(token["token"]), timeout=15)
        assert issued["ok"], issued
        device.close()
        cert, key = write_identity(tmp_path / "dev", issued["certificate"], kit.key)
        pub = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(ports[1]), "--cafile",
               str(ca.paths.root_cert), "--cert", str(cert), "--key", str(key), "-V", "mqttv5",
               "-q", "1", "-t", protocol.status_topic(kit.client_id), "-m",
               '{"v":1,"status":"online"}']  # fmt: skip
        assert subprocess.run(pub, capture_output=True, timeout=20).returncode == 0
        wait_for(lambda: status_of(database, kit.client_id) == "ACTIVE")
        revoked = cli(mongodb_uri, "device", "revoke", kit.client_id)
        assert revoked.returncode == 0, revoked.stderr
        assert issued["serial"] in revoked.stdout
        assert status_of(database, kit.client_id) == "ERROR"
        deadline = time.monotonic() + 15
        while subprocess.run(pub, capture_output=True, timeout=20).returncode == 0:
            if time.monotonic() > deadline:
                pytest.fail("the broker still accepts the revoked certificate:\n"
                            + broker.log_text())  # fmt: skip
            time.sleep(0.3)
        again = cli(mongodb_uri, "device", "revoke", kit.client_id)
        assert again.returncode == 1 and "no active certificate" in again.stderr
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0
        broker.stop()


def test_ca_init_with_passphrase_show_and_refusal_to_overwrite(
    tmp_path: Path, database: Database, mongodb_uri: str
) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery staple\n")
    ca_dir = tmp_path / "ca"
    uri = "mongodb://127.0.0.1:1/unused"  # ca commands never touch the database
    made = cli(uri, "ca", "init", "--dir", str(ca_dir), "--passphrase-file", str(secret))
    assert made.returncode == 0, made.stderr
    shown = cli(uri, "ca", "show", "--dir", str(ca_dir), "--passphrase-file", str(secret),
                "--json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    names = [entry["name"] for entry in json.loads(shown.stdout)]
    assert {"root", "device-ca", "factory-ca"} <= set(names)
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    again = cli(uri, "ca", "init", "--dir", str(ca_dir))
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1
    assert "already holds CA material" in again.stderr
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    refused = cli(uri, "ca", "show", "--dir", str(ca_dir), "--passphrase-file", str(wrong))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    # broker-config signs the CRL with the device CA key: it needs the passphrase too.
    out = tmp_path / "broker"
    base = ["broker-config", "--out", str(out), "--ca-dir", str(ca_dir)]
    locked = cli(mongodb_uri, *base)
    assert locked.returncode == 1 and len(locked.stderr.strip().splitlines()) == 1
    assert not (out / "crl.pem").exists()
    unlocked = cli(mongodb_uri, *base, "--passphrase-file", str(secret))
    assert unlocked.returncode == 0, unlocked.stderr
    assert (out / "crl.pem").exists() and (out / "mosquitto.conf").exists()


def test_ca_init_creates_a_missing_passphrase_file_and_encrypts_with_it(tmp_path: Path) -> None:
    """docs/server.md Deploy names a passphrase file that nothing else creates."""
    uri = "mongodb://127.0.0.1:1/unused"
    secret = tmp_path / "ca-passphrase"
    ca_dir = tmp_path / "ca"
    made = cli(uri, "ca", "init", "--dir", str(ca_dir), "--passphrase-file", str(secret))
    assert made.returncode == 0, made.stderr
    assert f"new CA passphrase written to {secret}" in made.stdout
    assert secret.stat().st_mode & 0o777 == 0o600
    passphrase = secret.read_bytes().strip()
    assert len(passphrase) >= 40
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    with pytest.raises(CaError, match="passphrase"):
        CertificateAuthority.load(ca_dir)
    CertificateAuthority.load(ca_dir, passphrase)
    # An existing file is used as it is, never replaced.
    again = cli(uri, "ca", "init", "--dir", str(tmp_path / "ca2"), "--passphrase-file",
                str(secret))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "new CA passphrase" not in again.stdout
    assert secret.read_bytes().strip() == passphrase
    CertificateAuthority.load(tmp_path / "ca2", passphrase)
    # init refused (CA material already there): the passphrase it just made is removed.
    fresh = tmp_path / "fresh-passphrase"
    refused = cli(uri, "ca", "init", "--dir", str(ca_dir), "--passphrase-file", str(fresh))
    assert refused.returncode == 1 and "already holds CA material" in refused.stderr
    assert not fresh.exists()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    blank = cli(uri, "ca", "init", "--dir", str(tmp_path / "ca3"), "--passphrase-file",
                str(empty))  # fmt: skip
    assert blank.returncode == 1 and blank.stderr.strip().endswith(f"{empty} is empty")
    assert not (tmp_path / "ca3").exists()


def test_ca_init_exist_ok_keeps_a_complete_ca_and_refuses_a_partial_one(tmp_path: Path) -> None:
    """Deploy run again: `ca init --exist-ok` keeps the CA it made the first time."""
    uri = "mongodb://127.0.0.1:1/unused"
    secret = tmp_path / "ca-passphrase"
    ca_dir = tmp_path / "ca"
    base = ["ca", "init", "--dir", str(ca_dir), "--passphrase-file", str(secret), "--exist-ok"]
    first = cli(uri, *base)
    assert first.returncode == 0 and "CA material written" in first.stdout, first.stderr
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    again = cli(uri, *base)
    assert again.returncode == 0 and "already in" in again.stdout, again.stderr
    assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before
    # The wrong passphrase is not "ok": the CA it names must be the one that is there.
    wrong = tmp_path / "other-passphrase"
    refused = cli(uri, "ca", "init", "--dir", str(ca_dir), "--passphrase-file", str(wrong),
                  "--exist-ok")  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert not wrong.exists()  # made for an init that did not happen: removed again
    # A partial CA (a crash mid-init) is not kept silently either.
    (ca_dir / "root.pem").unlink()
    partial = cli(uri, *base)
    assert partial.returncode == 1 and "Traceback" not in partial.stderr

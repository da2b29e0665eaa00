"""``provision-server run --metrics-port``: scraped during a real provisioning run.

One server process (real Mosquitto, real database, ACL/CRL sync on) is scraped before and
after a device provisions to ACTIVE; the counters must move by what the device did. The
alerting rules and the Grafana dashboard are checked against the names that scrape shows.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from bson import ObjectId
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent import protocol
from harness.local_broker import start_local_broker
from harness.local_services import free_port
from server.broker.acl_sync import AclSync
from server.broker.layout_file import save_layout
from server.config import ServerConfig, load_server_config
from server.pki.ca import CertificateAuthority
from server.service.metrics import ServerMetrics
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.schema import DEVICE_ACLS, DEVICES, USERS
from tests.broker_fixture import LocalBroker
from tests.conftest import with_database
from tests.device_kit import DeviceKit
from tests.mqtt_device import MqttDevice

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _labels), v in samples.items() if n == name)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our loopback URL)
        body: bytes = response.read()
    return body.decode()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass(frozen=True)
class Run:
    before: Samples
    after: Samples
    text: str
    log: str
    started: float


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, ca: CertificateAuthority, mongo_base_uri: str
) -> Iterator[Run]:
    """A server with metrics on; one device provisions and goes ACTIVE; scrapes around it."""
    tmp = tmp_path_factory.mktemp("metrics")
    name = f"test_{uuid.uuid4().hex[:12]}"
    uri = with_database(mongo_base_uri, name)
    database = Database(uri)
    database.init()
    broker, layout = start_local_broker(tmp / "broker", ca, database)
    save_layout(layout)
    port = free_port()
    log_path = tmp / "server.log"
    argv = [
        str(Path(sys.executable).with_name("provision-server")), "--mongodb-uri", uri, "run",
        "--ca-dir", str(ca.paths.directory), "--broker-host", "127.0.0.1",
        "--broker-port", str(layout.server_port), "--broker-config-dir", str(layout.directory),
        "--metrics-port", str(port),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    started = time.time()
    with log_path.open("ab") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:

        def connected() -> bool:
            try:
                return value(parse(scrape(url)), "provision_broker_connected") == 1.0
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for("the server's broker session", connected)
        before = parse(scrape(url))
        client_id = provision_one_device(
            database, ca, layout.provisioning_port, layout.operational_port
        )
        # A web-app edit of its rights: the sync sends them to the broker, no reload.
        acls = database.collection(DEVICE_ACLS)
        acls.update_one({"device_id": client_id}, {"$set": {"tier": "2"}})
        wait_for(
            "a rights update",
            lambda: value(parse(scrape(url)), "provision_broker_rights_updates_total") >= 1,
        )
        text = scrape(url)
        yield Run(before, parse(text), text, log_path.read_text(), started)
    finally:
        server.terminate()
        server.wait(30)
        broker.stop()
        database.client.drop_database(name)
        database.close()


def provision_one_device(
    database: Database, ca: CertificateAuthority, provisioning_port: int, operational_port: int
) -> str:
    """Provision one device to ACTIVE over the real broker; its clientId."""
    kit = DeviceKit("metrics-board", "02:00:00:00:0E:01", ca)
    devices = DeviceRepository(database)
    devices.add(kit.mac, kit.client_id)
    user = ObjectId()
    database.collection(USERS).insert_one({"_id": user, "email": "metrics@example.com"})
    devices.allocate(kit.client_id, str(user))
    birth = MqttDevice(kit.client_id, provisioning_port, ca.paths.root_cert, kit.birth_pem,
                       kit.birth_key).connect()  # fmt: skip
    try:
        birth.subscribe(protocol.response_topic(kit.client_id))
        wrong = birth.request(kit.token_request(mac="02:00:00:00:0E:99"))
        assert wrong["error"]["code"] == "MAC_MISMATCH", wrong
        token = birth.request(kit.token_request())
        issued = birth.request(kit.csr_request(token["token"]))
        assert issued["ok"], issued
    finally:
        birth.close()
    session = MqttDevice(kit.client_id, operational_port, ca.paths.root_cert,
                         issued["certificate"], kit.key).connect()  # fmt: skip
    try:
        session.publish(
            protocol.status_topic(kit.client_id), protocol.encode({"status": "online"}), retain=True
        )

        def active() -> bool:
            doc = database.collection(DEVICES).find_one({"clientId": kit.client_id})
            return doc is not None and doc.get("status") == "ACTIVE"

        wait_for("ACTIVE", active)
    finally:
        session.close()
    return kit.client_id


def test_request_counters_and_latency_move_by_what_the_device_did(run: Run) -> None:
    moved = {
        (op, result): value(run.after, "provision_requests_total", op=op, result=result)
        - value(run.before, "provision_requests_total", op=op, result=result)
        for op, result in (("token", "ok"), ("token", "MAC_MISMATCH"), ("csr", "ok"))
    }
    assert moved == {("token", "ok"): 1, ("token", "MAC_MISMATCH"): 1, ("csr", "ok"): 1}
    assert value(run.after, "provision_request_duration_seconds_count", op="csr") == 1
    assert value(run.after, "provision_request_duration_seconds_sum", op="csr") > 0
    assert value(run.after, "provision_certificates_issued_total", kind="first") == 1
    assert value(run.after, "provision_signing_failures_total") == 0


def test_database_commands_status_batches_and_queues_are_measured(run: Run) -> None:
    for command in ("update", "find"):
        counted = value(run.after, "provision_db_command_duration_seconds_count", command=command)
        assert counted > value(
            run.before, "provision_db_command_duration_seconds_count", command=command
        ), command
    assert total(run.after, "provision_db_command_errors_total") == 0
    assert value(run.after, "provision_status_batches_total") > value(
        run.before, "provision_status_batches_total"
    )
    assert value(run.after, "provision_status_batch_devices_total") >= 1
    assert value(run.after, "provision_queue_depth", queue="requests") == 0
    assert ("provision_queue_depth", (("queue", "status"),)) in run.after
    assert value(run.after, "provision_broker_connected") == 1
    # The token, the CSR and their lookups went through the group commit.
    assert value(run.after, "provision_db_group_commit_operations_total") > value(
        run.before, "provision_db_group_commit_operations_total"
    )


def test_broker_sync_and_validity_horizons_are_exported(run: Run) -> None:
    now = time.time()
    assert value(run.after, "provision_broker_syncs_total") >= 1
    assert value(run.after, "provision_broker_sync_last_success_timestamp_seconds") >= run.started
    assert value(run.after, "provision_broker_sync_failures_total") == 0
    assert value(run.after, "provision_broker_rights_updates_total") >= 1  # the tier edit
    assert value(run.after, "provision_broker_sessions_cut_total") == 0  # nothing revoked
    # The device's first certificate added its ACL: a change the sync saw and applied.
    assert 0 <= value(run.after, "provision_broker_sync_lag_seconds") < 10
    for issuer in ("device", "factory"):
        horizon = value(run.after, "provision_crl_next_update_timestamp_seconds", issuer=issuer)
        assert now + 6 * 86400 < horizon < now + 8 * 86400, issuer
    for name in ("root", "device", "factory"):
        expiry = value(run.after, "provision_ca_not_after_timestamp_seconds", ca=name)
        assert expiry > now + 365 * 86400, name


def test_metrics_listen_on_loopback_and_say_where(run: Run) -> None:
    assert re.search(r"event=metrics url=http://127\.0\.0\.1:\d+/metrics", run.log), run.log


def test_metrics_are_off_unless_asked_for() -> None:
    """Without --metrics-port (or metrics.port) no endpoint is opened."""
    assert ServerConfig().metrics_port is None
    assert load_server_config(env={}).metrics_port is None
    assert load_server_config(env={"PROVISION_SERVER_METRICS_PORT": "9464"}).metrics_port == 9464
    assert ServerConfig().metrics_host == "127.0.0.1"


def test_a_taken_metrics_port_is_a_one_line_error(tmp_path: Path, ca: CertificateAuthority) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(Path(sys.executable).with_name("provision-server")),
             "--mongodb-uri", "mongodb://127.0.0.1:1/x", "run", "--ca-dir", str(ca.paths.directory),
             "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# --- the alerting rules and the dashboard name only metrics that exist -----------------------

METRIC_NAME = re.compile(r"\b(provision_[a-z_]+)\b")


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}


def exported_names(text: str) -> set[str]:
    """Sample names, and those of declared families that have no sample yet (a labelled
    counter such as the database errors shows only HELP and TYPE until its first error)."""
    names = {sample_name for sample_name, _labels in parse(text)}
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def test_dashboard_queries_use_exported_metrics(run: Run, repo_root: Path) -> None:
    dashboard = json.loads((repo_root / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used - exported_names(run.text) == set()


def test_alerting_rules_use_exported_metrics(run: Run, repo_root: Path) -> None:
    rules = (repo_root / "docs" / "prometheus-rules.yml").read_text()
    used = set(METRIC_NAME.findall(rules))
    assert "provision_crl_next_update_timestamp_seconds" in used
    assert used - exported_names(run.text) == set()


def test_sync_lag_runs_from_the_database_write_until_the_broker_has_it(
    broker: LocalBroker,
) -> None:
    """What ProvisionBrokerSyncLagHigh watches: a change the broker cannot get grows the lag."""
    assert broker.database is not None
    sync = AclSync(broker.database, broker.ca, broker.layout, interval=0.2).start()
    try:
        wait_for("the first sync", lambda: sync.last_success is not None)
        # The operational ACL cannot be written (a directory stands in its place), so the
        # change cannot reach the broker. (Stopping Mosquitto would free its ports for any
        # other process on this shared machine to take before the restart.)
        acl = broker.layout.acl_operational
        acl.rename(acl.with_name("acl-operational.saved"))
        acl.mkdir()
        broker.database.collection(DEVICE_ACLS).insert_one(
            {
                "device_id": "lagging",
                "tier": "2",
                "rules": [],
                "last_updated": datetime.now(timezone.utc),
            }
        )
        wait_for("a failed sync", lambda: sync.failures >= 1)
        time.sleep(1.0)
        assert sync.lag_seconds() >= 1.0  # still waiting, and counting
        restored = time.time()
        acl.rmdir()
        acl.with_name("acl-operational.saved").rename(acl)
        failed_at = sync.failures
        wait_for("a sync after the fix", lambda: (sync.last_success or 0) > restored)
        applied = sync.lag_seconds()
        time.sleep(0.3)
        assert sync.lag_seconds() == applied  # settled: the time the change took
        assert 1.0 <= applied < 10
        assert sync.failures >= failed_at and sync.reloads >= 1
    finally:
        sync.stop()


def test_group_commit_round_trips_are_counted(mongodb_uri: str) -> None:
    """Requests in flight share database round trips; the scrape says how many and how full."""
    metrics = ServerMetrics()
    database = Database(mongodb_uri, event_listeners=[metrics.command_listener()])
    try:
        metrics.state.database = database
        assert "provision_db_group_commit" not in generate_latest(metrics.registry).decode()
        database.start_group_commit()
        for n in range(3):
            assert database.insert_new("metrics_probe", {"_id": n})
        samples = parse(generate_latest(metrics.registry).decode())
        assert value(samples, "provision_db_group_commit_operations_total") == 3
        assert 1 <= value(samples, "provision_db_group_commit_batches_total") <= 3
        assert value(samples, "provision_db_command_duration_seconds_count", command="insert") >= 1
    finally:
        database.close()

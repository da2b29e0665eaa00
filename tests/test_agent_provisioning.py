"""End to end: the real agent process against Mosquitto, the provisioning server and MongoDB.

The agent runs as ``python -m agent.cli run`` with a temporary state directory and a
simulated sysfs; the server side is the real ProvisioningServer + AclSync in this process.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.__main__ import parse_run
from agent.birth import Endpoints, keys_dir
from agent.runner import certs_dir
from agent.storage import CertificateStore
from server.broker.acl_sync import AclSync
from server.pki.ca import CLOCK_SKEW, CertificateAuthority
from server.service.device_control import approve_reprovision, revoke_device
from server.service.mqtt_transport import BrokerEndpoint, ProvisioningServer
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.db import Database, Document
from server.store.devices import DeviceRepository
from server.store.schema import (
    CERTIFICATE_REVOCATIONS,
    DEVICE_CERTIFICATES,
    DEVICES,
    USERS,
    CertificateStatus,
)
from tests.broker_fixture import LocalBroker
from tests.gated_relay import GatedRelay
from tests.simulated_board import make_sysfs
from tests.test_agent_state import make_birth

pytestmark = pytest.mark.slow

MAC = "02:00:00:5E:00:01"
CLIENT_ID = "dev-e2e-0001"
REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Fleet:
    """Server side of one test: service, broker, ACL/CRL sync, one registered device."""

    database: Database
    ca: CertificateAuthority
    broker: LocalBroker
    server: ProvisioningServer
    sync: AclSync

    def device(self) -> Document | None:
        return self.database.collection(DEVICES).find_one({"clientId": CLIENT_ID})

    def status(self) -> str | None:
        doc = self.device()
        return None if doc is None else str(doc.get("status"))

    def allocate(self) -> None:
        user = ObjectId()
        self.database.collection(USERS).insert_one({"_id": user, "email": "owner@example.com"})
        DeviceRepository(self.database).allocate(CLIENT_ID, str(user))

    def active_certificates(self) -> list[Document]:
        return list(
            self.database.collection(DEVICE_CERTIFICATES).find(
                {"device_id": CLIENT_ID, "status": CertificateStatus.ACTIVE.value}
            )
        )


@pytest.fixture
def fleet_factory(
    database: Database, broker: LocalBroker, ca: CertificateAuthority
) -> Iterator[Callable[..., Fleet]]:
    started: list[Fleet] = []

    def start(validity: timedelta = timedelta(days=90)) -> Fleet:
        policy = ServicePolicy(
            certificate_validity=validity,
            not_allocated_retry_after=0.3,
            reprovision_retry_after=0.3,
            renew_min_interval=1.0,
            status_write_interval=0.0,
        )
        service = ProvisioningService(database, ca, policy)
        server = ProvisioningServer(
            service, ca, BrokerEndpoint("127.0.0.1", broker.layout.server_port)
        )
        server.start()
        assert server.wait_connected(10)
        sync = AclSync(database, ca, broker.layout, interval=0.2).start()
        DeviceRepository(database).add(MAC, CLIENT_ID)
        fleet = Fleet(database, ca, broker, server, sync)
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        fleet.sync.stop()
        fleet.server.stop()


class AgentProcess:
    """The agent's files and its process (restartable)."""

    def __init__(
        self, tmp_path: Path, fleet: Fleet, timing: str = "", operational_port: int = 0
    ) -> None:
        self.root = tmp_path / "device"
        self.state_dir = self.root / "state"
        sysfs = make_sysfs(self.root / "sys", {"eth0": (MAC.lower(), True)})
        layout = fleet.broker.layout
        make_birth(
            self.state_dir,
            fleet.ca,
            client_id=CLIENT_ID,
            mac=MAC,
            endpoints=Endpoints(
                "127.0.0.1",
                layout.provisioning_port,
                "127.0.0.1",
                operational_port or layout.operational_port,
            ),
        )
        self.config = self.root / "agent.toml"
        self.config.write_text(
            f'[device]\nstate_dir = "{self.state_dir}"\nsysfs_root = "{sysfs}"\n'
            "[timing]\nbackoff_initial_s = 0.1\nbackoff_max_s = 1.0\nrequest_timeout_s = 3\n"
            f"heartbeat_s = 1\nkeepalive_s = 5\n{timing}"
        )
        self.log = self.root / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_AGENT_")}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                stdout=log, stderr=log, cwd=REPO, env=env,
            )  # fmt: skip

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def state(self) -> dict[str, Any]:
        try:
            obj: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return obj

    def wait_state(self, state: str, timeout: float = 30) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            assert self.process is not None and self.process.poll() is None, self.log_text()
            current = self.state()
            return current if current.get("state") == state else None

        try:
            result: dict[str, Any] = wait_for(check, timeout, f"agent state {state}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.log_text()[-6000:]}") from None
        return result

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(15)
        self.process = None
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGKILL)

    def live_certificate(self) -> x509.Certificate:
        paths = CertificateStore(certs_dir(self.state_dir)).live_paths()
        return x509.load_pem_x509_certificate(paths.cert.read_bytes())

    def assert_key_matches_live_cert(self) -> None:
        paths = CertificateStore(certs_dir(self.state_dir)).live_paths()
        assert paths.key is not None
        key = serialization.load_pem_private_key(paths.key.read_bytes(), None)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        cert_key = self.live_certificate().public_key().public_bytes(*spki)
        assert key.public_key().public_bytes(*spki) == cert_key

    def op_key_slots(self) -> list[str]:
        return sorted(p.name for p in keys_dir(self.state_dir).glob("op-*.key"))


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    agents: list[AgentProcess] = []

    def make(fleet: Fleet, timing: str = "", operational_port: int = 0) -> AgentProcess:
        agent = AgentProcess(tmp_path, fleet, timing, operational_port)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


def assert_converged(fleet: Fleet, agent: AgentProcess) -> None:
    """ACTIVE on both sides, one active certificate, and it is the one the agent holds."""
    record = agent.wait_state("ACTIVE")
    wait_for(lambda: fleet.status() == "ACTIVE", 15, "device ACTIVE in MongoDB")
    active = fleet.active_certificates()
    assert len(active) == 1, active
    serial = format(agent.live_certificate().serial_number, "X")
    assert active[0]["serial"] == serial == record["cert_serial"]
    device = fleet.device()
    assert device is not None and device["certificateSerial"] == serial
    agent.assert_key_matches_live_cert()
    assert agent.op_key_slots() == []  # keys live in the certificate versions now


# --- tests ----------------------------------------------------------------------------------


def test_unallocated_device_waits_then_becomes_active(
    fleet_factory: Callable[..., Fleet], agent_factory: Callable[..., AgentProcess]
) -> None:
    fleet = fleet_factory()
    agent = agent_factory(fleet)
    agent.start()
    wait_for(
        lambda: agent.log_text().count("event=waiting_for_allocation") >= 2,
        30,
        "two NOT_ALLOCATED answers",
    )
    assert agent.state()["state"] == "NEED_TOKEN" and fleet.status() == "UNALLOCATED"
    fleet.allocate()
    assert_converged(fleet, agent)
    device = fleet.device()
    assert device is not None
    cert = agent.live_certificate()
    assert device["macID"] == MAC and isinstance(device["userId"], ObjectId)
    assert device["crt"] == cert.public_bytes(serialization.Encoding.PEM).decode()
    assert device["provisioningToken"].startswith("sha256:") and device["tokenUsed"] is True
    for field in ("provisionedAt", "certificateExpiresAt", "lastSeenAt", "allocatedAt"):
        assert device.get(field) is not None, field
    assert device.get("ca_certificate")
    record = fleet.active_certificates()[0]
    assert record["private_key"] == "" and record["user_id"] == device["userId"]
    # Nothing secret in the agent's log: not the token, not a key.
    text = agent.log_text()
    assert "PRIVATE KEY" not in text and '"token"' not in text
    token = json.dumps(agent.state())  # the token is cleared once used
    assert agent.state().get("token") is None, token
    # SIGTERM: retained offline, clean exit.
    assert agent.kill(signal.SIGTERM) == 0
    wait_for(lambda: fleet.status() == "OFFLINE", 15, "OFFLINE after SIGTERM")


def test_file_modes_of_everything_the_agent_writes(
    fleet_factory: Callable[..., Fleet], agent_factory: Callable[..., AgentProcess]
) -> None:
    fleet = fleet_factory()
    fleet.allocate()
    agent = agent_factory(fleet)
    agent.start()
    assert_converged(fleet, agent)
    agent.kill(signal.SIGTERM)
    for path in [agent.state_dir, *agent.state_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        if path.is_dir():
            assert mode == 0o700, f"{path} is {mode:04o}"
        else:
            assert mode == 0o600, f"{path} is {mode:04o}"


def test_sigkill_publishes_offline_through_the_last_will(
    fleet_factory: Callable[..., Fleet], agent_factory: Callable[..., AgentProcess]
) -> None:
    fleet = fleet_factory()
    fleet.allocate()
    agent = agent_factory(fleet)
    agent.start()
    assert_converged(fleet, agent)
    agent.kill(signal.SIGKILL)  # no clean DISCONNECT: only the broker's will says offline
    wait_for(lambda: fleet.status() == "OFFLINE", 20, "OFFLINE via the last will")


def test_broker_restart_reconnects(
    fleet_factory: Callable[..., Fleet], agent_factory: Callable[..., AgentProcess]
) -> None:
    fleet = fleet_factory()
    fleet.allocate()
    agent = agent_factory(fleet)
    agent.start()
    assert_converged(fleet, agent)
    connects = agent.log_text().count("event=connected")
    fleet.broker.mosquitto.restart()
    wait_for(lambda: agent.log_text().count("event=connected") > connects, 30, "agent reconnect")
    # Retained status was lost with the broker (no persistence); the agent says online again.
    fleet.database.collection(DEVICES).update_one(
        {"clientId": CLIENT_ID}, {"$set": {"status": "OFFLINE"}}
    )
    assert_converged(fleet, agent)


def test_renewal_replaces_the_certificate_before_it_expires(
    fleet_factory: Callable[..., Fleet], agent_factory: Callable[..., AgentProcess]
) -> None:
    life = CLOCK_SKEW + timedelta(seconds=30)
    fleet = fleet_factory(validity=life)
    fleet.allocate()
    # Renew about 6 s after issue (the certificate's life starts CLOCK_SKEW in the past).
    fraction = (CLOCK_SKEW.total_seconds() + 6) / life.total_seconds()
    agent = agent_factory(fleet, timing=f"renew_fraction = {fraction}\n")
    agent.start()
    first = agent.wait_state("ACTIVE")["cert_serial"]
    wait_for(
        lambda: (
            agent.state().get("cert_serial") not in (None, first)
            and agent.state().get("state") == "ACTIVE"
        ),
        40,
        "a renewed certificate",
    )
    assert_converged(fleet, agent)
    revoked = fleet.database.collection(CERTIFICATE_REVOCATIONS).find_one({"serial": first})
    assert revoked is not None  # the old certificate is revoked once the new one is confirmed
    assert "to=RENEWING" in agent.log_text()


def test_a_refused_renew_confirm_keeps_the_old_certificate_and_renews_again(
    fleet_factory: Callable[..., Fleet], agent_factory: Callable[..., AgentProcess]
) -> None:
    """The server refuses ``renew-confirm`` for good (PROOF_INVALID): the agent must not
    use the refused certificate, drops it and its key, stays on the old certificate
    (still current in MongoDB) and renews again with a fresh key."""
    life = CLOCK_SKEW + timedelta(seconds=30)
    fleet = fleet_factory(validity=life)
    fleet.allocate()
    relay = GatedRelay(fleet.broker.layout.operational_port)
    fraction = (CLOCK_SKEW.total_seconds() + 6) / life.total_seconds()
    agent = agent_factory(
        fleet, timing=f"renew_fraction = {fraction}\n", operational_port=relay.port
    )
    try:
        agent.start()
        first = agent.wait_state("ACTIVE")["cert_serial"]
        # Hold the agent's next connection (the one with its new certificate) ...
        relay.close_gate()
        staged = wait_for(lambda: agent.state().get("renew_version"), 30, "a staged renewal")
        wait_for(lambda: relay.held >= 1, 15, "the new certificate's connection at the gate")
        pending = fleet.database.collection(DEVICE_CERTIFICATES).find_one(
            {"device_id": CLIENT_ID, "renewal": {"$exists": True}}
        )
        assert pending is not None
        refused_serial = pending["renewal"]["serial"]
        # ... while the server's nonce changes: the agent's proof can no longer verify.
        fleet.database.collection(DEVICE_CERTIFICATES).update_one(
            {"_id": pending["_id"]}, {"$set": {"renewal.nonce": "not-the-one-sent"}}
        )
        relay.open_gate()
        wait_for(lambda: "event=renew_confirm_refused" in agent.log_text(), 30, "the refusal")
        record = agent.wait_state("ACTIVE")
        assert record.get("renew_version") is None and record["cert_serial"] != refused_serial
        assert format(agent.live_certificate().serial_number, "X") != refused_serial
        assert CertificateStore(certs_dir(agent.state_dir)).live_version() != staged
        assert len(agent.op_key_slots()) <= 1  # the refused certificate's key slot is gone
        device = fleet.device()
        assert device is not None and device["certificateSerial"] == first
        # A fresh key and a new renewal then succeed.
        wait_for(
            lambda: (
                agent.state().get("cert_serial") not in (None, first, refused_serial)
                and agent.state().get("state") == "ACTIVE"
            ),
            40,
            "a renewal after the refusal",
        )
        assert_converged(fleet, agent)
    finally:
        agent.stop()
        relay.close()


def test_revoked_certificate_leads_to_reprovisioning(
    fleet_factory: Callable[..., Fleet], agent_factory: Callable[..., AgentProcess]
) -> None:
    fleet = fleet_factory()
    fleet.allocate()
    agent = agent_factory(fleet)
    agent.start()
    first = agent.wait_state("ACTIVE")["cert_serial"]
    assert_converged(fleet, agent)
    revoke_device(fleet.database, CLIENT_ID, "key compromise")
    # Refused by the broker, the agent asks for a token with its birth certificate and
    # waits: a device that was in service re-provisions only once an operator approves.
    wait_for(lambda: "REPROVISION_NOT_APPROVED" in agent.log_text(), 30, "the agent to be refused")
    assert agent.state().get("cert_serial") == first
    approve_reprovision(fleet.database, CLIENT_ID, offline_timeout=timedelta(seconds=180))
    wait_for(
        lambda: (
            agent.state().get("cert_serial") not in (None, first)
            and agent.state().get("state") == "ACTIVE"
        ),
        60,
        "a re-provisioned certificate",
    )
    assert_converged(fleet, agent)
    text = agent.log_text()
    assert "event=certificate_refused" in text and "to=NEED_TOKEN" in text


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")  # pragma: no cover


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss")  # pragma: no cover


def test_memory_of_an_active_agent(
    fleet_factory: Callable[..., Fleet], agent_factory: Callable[..., AgentProcess]
) -> None:
    """An idle ACTIVE agent stays under 30 MB RSS (design.md §7): after provisioning it
    re-executes itself (same PID) so the long-running process never holds cryptography."""
    fleet = fleet_factory()
    agent = agent_factory(fleet)
    identity = agent.state_dir / "identity.json"
    saved = identity.read_bytes()
    identity.unlink()  # not provisioned yet: nothing to connect to
    agent.start()
    assert agent.process is not None
    wait_for(lambda: "event=start" in agent.log_text(), 20, "agent start")
    time.sleep(0.5)
    idle = _status_kib(agent.process.pid, "VmRSS")
    assert agent.kill(signal.SIGTERM) == 0
    identity.write_bytes(saved)
    fleet.allocate()
    agent.start()
    assert_converged(fleet, agent)
    assert agent.process is not None
    pid = agent.process.pid
    time.sleep(3)  # a few heartbeats: idle, not the connect peak
    active, pss = _status_kib(pid, "VmRSS"), _pss_kib(pid)
    print(f"agent: unprovisioned {idle} KiB RSS; active {active} KiB RSS, {pss} KiB PSS")
    assert f'event=restart reason="certificate stored" pid={pid}' in agent.log_text()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:4] == [b"-m", b"agent", b"run"], cmdline  # click-free service entry
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "cryptography" not in maps  # its Rust/OpenSSL extension alone is ~6 MB
    # Measured on the dev venv (Python 3.11, x86-64): ~21 MB unprovisioned, ~26 MB ACTIVE;
    # see docs/agent.md "Memory" for what the floor is made of.
    assert idle < 24 * 1024, idle
    assert active < 30 * 1024, active


def test_service_entry_is_click_free_and_hands_everything_else_to_the_cli(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_AGENT_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
        )

    probe = run(
        "-c",
        "import sys, agent.__main__, agent.runner, agent.session\n"
        "print(sorted({'click', 'cryptography'} & set(sys.modules)))",
    )
    assert probe.stdout.strip() == "[]", probe.stderr  # only paho (session) is heavy
    assert parse_run(["run"]) == (None, False)
    assert parse_run(["run", "-v", "--config", "a.toml"]) == (Path("a.toml"), True)
    assert parse_run(["run", "--config=a.toml"]) == (Path("a.toml"), False)
    for other in ([], ["status"], ["run", "--help"], ["run", "--config"], ["run", "x"]):
        assert parse_run(other) is None, other
    usage = run("-m", "agent", "--help")
    assert usage.returncode == 0 and "factory-console" in usage.stdout, usage.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker]\nprovisioning_port = 0\n")
    for entry in (("-m", "agent"), ("-m", "agent.cli")):
        failed = run(*entry, "run", "--config", str(bad))
        assert failed.returncode == 1, failed.stderr
        assert failed.stderr.count("\n") == 1, failed.stderr
        assert "provision-agent: error:" in failed.stderr and "provisioning_port" in failed.stderr

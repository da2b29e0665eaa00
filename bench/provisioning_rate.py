"""End-to-end provisioning on real services: database, Mosquitto with TLS, server process.

``BenchStack`` starts everything exactly as the tests do; ``run_fleet`` provisions a
batch of light devices with bounded concurrency and takes its end time from the
database (the moment the last device of the batch is ACTIVE there), not from the
clients.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Final

import pymongo.monitoring

from agent.birth import Endpoints
from bench.lightweight_device import DeviceIdentity, DeviceTiming, provision
from server.broker_config import BrokerLayout, start_local_broker
from server.ca import CertificateAuthority
from server.db import Database
from server.devices import DeviceRepository, utcnow
from server.local_services import MongoWireServer, MosquittoBroker
from server.provisioning import ProvisioningService, ServicePolicy
from server.schema import DEVICES, DeviceStatus
from server.simulated_fleet import SimulatedBoard
from server.users import UserRepository

POLL_INTERVAL_S: Final = 0.2
SERVER_READY_TIMEOUT_S: Final = 20.0
OFFLINE_TIMEOUT_S: Final = 86_400
Progress = Callable[[str], None]


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split among their users), 0 if unknown."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes(pid: int) -> int:
    """Resident set size of a process from /proc (0 once it has gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: the value some device really saw)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def _with_database(uri: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(uri)._replace(path="/" + name))


class BenchStack:
    """Database (``MONGODB_URI`` or secantusd-py), CA, Mosquitto and server processes."""

    def __init__(self, workdir: Path, progress: Progress) -> None:
        self.workdir = workdir
        self.progress = progress
        self._mongo: MongoWireServer | None = None
        external = os.environ.get("MONGODB_URI")
        name = f"bench_{uuid.uuid4().hex[:10]}"
        if external:
            self.external_db = True
            self.mongodb_uri = _with_database(external, name)
        else:
            self.external_db = False
            progress("starting secantusd-py (MongoDB wire server)")
            self._mongo = MongoWireServer(workdir / "mongo").start()
            self.mongodb_uri = _with_database(self._mongo.uri, name)
        self.database = Database(self.mongodb_uri)
        self.database.init()
        self.ca = CertificateAuthority.init(workdir / "ca")
        progress("starting mosquitto with generated TLS config")
        self.broker: MosquittoBroker
        self.layout: BrokerLayout
        self.broker, self.layout = start_local_broker(workdir / "broker", self.ca)
        self.servers: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []
        self._registered = 0
        self._started = 0
        self.user_id = str(UserRepository(self.database).add("bench@example.com", "bench")["_id"])

    @property
    def database_name(self) -> str:
        return self.database.db.name

    def start_servers(self, count: int) -> float:
        """``count`` ``provision-server run`` processes, subscribed and idle.

        Returns the seconds they spent on the retained status replay after subscribing.
        """
        exe = Path(sys.executable).with_name("provision-server")
        for _ in range(count):
            log = self.workdir / f"server-{self._started}.log"
            self._started += 1
            argv = [
                str(exe), "--mongodb-uri", self.mongodb_uri, "run",
                "--ca-dir", str(self.ca.paths.directory),
                "--broker-host", "127.0.0.1", "--broker-port", str(self.layout.server_port),
            ]  # fmt: skip
            # Light devices disconnect once online (no heartbeats), so the server's
            # silence sweep (180 s by default) would turn them OFFLINE mid-run.
            env = os.environ | {
                "MONGODB_URI": self.mongodb_uri,
                "PROVISION_SERVER_POLICY_OFFLINE_TIMEOUT_S": str(OFFLINE_TIMEOUT_S),
            }
            with log.open("ab") as out:
                self.servers.append(
                    subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
                )
            self._logs.append(log)
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        for proc, log in zip(self.servers, self._logs, strict=True):
            while "event=broker-connect result=ok" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"provision-server did not come up:\n{self.server_logs()}")
                time.sleep(0.05)
        return self._wait_until_quiet()

    def _wait_until_quiet(self, quiet_s: float = 1.0, timeout: float = 300.0) -> float:
        """Seconds until the new servers' logs stop growing.

        On subscribing, every server is sent every retained ``devices/+/status`` message
        (Mosquitto 2.0.11 does so for shared subscriptions too) and handles each one; a
        timed run must not start while that replay still occupies them.
        """
        started = time.monotonic()
        time.sleep(0.3)  # the SUBACK follows the CONNACK callback
        last_size, last_change = -1, time.monotonic()
        while time.monotonic() - started < timeout:
            size = sum(log.stat().st_size for log in self._logs)
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change >= quiet_s:
                return last_change - started
            time.sleep(0.1)
        raise RuntimeError(f"provision-server logs still growing after {timeout:.0f} s")

    def stop_servers(self) -> None:
        """SIGTERM every server and wait; their logs stay (server-<n>.log) for a look."""
        for proc in self.servers:
            proc.terminate()
        for proc in self.servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.servers = []
        self._logs = []

    def server_logs(self, tail: int = 3000) -> str:
        return "\n".join(log.read_text(errors="replace")[-tail:] for log in self._logs)

    def server_rss(self) -> int:
        return sum(rss_bytes(proc.pid) for proc in self.servers)

    def next_mac(self) -> str:
        """A locally administered MAC not used before in this run."""
        serial, self._registered = self._registered, self._registered + 1
        return f"02:be:00:{serial >> 16 & 0xFF:02x}:{serial >> 8 & 0xFF:02x}:{serial & 0xFF:02x}"

    def register(self, prefix: str, count: int) -> list[DeviceIdentity]:
        """Birth identities for ``count`` boards, registered UNALLOCATED, then allocated."""
        repo = DeviceRepository(self.database)
        identities: list[DeviceIdentity] = []
        for index in range(count):
            client_id = f"{prefix}-{index:05d}"
            mac = self.next_mac()
            identity = DeviceIdentity.create(
                self.ca, self.workdir / "devices" / client_id, client_id, mac
            )
            repo.add(mac, client_id)
            repo.allocate(client_id, self.user_id)
            identities.append(identity)
        return identities

    def active_count(self, since: datetime | None = None) -> int:
        """Devices ACTIVE now (whose last status write was at or after ``since``)."""
        query: dict[str, object] = {"status": DeviceStatus.ACTIVE.value}
        if since is not None:
            query["lastSeenAt"] = {"$gte": since}
        return self.database.collection(DEVICES).count_documents(query)

    def statuses(self, client_ids: Sequence[str]) -> dict[str, str]:
        docs = self.database.collection(DEVICES).find(
            {"clientId": {"$in": list(client_ids)}}, {"clientId": 1, "status": 1}
        )
        return {doc["clientId"]: str(doc.get("status")) for doc in docs}

    def close(self) -> None:
        self.stop_servers()
        self.broker.stop()
        if self.external_db:
            self.database.client.drop_database(self.database_name)
        self.database.close()
        if self._mongo is not None:
            self._mongo.stop()

    def __enter__(self) -> BenchStack:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class FleetResult:
    devices: int
    servers: int
    concurrency: int
    seconds: float
    """First token request to the last device ACTIVE in the database."""
    timings: tuple[DeviceTiming, ...]
    active_in_db: int
    failures: tuple[str, ...]
    server_rss_peak: int
    server_rss_idle: int

    @property
    def per_second(self) -> float:
        return self.active_in_db / self.seconds if self.seconds > 0 else 0.0

    def latency(self, which: str, fraction: float) -> float:
        values = [getattr(t, which) for t in self.timings]
        return percentile(values, fraction)

    @property
    def retries(self) -> int:
        return sum(t.retries for t in self.timings)


@dataclass
class _Watch:
    """Polls the database and the server's RSS while a batch runs."""

    stack: BenchStack
    target: int
    since: datetime
    progress: Progress
    done_at: float | None = None
    rss_peak: int = 0
    active: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last_report = 0.0
        while not self.stop.is_set():
            self.rss_peak = max(self.rss_peak, self.stack.server_rss())
            self.active = self.stack.active_count(self.since)
            now = time.monotonic()
            if self.active >= self.target and self.done_at is None:
                self.done_at = now
                return
            if now - last_report >= 1.0:
                last_report = now
                self.progress(f"  ACTIVE in database: {self.active}/{self.target}")
            self.stop.wait(POLL_INTERVAL_S)


def run_fleet(
    stack: BenchStack,
    identities: Sequence[DeviceIdentity],
    concurrency: int,
    progress: Progress,
    settle_timeout: float = 60.0,
) -> FleetResult:
    """Provision every identity (at most ``concurrency`` in flight) and wait for ACTIVE."""
    idle_rss = stack.server_rss()
    # Counted by lastSeenAt: earlier batches' devices stay out of this one's count.
    since = utcnow() - timedelta(milliseconds=5)
    watch = _Watch(stack, len(identities), since, progress)
    watcher = threading.Thread(target=watch.run, name="bench-watch", daemon=True)
    root = stack.ca.paths.root_cert
    layout = stack.layout
    failures: list[str] = []
    timings: list[DeviceTiming] = []
    watcher.start()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="device")
    try:
        futures = [
            pool.submit(provision, i, root, layout.provisioning_port, layout.operational_port)
            for i in identities
        ]
        for future in futures:
            try:
                timings.append(future.result())
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    except BaseException:
        # Ctrl-C: drop the queued devices; only those in flight still finish.
        watch.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    watcher.join(settle_timeout)
    watch.stop.set()
    watcher.join()
    first = min((t.token_requested for t in timings), default=time.monotonic())
    end = watch.done_at if watch.done_at is not None else time.monotonic()
    statuses = stack.statuses([i.client_id for i in identities])
    active = sum(1 for s in statuses.values() if s == DeviceStatus.ACTIVE.value)
    return FleetResult(
        devices=len(identities),
        servers=len(stack.servers),
        concurrency=concurrency,
        seconds=end - first,
        timings=tuple(timings),
        active_in_db=active,
        failures=tuple(failures),
        server_rss_peak=watch.rss_peak,
        server_rss_idle=idle_rss,
    )


def first_boot_to_active(stack: BenchStack, samples: int) -> list[float]:
    """Seconds from a single allocated device's first connection to ACTIVE in the database.

    One device at a time on an idle server: connect with the birth certificate, token,
    CSR, operational session, ``online``; the clock stops when the database says ACTIVE.
    """
    identities = stack.register(f"boot-{uuid.uuid4().hex[:4]}", samples)
    devices = stack.database.collection(DEVICES)
    root, layout = stack.ca.paths.root_cert, stack.layout
    durations: list[float] = []
    for identity in identities:
        started = time.monotonic()
        provision(identity, root, layout.provisioning_port, layout.operational_port)
        deadline = started + 30
        while True:
            doc = devices.find_one({"clientId": identity.client_id}, {"status": 1})
            if doc is not None and doc.get("status") == DeviceStatus.ACTIVE.value:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{identity.client_id} never became ACTIVE")
            time.sleep(0.005)
        durations.append(time.monotonic() - started)
    return durations


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class _CommandCounter(pymongo.monitoring.CommandListener):
    """Counts the database commands one thread sends (sync pymongo reports in the caller)."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.count = 0

    def started(self, event: pymongo.monitoring.CommandStartedEvent) -> None:
        if threading.get_ident() == self.thread:
            self.count += 1

    def succeeded(self, event: pymongo.monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: pymongo.monitoring.CommandFailedEvent) -> None:
        pass


_COUNTER = _CommandCounter()
pymongo.monitoring.register(_COUNTER)


@dataclass(frozen=True)
class ServiceRate:
    """The server's request handling with its database, without MQTT, on one thread."""

    count: int
    seconds: float
    commands: int

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def commands_per_device(self) -> float:
        return self.commands / self.count if self.count else 0.0


def measure_service_rate(stack: BenchStack, identities: Sequence[DeviceIdentity]) -> ServiceRate:
    """Token, CSR and online for each device through ``ProvisioningService`` directly."""
    database = Database(stack.mongodb_uri)
    service = ProvisioningService(database, stack.ca, ServicePolicy(status_write_interval=0.0))
    online = b'{"v":1,"status":"online"}'
    _COUNTER.thread, _COUNTER.count = threading.get_ident(), 0
    started = time.perf_counter()
    try:
        for i in identities:
            token = {"v": 1, "op": "token", "mac": i.mac, "cert": i.birth_pem}
            answer = json.loads(service.handle_request(i.client_id, json.dumps(token).encode()))
            csr = {"v": 1, "op": "csr", "token": answer.get("token"), "csr": i.csr_pem}
            answer = json.loads(service.handle_request(i.client_id, json.dumps(csr).encode()))
            if not answer.get("ok"):
                raise RuntimeError(f"in-process provisioning of {i.client_id} failed: {answer}")
            service.handle_status(i.client_id, online)
        seconds = time.perf_counter() - started
    finally:
        _COUNTER.thread = None
        database.close()
    return ServiceRate(len(identities), seconds, _COUNTER.count)


@dataclass(frozen=True)
class AgentResult:
    """Real ``provision-agent run`` processes, one at a time, from exec to ACTIVE."""

    boot_seconds: tuple[float, ...]
    rss_active_idle: tuple[int, ...]
    pss_active_idle: tuple[int, ...]


def real_agent_boots(stack: BenchStack, samples: int, idle_s: float = 2.0) -> AgentResult:
    """Start the real agent on a simulated board; time to ACTIVE; memory once idle."""
    repo = DeviceRepository(stack.database)
    devices = stack.database.collection(DEVICES)
    endpoints = Endpoints(
        "127.0.0.1", stack.layout.provisioning_port, "127.0.0.1", stack.layout.operational_port
    )
    boots: list[float] = []
    rss: list[int] = []
    pss: list[int] = []
    for index in range(samples):
        mac = stack.next_mac()
        client_id = f"agent-{uuid.uuid4().hex[:6]}-{index}"
        board = SimulatedBoard(stack.workdir / "boards" / client_id, client_id, mac)
        board.prepare()
        board.factory_identity(stack.ca, endpoints)
        repo.add(mac, client_id)
        repo.allocate(client_id, stack.user_id)
        started = time.monotonic()
        board.start_agent()
        try:
            while True:
                doc = devices.find_one({"clientId": client_id}, {"status": 1})
                if doc is not None and doc.get("status") == DeviceStatus.ACTIVE.value:
                    break
                if time.monotonic() - started > 60 or (
                    board.process is not None and board.process.poll() is not None
                ):
                    raise RuntimeError(f"agent {client_id} never became ACTIVE")
                time.sleep(0.01)
            boots.append(time.monotonic() - started)
            time.sleep(idle_s)
            assert board.process is not None
            rss.append(rss_bytes(board.process.pid))
            pss.append(pss_bytes(board.process.pid))
        finally:
            board.stop_agent()
    return AgentResult(tuple(boots), tuple(rss), tuple(pss))

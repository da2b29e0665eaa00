"""End-to-end provisioning on real services: database, Mosquitto with TLS, server process.

``BenchStack`` starts everything exactly as the tests do; ``run_fleet`` provisions a
batch of light devices with bounded concurrency and takes its end time from the
database (the moment the last device of the batch is ACTIVE there), not from the
clients.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import pymongo.monitoring

from agent.birth import Endpoints
from bench.batch_progress import BatchProgress, lookup_statuses
from bench.cpu_usage import CpuMeter, CpuUsage
from bench.lightweight_device import DeviceIdentity, DeviceTiming, provision
from bench.stack import BenchStack, Progress, percentile, pss_bytes, rss_bytes
from harness.simulated_fleet import SimulatedBoard
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.schema import DEVICES, DeviceStatus

POLL_INTERVAL_S: Final = 0.2


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
    not_active: tuple[str, ...]
    """``clientId: status`` of every device of the batch not ACTIVE at the end."""
    server_rss_peak: int
    server_rss_idle: int
    cpu: CpuUsage | None = None
    """CPU per process and database commands while the batch ran."""

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
    """Polls the batch's devices in the database and the servers' RSS while a batch runs."""

    stack: BenchStack
    batch: BatchProgress
    progress: Progress
    done_at: float | None = None
    rss_peak: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last_report = 0.0
        while not self.stop.is_set():
            self.rss_peak = max(self.rss_peak, self.stack.server_rss())
            active = self.batch.poll()
            now = time.monotonic()
            if self.batch.done:
                self.done_at = now
                return
            if now - last_report >= 1.0:
                last_report = now
                self.progress(f"  ACTIVE in database: {active}/{self.batch.total}")
            self.stop.wait(POLL_INTERVAL_S)


def _finished(batch: BatchProgress, client_id: str, _future: object) -> None:
    batch.finished(client_id)


def run_fleet(
    stack: BenchStack,
    identities: Sequence[DeviceIdentity],
    concurrency: int,
    progress: Progress,
    settle_timeout: float = 60.0,
) -> FleetResult:
    """Provision every identity (at most ``concurrency`` in flight) and wait for ACTIVE.

    The run ends when every device of the batch has been seen ACTIVE in the database
    (or ``settle_timeout`` after the last client finished); the final statuses are then
    read per device, and any device not ACTIVE is reported with its status.
    """
    idle_rss = stack.server_rss()
    devices = stack.database.collection(DEVICES)
    batch = BatchProgress(devices, (i.client_id for i in identities))
    watch = _Watch(stack, batch, progress)
    watcher = threading.Thread(target=watch.run, name="bench-watch", daemon=True)
    root = stack.ca.paths.root_cert
    layout = stack.layout
    failures: list[str] = []
    timings: list[DeviceTiming] = []
    meter = CpuMeter(stack.process_ids, stack.server_status)
    meter.start()
    watcher.start()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="device")
    try:
        futures = []
        for identity in identities:
            future = pool.submit(
                provision, identity, root, layout.provisioning_port, layout.operational_port
            )
            future.add_done_callback(partial(_finished, batch, identity.client_id))
            futures.append(future)
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
    cpu = meter.stop()
    first = min((t.token_requested for t in timings), default=time.monotonic())
    end = watch.done_at if watch.done_at is not None else time.monotonic()
    statuses = lookup_statuses(devices, (i.client_id for i in identities))
    not_active = tuple(
        f"{client_id}: {status}"
        for client_id, status in sorted(statuses.items())
        if status != DeviceStatus.ACTIVE.value
    )
    return FleetResult(
        devices=len(identities),
        servers=len(stack.servers),
        concurrency=concurrency,
        seconds=end - first,
        timings=tuple(timings),
        active_in_db=len(statuses) - len(not_active),
        failures=tuple(failures),
        not_active=not_active,
        server_rss_peak=watch.rss_peak,
        server_rss_idle=idle_rss,
        cpu=cpu,
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
    database = Database(stack.server_uri)
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

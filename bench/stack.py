"""The benchmark's services: database, CA, Mosquitto and provisioning-server processes.

``BenchStack`` starts everything exactly as the tests do; the /proc readers measure the
server processes it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from bench.db_proxy import LatencyProxy
from bench.fleet_prefill import bench_listener_conf
from bench.lightweight_device import DeviceIdentity
from harness.local_broker import start_local_broker
from harness.local_services import MongoWireServer, MosquittoBroker, free_port
from server.broker.mosquitto_conf import BrokerLayout
from server.pki.ca import CertificateAuthority
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.users import UserRepository

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


@dataclass(frozen=True)
class ServerStart:
    """How long new servers took: spawn to connected, then busy after subscribing."""

    connected_s: float
    busy_s: float
    """Until their logs stopped growing (the retained-status replay, if any)."""

    @property
    def total_s(self) -> float:
        return self.connected_s + self.busy_s


class BenchStack:
    """Database (``MONGODB_URI`` or secantusd-py), CA, Mosquitto and server processes."""

    def __init__(
        self,
        workdir: Path,
        progress: Progress,
        *,
        db_rtt_ms: float = 0.0,
        fleet_listener: bool = False,
        server_env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.server_env = dict(server_env or {})
        """Extra environment of the servers (``PROVISION_SERVER_*`` settings)."""
        self.progress = progress
        self._proxy: LatencyProxy | None = None
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
        # What the servers (and the in-process service measure) use: the database, or the
        # database behind a latency proxy. The benchmark's own bookkeeping goes direct.
        self.server_uri = self.mongodb_uri
        if db_rtt_ms > 0:
            progress(f"starting a TCP proxy adding {db_rtt_ms:g} ms RTT to the database")
            self._proxy = LatencyProxy(self.mongodb_uri, db_rtt_ms, workdir / "db-proxy.log")
            self.server_uri = self._proxy.start().uri
        self.ca = CertificateAuthority.init(workdir / "ca")
        progress("starting mosquitto with generated TLS config")
        self.broker: MosquittoBroker
        self.layout: BrokerLayout
        self.broker, self.layout = start_local_broker(workdir / "broker", self.ca)
        self.fleet_port: int | None = None
        if fleet_listener:
            self.fleet_port = free_port()
            with self.layout.conf_path.open("a") as conf:
                conf.write(bench_listener_conf(self.fleet_port))
            self.broker.ports = (*self.broker.ports, self.fleet_port)
            self.broker.restart()
        self.servers: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []
        self._registered = 0
        self._started = 0
        self.user_id = str(UserRepository(self.database).add("bench@example.com", "bench")["_id"])

    @property
    def database_name(self) -> str:
        return self.database.db.name

    def start_servers(self, count: int) -> ServerStart:
        """``count`` ``provision-server run`` processes, subscribed and idle."""
        spawned = time.monotonic()
        exe = Path(sys.executable).with_name("provision-server")
        for _ in range(count):
            log = self.workdir / f"server-{self._started}.log"
            self._started += 1
            argv = [
                str(exe), "--mongodb-uri", self.server_uri, "run",
                "--ca-dir", str(self.ca.paths.directory),
                "--broker-host", "127.0.0.1", "--broker-port", str(self.layout.server_port),
            ]  # fmt: skip
            # Light devices disconnect once online (no heartbeats), so the server's
            # silence sweep (180 s by default) would turn them OFFLINE mid-run.
            env = os.environ | {
                "MONGODB_URI": self.server_uri,
                "PROVISION_SERVER_POLICY_OFFLINE_TIMEOUT_S": str(OFFLINE_TIMEOUT_S),
                **self.server_env,
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
        connected = time.monotonic() - spawned
        return ServerStart(connected, self._wait_until_quiet())

    def _wait_until_quiet(self, quiet_s: float = 1.0, timeout: float = 300.0) -> float:
        """Seconds until the new servers' logs stop growing (0.3 s at least: the SUBACK).

        Servers no longer take the broker's retained statuses when they subscribe
        (retain handling "do not send"); a server that did would show its replay here,
        and a timed run must not start while anything still occupies them.
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

    def process_ids(self) -> dict[str, list[int]]:
        """The processes a timed run's CPU is charged to, by name (``bench.cpu_usage``)."""
        pids: dict[str, list[int]] = {"simulated devices (bench process)": [os.getpid()]}
        if self._mongo is not None and self._mongo.process is not None:
            pids["secantusd-py (database)"] = [self._mongo.process.pid]
        if self.broker.process is not None:
            pids["mosquitto"] = [self.broker.process.pid]
        for index, proc in enumerate(self.servers):
            pids[f"provision-server {index + 1}"] = [proc.pid]
        if self._proxy is not None and self._proxy.process is not None:
            pids["db latency proxy"] = [self._proxy.process.pid]
        return pids

    def server_status(self) -> dict[str, Any]:
        """The database's ``serverStatus`` (its command counters)."""
        status: dict[str, Any] = self.database.client.admin.command("serverStatus")
        return status

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

    def close(self) -> None:
        self.stop_servers()
        self.broker.stop()
        if self._proxy is not None:
            self._proxy.stop()
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

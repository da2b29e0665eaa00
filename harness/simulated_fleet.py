"""A whole local fleet for the demo and benchmarks: services, server, simulated boards.

Every part is real: secantusd-py (or MONGODB_URI), Mosquitto with generated
TLS, `provision-server run` as a process, and each board a directory (state,
simulated sysfs and device-tree serial) that first runs the factory console
as a process on a pty cable to the station, then the agent as a process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from cryptography.hazmat.primitives import serialization

from agent.birth import BirthIdentity, Endpoints, keys_dir, write_birth_identity
from agent.cli import reset_state
from agent.keystore import FileKeyStore
from harness.local_broker import start_local_broker
from harness.local_services import MongoWireServer, MosquittoBroker
from harness.serial_pair import LineProxy
from harness.simulated_board import make_board_files, make_sysfs
from server.broker.acl_sync import AclSync
from server.broker.layout_file import save_layout
from server.broker.mosquitto_conf import BrokerLayout
from server.errors import ServerError
from server.pki.ca import CertificateAuthority
from server.station.batch import program_many
from server.station.cli import Station
from server.station.config import StationConfig, write_station_config
from server.station.programmer import BoardResult, StepHook
from server.store.db import Database


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@dataclass
class LocalStack:
    """Database, CA, broker, ACL/CRL sync and one provisioning server process."""

    workdir: Path
    mongodb_uri: str
    database: Database
    ca: CertificateAuthority
    broker: MosquittoBroker
    layout: BrokerLayout
    sync: AclSync
    mongo: MongoWireServer | None = None
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        workdir: Path,
        mongodb_uri: str | None = None,
        database_name: str = "device_provisioning_demo",
    ) -> LocalStack:
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        started: list[Callable[[], object]] = []  # stop functions, in start order
        with _interrupts_deferred() as checkpoint:
            try:
                mongo = None
                if mongodb_uri is None:
                    mongo = MongoWireServer(workdir / "mongo").start()
                    started.append(mongo.stop)
                    checkpoint()
                    mongodb_uri = mongo.database_uri(database_name)
                database = Database(mongodb_uri)
                started.append(database.close)
                database.init()
                ca_dir = workdir / "ca"
                if (ca_dir / "root.pem").exists():
                    ca = CertificateAuthority.load(ca_dir)
                else:
                    ca = CertificateAuthority.init(ca_dir)
                ports_file = workdir / "broker-ports.json"
                broker, layout = start_local_broker(
                    workdir / "broker", ca, database, ports=_reusable_ports(ports_file)
                )
                started.append(broker.stop)
                checkpoint()
                # Programmed boards hold these endpoints: keep them for the next run.
                ports_file.write_text(json.dumps(list(layout.ports)) + "\n")
                sync = AclSync(database, ca, layout, interval=0.5).start()
                started.append(sync.stop)
                checkpoint()
            except BaseException:
                for stop in reversed(started):
                    stop()
                raise
            return cls(workdir, mongodb_uri, database, ca, broker, layout, sync, mongo)

    def start_server(
        self, metrics_port: int | None = None, *, broker_sync: bool = False
    ) -> subprocess.Popen[bytes]:
        """``provision-server run`` as a process; with ``metrics_port``, /metrics on loopback.

        ``broker_sync``: the server keeps the broker's ACL/CRL files (as deployed), so its
        metrics show the sync and the CRL horizons; the stack's own sync stops, so one
        process writes the files and reloads the broker, as in production.
        """
        log = self.workdir / f"server-{len(self.servers)}.log"
        argv = [
            _bin("provision-server"),
            "--mongodb-uri",
            self.mongodb_uri,
            "run",
            "--ca-dir",
            str(self.ca.paths.directory),
            "--broker-host",
            "127.0.0.1",
            "--broker-port",
            str(self.layout.server_port),
        ]
        if metrics_port is not None:
            argv += ["--metrics-port", str(metrics_port)]
        if broker_sync:
            self.sync.stop()  # idempotent; stop() at the end of the stack stops it again
            save_layout(self.layout)
            argv += ["--broker-config-dir", str(self.layout.directory)]
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.servers.append(process)
        return process

    @property
    def endpoints(self) -> Endpoints:
        return Endpoints(
            "127.0.0.1", self.layout.provisioning_port, "127.0.0.1", self.layout.operational_port
        )

    def station(self, client_id_pattern: str = "{serial}") -> Station:
        """The factory station of this stack; its config is saved as ``station.toml``."""
        config = StationConfig(
            ca_dir=self.ca.paths.directory,
            mongodb_uri=self.mongodb_uri,
            endpoints=self.endpoints,
            client_id_pattern=client_id_pattern,
        )
        write_station_config(self.station_config_path, config)
        return Station(config, self.ca, self.database)

    @property
    def station_config_path(self) -> Path:
        return self.workdir / "station.toml"

    def stop(self) -> None:
        for process in self.servers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.servers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.sync.stop()
        self.broker.stop()
        self.database.close()
        if self.mongo is not None:
            self.mongo.stop()


@dataclass
class SimulatedBoard:
    """One board: a sysfs tree with its MAC, a state directory, an agent process."""

    root: Path
    client_id: str
    mac: str
    process: subprocess.Popen[bytes] | None = None
    console: subprocess.Popen[bytes] | None = None
    _console_marker: int = 0

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / "agent.toml"

    @property
    def sysfs_root(self) -> Path:
        return self.root / "sys"

    @property
    def console_log(self) -> Path:
        return self.root / "factory-console.log"

    def prepare(self, timing: str = "") -> None:
        """The board's own files: sysfs with its MAC, its serial (= clientId), the agent config."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        sysfs = self.sysfs_root
        if not sysfs.exists():
            make_sysfs(sysfs, {"eth0": (self.mac.lower(), True)})
        make_board_files(self.root, dt_serial=self.client_id.encode("ascii") + b"\0")
        self.config_path.write_text(
            f'[device]\nstate_dir = "{self.state_dir}"\nsysfs_root = "{sysfs}"\n'
            "[timing]\nbackoff_initial_s = 0.2\nbackoff_max_s = 2.0\nrequest_timeout_s = 5\n"
            f"heartbeat_s = 5\nkeepalive_s = 10\n{timing}"
        )

    def birth_endpoints(self) -> Endpoints | None:
        """The broker endpoints the factory wrote on this board (None: not programmed)."""
        identity = BirthIdentity.load(self.state_dir)
        return None if identity is None else identity.endpoints

    def factory_reset(self) -> list[str]:
        """``provision-agent reset``: the board needs the station again."""
        return reset_state(self.state_dir)

    def factory_identity(self, ca: CertificateAuthority, endpoints: Endpoints) -> None:
        """What the station does over serial, done directly (for benchmarks)."""
        keystore = FileKeyStore(keys_dir(self.state_dir))
        public = (
            keystore.public_key("birth") if keystore.exists("birth") else keystore.generate("birth")
        )
        cert = ca.sign_birth_certificate(public, self.client_id, self.mac)
        write_birth_identity(
            self.state_dir,
            client_id=self.client_id,
            mac=self.mac,
            serial=self.client_id,
            endpoints=endpoints,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            chain_pem=ca.factory_ca_chain_pem,
            finalized=True,
        )

    def start_factory_console(self, port: str) -> None:
        """``provision-agent factory-console`` on ``port``, as the factory image runs it."""
        self._console_marker = self._listening_count() + 1
        argv = [sys.executable, "-m", "agent.cli", "factory-console", "--port", port,
                "--state-dir", str(self.state_dir), "--sysfs-root", str(self.sysfs_root),
                "--root", str(self.root)]  # fmt: skip
        with self.console_log.open("ab") as out:
            self.console = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=_agent_env(), start_new_session=True
            )

    def _listening_count(self) -> int:
        try:
            return self.console_log.read_bytes().count(b"event=listening")
        except FileNotFoundError:
            return 0

    def wait_console_ready(self, timeout: float = 20.0) -> None:
        """Return once the console holds its port; ServerError if it died or hangs."""
        deadline = time.monotonic() + timeout
        while self._listening_count() < self._console_marker:
            if self.console is None or self.console.poll() is not None:
                tail = self.console_log.read_text(errors="replace")[-800:]
                raise ServerError(f"factory console of {self.client_id} exited: {tail}")
            if time.monotonic() > deadline:
                raise ServerError(f"factory console of {self.client_id} did not start")
            time.sleep(0.05)

    def stop_factory_console(self) -> None:
        _stop(self.console, 10.0)

    def start_agent(self) -> None:
        with (self.root / "agent.log").open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_agent_env(),
                start_new_session=True,
            )

    def stop_agent(self, timeout: float = 20.0) -> int | None:
        return _stop(self.process, timeout)


def program_boards(
    stack: LocalStack, boards: Sequence[SimulatedBoard], on_step: StepHook | None = None
) -> list[BoardResult]:
    """The factory: each board's console on its own pty cable, the station programs them all.

    The consoles are stopped (and the cables unplugged) before this returns,
    whatever happened: a programmed board then boots into its agent.
    """
    station = stack.station()
    with ExitStack() as cleanup:
        cables = [cleanup.enter_context(LineProxy()) for _ in boards]
        for board, cable in zip(boards, cables, strict=True):
            cleanup.callback(board.stop_factory_console)
            board.start_factory_console(cable.board_path)
        for board in boards:
            board.wait_console_ready()
        return program_many([c.station_path for c in cables], station.programmer, on_step)


@contextmanager
def _interrupts_deferred() -> Iterator[Callable[[], None]]:
    """Hold Ctrl-C and SIGTERM until ``checkpoint()``: while a service starts it has no owner yet.

    An interrupt inside a service's start would orphan its process; at a
    checkpoint the caller knows what it started and can stop it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    def checkpoint() -> None:
        if pending:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield checkpoint
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reusable_ports(path: Path) -> list[int] | None:
    """The broker ports of the last run if every one of them is free again."""
    try:
        ports = [int(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return None
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return None
    return ports if len(ports) == 3 else None


def _agent_env() -> dict[str, str]:
    """Our environment without the developer's agent settings (the board has its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_AGENT_")}


def _stop(process: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM, wait, then SIGKILL: the exit code, or None if it never started."""
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()

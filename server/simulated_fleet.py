"""A whole local fleet for the demo and benchmarks: services, server, simulated boards.

Every part is real: secantusd-py (or MONGODB_URI), Mosquitto with generated
TLS, `provision-server run` as a process, and each board an agent process
with its own state directory and simulated sysfs tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from agent.birth import Endpoints, keys_dir, write_birth_identity
from agent.keystore import FileKeyStore
from server.acl_sync import AclSync
from server.broker_config import BrokerLayout, start_local_broker
from server.ca import CertificateAuthority
from server.db import Database
from server.local_services import MongoWireServer, MosquittoBroker
from server.simulated_board import make_sysfs


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
        mongo = None
        if mongodb_uri is None:
            mongo = MongoWireServer(workdir / "mongo").start()
            mongodb_uri = mongo.uri + database_name
        database = Database(mongodb_uri)
        database.init()
        ca_dir = workdir / "ca"
        if (ca_dir / "root.pem").exists():
            ca = CertificateAuthority.load(ca_dir)
        else:
            ca = CertificateAuthority.init(ca_dir)
        broker, layout = start_local_broker(workdir / "broker", ca, database)
        sync = AclSync(database, ca, layout, interval=0.5).start()
        return cls(workdir, mongodb_uri, database, ca, broker, layout, sync, mongo)

    def start_server(self) -> subprocess.Popen[bytes]:
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

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        return self.root / "agent.toml"

    def prepare(self, timing: str = "") -> None:
        """The board's own files: sysfs with its MAC and the agent's config."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        sysfs = self.root / "sys"
        if not sysfs.exists():
            make_sysfs(sysfs, {"eth0": (self.mac.lower(), True)})
        self.config_path.write_text(
            f'[device]\nstate_dir = "{self.state_dir}"\nsysfs_root = "{sysfs}"\n'
            "[timing]\nbackoff_initial_s = 0.2\nbackoff_max_s = 2.0\nrequest_timeout_s = 5\n"
            f"heartbeat_s = 5\nkeepalive_s = 10\n{timing}"
        )

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

    def start_agent(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISION_AGENT_")}
        with (self.root / "agent.log").open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def stop_agent(self, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

"""Connection churn: many devices connect, say online, and leave, cleanly or not, for a while.

Devices get their operational certificates from the server's own code: a few through
the whole MQTT path (``bench.lightweight_device.provision``), the rest by calling
``ProvisioningService.handle_request`` in-process (token, then CSR) for volume. Each
device is one light paho session with a retained last will ``offline``. Worker threads
pick random devices and flip them: connect + ``online``; or leave by publishing
``offline`` then DISCONNECT, by dropping the socket (the broker sends the will), or by
a DISCONNECT that asks for the will (MQTT v5 reason 0x04). At the end every device's
status in the database must be ACTIVE if it is connected and OFFLINE if not.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent import protocol
from agent.keystore import build_csr
from bench.hostile_mqtt import QUIET_SERVER_ENV, ServerProcess, Session, write_key
from bench.lightweight_device import DeviceIdentity, provision
from server.broker.mosquitto_conf import BrokerLayout
from server.pki.ca import CertificateAuthority
from server.service.policy import ServicePolicy
from server.service.provisioning import ProvisioningService
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.schema import DEVICES
from server.store.users import UserRepository

CONVERGE_TIMEOUT_S: Final = 60.0


@dataclass
class ChurnDevice:
    client_id: str
    cert: Path
    key: Path
    session: Session | None = None
    touched: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def connected(self) -> bool:
        return self.session is not None


def _mac(index: int) -> str:
    return f"02:C4:00:{index >> 16 & 0xFF:02X}:{index >> 8 & 0xFF:02X}:{index & 0xFF:02X}"


def make_devices(
    database: Database,
    ca: CertificateAuthority,
    layout: BrokerLayout,
    workdir: Path,
    count: int,
    *,
    over_mqtt: int = 3,
) -> list[ChurnDevice]:
    """``count`` PROVISIONED devices: ``over_mqtt`` the whole way, the rest in-process."""
    repo = DeviceRepository(database)
    user = str(UserRepository(database).add("churn@example.com", "churn")["_id"])
    service = ProvisioningService(database, ca, ServicePolicy(token_min_interval=0.0))
    devices = []
    for index in range(count):
        client_id, mac = f"churn-{index:05d}", _mac(index)
        repo.add(mac, client_id)
        repo.allocate(client_id, user)
        identity = DeviceIdentity.create(ca, workdir / "churn" / client_id, client_id, mac)
        cert = identity.directory / "op.pem"
        if index < over_mqtt:
            provision(
                identity, ca.paths.root_cert, layout.provisioning_port, layout.operational_port
            )
            devices.append(ChurnDevice(client_id, cert, identity.operational_key))
            continue
        token = json.loads(
            service.handle_request(
                client_id,
                protocol.encode({"op": "token", "mac": mac, "cert": identity.birth_pem}),
            )
        )
        key = ec.generate_private_key(ec.SECP256R1())
        issued = json.loads(
            service.handle_request(
                client_id,
                protocol.encode(
                    {
                        "op": "csr",
                        "token": token["token"],
                        "csr": build_csr(key, client_id, mac).decode(),
                    }
                ),
            )
        )
        if not issued.get("ok"):
            raise RuntimeError(f"{client_id}: {issued}")
        cert.write_text(issued["certificate"])
        devices.append(
            ChurnDevice(client_id, cert, write_key(identity.directory / "churn.key", key))
        )
    return devices


@dataclass
class ChurnOutcome:
    devices: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    connected_at_end: int = 0
    mismatched: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    converge_seconds: float = 0.0
    seconds: float = 0.0

    def failures(self) -> list[str]:
        problems = [f"{len(self.errors)} action errors: {self.errors[:3]}"] if self.errors else []
        if self.mismatched:
            sample = list(self.mismatched.items())[:5]
            problems.append(f"{len(self.mismatched)} devices with a wrong status: {sample}")
        return problems


def _connect(device: ChurnDevice, port: int, root: Path) -> None:
    session = Session(device.client_id, port, root, device.cert, device.key, will=True)
    mid = session.publish(
        protocol.status_topic(device.client_id), protocol.encode({"status": "online"}), retain=True
    )
    session.wait(lambda: mid in session.acked, "PUBACK online")
    device.session = session


def _leave(device: ChurnDevice, how: str) -> None:
    session = device.session
    assert session is not None
    if how == "clean":
        mid = session.publish(
            protocol.status_topic(device.client_id),
            protocol.encode({"status": "offline"}),
            retain=True,
        )
        session.wait(lambda: mid in session.acked, "PUBACK offline")
        session.close()
    elif how == "will":
        session.client.disconnect(
            ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
        session.close()
    else:  # "drop": the socket goes away, the broker notices and sends the will
        sock = session.client.socket()
        if sock is not None:
            sock.close()
        session.close()
    device.session = None


def _statuses(database: Database, client_ids: list[str]) -> dict[str, str | None]:
    docs = database.collection(DEVICES).find(
        {"clientId": {"$in": client_ids}}, {"clientId": 1, "status": 1}
    )
    return {doc["clientId"]: doc.get("status") for doc in docs}


PER_PROCESS: Final = 200
"""Devices per process: paho's loop uses select(), which takes no descriptor >= 1024."""


@dataclass(frozen=True)
class SliceJob:
    """One process's share of the churn; plain values, so it crosses a process boundary."""

    mongodb_uri: str
    port: int
    root: Path
    devices: tuple[tuple[str, Path, Path], ...]
    seconds: float
    seed: int
    workers: int


def churn_slice(job: SliceJob) -> ChurnOutcome:
    """Churn ``job.devices``, then compare the database while the survivors stay connected."""
    devices = [ChurnDevice(cid, cert, key) for cid, cert, key in job.devices]
    out = ChurnOutcome(devices=len(devices))
    deadline = time.monotonic() + job.seconds
    lock = threading.Lock()

    def work(worker: int) -> None:
        rng = random.Random(job.seed * 1000 + worker)
        while time.monotonic() < deadline:
            device = rng.choice(devices)
            if not device.lock.acquire(blocking=False):
                continue
            device.touched = True
            try:
                if device.connected:
                    how = rng.choice(["clean", "will", "drop"])
                    _leave(device, how)
                else:
                    how = "connect"
                    _connect(device, job.port, job.root)
                with lock:
                    out.actions[how] += 1
            except Exception as exc:  # counted; the device's state is whatever it is now
                with lock:
                    out.errors.append(f"{device.client_id}: {exc!r}")
            finally:
                device.lock.release()

    database = Database(job.mongodb_uri)
    try:
        initial = _statuses(database, [d.client_id for d in devices])
        started = time.monotonic()
        threads = [
            threading.Thread(target=work, args=(i,), daemon=True) for i in range(job.workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        out.seconds = time.monotonic() - started
        # A device the workers never picked keeps the status it had before the churn.
        expected = {
            d.client_id: "ACTIVE"
            if d.connected
            else "OFFLINE"
            if d.touched
            else initial[d.client_id]
            for d in devices
        }
        out.connected_at_end = sum(d.connected for d in devices)
        converge = time.monotonic()
        while True:
            actual = _statuses(database, list(expected))
            out.mismatched = {
                cid: (want, actual.get(cid))
                for cid, want in expected.items()
                if actual.get(cid) != want
            }
            if not out.mismatched or time.monotonic() - converge > CONVERGE_TIMEOUT_S:
                break
            time.sleep(0.5)
        out.converge_seconds = time.monotonic() - converge
    finally:
        database.close()
        for device in devices:
            if device.session is not None:
                device.session.close()  # a clean DISCONNECT: no will, the status stays
                device.session = None
    return out


def run_churn(
    mongodb_uri: str,
    ca: CertificateAuthority,
    layout: BrokerLayout,
    devices: list[ChurnDevice],
    seconds: float,
    *,
    seed: int,
    workers: int = 8,
) -> ChurnOutcome:
    """Churn in one process, or in one process per PER_PROCESS devices."""
    plain = tuple((d.client_id, d.cert, d.key) for d in devices)
    slices = [plain[i : i + PER_PROCESS] for i in range(0, len(plain), PER_PROCESS)]
    jobs = [
        SliceJob(mongodb_uri, layout.operational_port, ca.paths.root_cert, part, seconds,
                 seed + index, workers if len(slices) == 1 else max(2, workers // 2))
        for index, part in enumerate(slices)
    ]  # fmt: skip
    if len(jobs) == 1:
        return churn_slice(jobs[0])
    context = multiprocessing.get_context("spawn")  # no forked copies of pymongo's threads
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=context) as pool:
        parts = list(pool.map(churn_slice, jobs))
    total = ChurnOutcome(devices=len(devices))
    for part in parts:
        total.actions.update(part.actions)
        total.errors.extend(part.errors)
        total.connected_at_end += part.connected_at_end
        total.mismatched.update(part.mismatched)
        total.converge_seconds = max(total.converge_seconds, part.converge_seconds)
        total.seconds = max(total.seconds, part.seconds)
    return total


def churn(
    database: Database,
    mongodb_uri: str,
    ca: CertificateAuthority,
    layout: BrokerLayout,
    workdir: Path,
    *,
    devices: int,
    seconds: float,
    seed: int,
) -> ChurnOutcome:
    """Server process, devices, churn, final check."""

    server = ServerProcess(
        ca, layout.server_port, mongodb_uri, workdir / "churn-server.log", QUIET_SERVER_ENV
    )
    try:
        fleet = make_devices(database, ca, layout, workdir, devices)
        outcome = run_churn(mongodb_uri, ca, layout, fleet, seconds, seed=seed)
        if not server.alive:
            outcome.errors.append("the server process died")
        return outcome
    finally:
        server.stop()

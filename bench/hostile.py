"""``python -m bench.hostile``: abuse the provisioning server, the factory console and status.

Default: ``--messages 100000`` hostile MQTT payloads (``--broker-share`` of them through
Mosquitto to a ``provision-server run`` process, the rest straight into
``ProvisioningService.handle_request``/``handle_status`` for volume) and ``--frames``
mutated serial frames at a factory console on a pty. ``--churn --devices 1000 --seconds
60`` runs the connect/disconnect churn instead. Prints the seed; the same seed replays
the same inputs. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bson
from bson import ObjectId
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import protocol
from agent.keystore import build_csr
from bench.hostile_inputs import Channel, Hostile, MessageFactory
from bench.hostile_mqtt import (
    MB,
    QUIET_SERVER_ENV,
    BrokerOutcome,
    ServerProcess,
    Session,
    Sessions,
    memory_growth_mb,
    write_key,
)
from bench.hostile_pki import Material
from bench.stack import rss_bytes
from server.broker.mosquitto_conf import BrokerLayout
from server.pki.ca import CertificateAuthority
from server.service.provisioning import ProvisioningService
from server.store.db import Database
from server.store.devices import DeviceRepository
from server.store.schema import DEVICES
from server.store.users import UserRepository

MEMORY_LIMIT_MB = 20.0
# A sweep of silent ACTIVE devices is a legitimate write; the hostile run must not see one.
# Families that hold exact replays, answered "ok" with no change (same certificate, same serial).
IDEMPOTENT_FAMILIES = frozenset({"replay", "renew-confirm", "byte-mutated"})


def snapshot(database: Database) -> dict[str, list[bytes]]:
    """Every document of every collection, BSON-encoded, in ``_id`` order."""
    return {
        name: [bson.encode(doc) for doc in database.db[name].find({}).sort("_id", 1)]
        for name in sorted(database.db.list_collection_names())
    }


def status_of(database: Database, client_id: str) -> str | None:
    doc = database.collection(DEVICES).find_one({"clientId": client_id}, {"status": 1})
    return None if doc is None else str(doc.get("status"))


def wait_status(database: Database, client_id: str, wanted: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while status_of(database, client_id) != wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{client_id} never became {wanted}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Services:
    """What the run needs, from the test fixtures or from ``bench.BenchStack``."""

    database: Database
    mongodb_uri: str
    ca: CertificateAuthority
    layout: BrokerLayout
    workdir: Path


def _birth(
    ca: CertificateAuthority, directory: Path, client_id: str, mac: str
) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = ca.sign_birth_certificate(key.public_key(), client_id, mac).public_bytes(
        serialization.Encoding.PEM
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{client_id}-birth.pem").write_bytes(pem)
    return (
        directory / f"{client_id}-birth.pem",
        write_key(directory / f"{client_id}-birth.key", key),
        pem.decode(),
    )


def prepare(services: Services, tag: str = "") -> tuple[Material, Sessions]:
    """A device provisioned the real way (token, CSR, online, offline) and an unallocated one.

    The provisioned device ends OFFLINE (it said so), so nothing in the database moves
    while the hostile messages run: not a heartbeat, not the silent-device sweep.
    """
    db, ca, layout = services.database, services.ca, services.layout
    ids = f"hostile{tag}-active", f"hostile{tag}-idle"
    macs = "02:0A:00:00:00:01", "02:0B:00:00:00:02"
    repo = DeviceRepository(db)
    user = UserRepository(db).add(f"hostile{tag}@example.com", "hostile")
    for client_id, mac in zip(ids, macs, strict=True):
        repo.add(mac, client_id)
    repo.allocate(ids[0], str(user["_id"]))
    folder = services.workdir / "identities"
    root = ca.paths.root_cert
    cert, key_path, birth_pem = _birth(ca, folder, ids[0], macs[0])
    birth = Session(ids[0], layout.provisioning_port, root, cert, key_path, name=f"{ids[0]}-birth")
    birth.subscribe(protocol.response_topic(ids[0]))

    def ask(body: dict[str, Any]) -> dict[str, Any]:
        topic, reply = protocol.request_topic(ids[0]), protocol.response_topic(ids[0])
        return birth.request(topic, reply, protocol.encode(body))

    token = ask({"op": "token", "mac": macs[0], "cert": birth_pem})
    if not token.get("ok"):
        raise RuntimeError(f"token request failed: {token}")
    op_key = ec.generate_private_key(ec.SECP256R1())
    csr_pem = build_csr(op_key, ids[0], macs[0]).decode()
    issued = ask({"op": "csr", "token": token["token"], "csr": csr_pem})
    if not issued.get("ok"):
        raise RuntimeError(f"CSR request failed: {issued}")
    op_cert = folder / f"{ids[0]}-op.pem"
    op_cert.write_text(issued["certificate"])
    operational = Session(
        ids[0],
        layout.operational_port,
        root,
        op_cert,
        write_key(folder / f"{ids[0]}-op.key", op_key),
    )
    operational.subscribe(protocol.renew_response_topic(ids[0]))
    status = protocol.status_topic(ids[0])
    operational.publish(status, protocol.encode({"status": "online"}))
    wait_status(db, ids[0], "ACTIVE")
    operational.publish(status, protocol.encode({"status": "offline"}))
    wait_status(db, ids[0], "OFFLINE")
    idle_cert, idle_key, idle_pem = _birth(ca, folder, ids[1], macs[1])
    idle = Session(ids[1], layout.provisioning_port, root, idle_cert, idle_key)
    idle.subscribe(protocol.response_topic(ids[1]))
    material = Material(
        client_id=ids[0],
        mac=macs[0],
        birth_pem=birth_pem,
        token=token["token"],
        csr_pem=csr_pem,
        serial=issued["serial"],
        unallocated_id=ids[1],
        unallocated_mac=macs[1],
        unallocated_birth_pem=idle_pem,
    )
    return material, Sessions(birth, operational, idle, ids[0], ids[1])


@dataclass
class DirectOutcome:
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    internal: list[str] = field(default_factory=list)
    changed_batches: list[int] = field(default_factory=list)
    rss_samples: list[int] = field(default_factory=list)
    seconds: float = 0.0


def run_direct(
    service: ProvisioningService,
    factory: MessageFactory,
    count: int,
    *,
    batch: int = 1000,
) -> DirectOutcome:
    """``count`` messages into the service in-process, the database compared per batch."""
    out = DirectOutcome()
    m = factory.m
    started = time.monotonic()
    before = snapshot(service.database)
    for index in range(count):
        message = factory.next()
        client_id = m.unallocated_id if message.target == "unallocated" else m.client_id
        if index % 17 == 0:
            client_id = f"ghost-{index}"  # a clientId nobody registered
        if message.channel is Channel.STATUS:
            service.handle_status(client_id, message.payload)
            out.codes["status"] += 1
        else:
            channel = message.channel.request_channel
            answer = service.handle_request(client_id, message.payload, channel)
            _record_answer(out, message, answer)
        out.sent += 1
        if (index + 1) % batch == 0 or index + 1 == count:
            after = snapshot(service.database)
            if after != before:
                out.changed_batches.append(index // batch)
                before = after
            out.rss_samples.append(rss_bytes(os.getpid()))
    out.seconds = time.monotonic() - started
    return out


def _record_answer(out: DirectOutcome, message: Hostile, answer: bytes) -> None:
    response = protocol.parse_response(answer)
    if response.ok:
        out.codes["ok"] += 1
        return
    assert response.error is not None
    out.codes[response.error.code.value] += 1
    if response.error.code is protocol.ErrorCode.INTERNAL:
        out.internal.append(f"{message.family}: {message.payload[:120]!r}")


# --- the full run ------------------------------------------------------------------


@dataclass
class HostileReport:
    seed: int
    broker: BrokerOutcome
    direct: DirectOutcome
    database_unchanged: bool
    server_alive: bool
    valid_after: bool
    frames: Any = None

    def failures(self) -> list[str]:
        problems = []
        if not self.database_unchanged:
            problems.append("the database changed")
        if self.direct.changed_batches:
            problems.append(f"direct batches changed the database: {self.direct.changed_batches}")
        if not self.server_alive or not self.valid_after:
            problems.append("the server did not answer a valid request afterwards")
        accepted = set(self.broker.ok_by_family) - IDEMPOTENT_FAMILIES
        if accepted:
            problems.append(f"mutated inputs were accepted: {sorted(accepted)}")
        if self.broker.internal or self.direct.internal:
            problems.append(
                f"INTERNAL answers: {(self.broker.internal + self.direct.internal)[:5]}"
            )
        if memory_growth_mb(self.broker.rss_samples) > MEMORY_LIMIT_MB:
            problems.append(f"server RSS grew {memory_growth_mb(self.broker.rss_samples):.1f} MB")
        if self.frames is not None:
            problems.extend(self.frames.failures())
        return problems


def run_messages(
    services: Services, *, seed: int, broker_count: int, direct_count: int
) -> HostileReport:
    """Provision one device, then send the hostile messages both ways and check everything."""
    server = ServerProcess(
        services.ca, services.layout.server_port, services.mongodb_uri,
        services.workdir / "hostile-server.log", QUIET_SERVER_ENV,
    )  # fmt: skip
    try:
        material, sessions = prepare(services)
        factory = MessageFactory(services.ca, material, seed)
        before = snapshot(services.database)
        broker = BrokerOutcome()
        from bench.hostile_mqtt import send_over_broker

        chunk = 2000  # generate lazily: a 100k list of up-to-256-KiB payloads would be GBs
        for start in range(0, broker_count, chunk):
            batch = [factory.next() for _ in range(min(chunk, broker_count - start))]
            send_over_broker(sessions, batch, server, broker)
        service = ProvisioningService(services.database, services.ca)
        direct = run_direct(service, factory, direct_count)
        after = snapshot(services.database)
        unchanged = after == before
        if not unchanged:
            changed = [
                name
                for name in sorted(set(before) | set(after))
                if before.get(name) != after.get(name)
            ]
            print(f"changed collections: {changed}")
            for name in changed:
                old_docs = {bson.decode(d)["_id"]: bson.decode(d) for d in before.get(name, [])}
                for d in after.get(name, []):
                    doc = bson.decode(d)
                    if old_docs.get(doc["_id"]) != doc:
                        print(f"  {name}: {old_docs.get(doc['_id'])} -> {doc}")
        alive = server.alive
        # A valid request afterwards: the unallocated device is allocated and asks for a token.
        repo = DeviceRepository(services.database)
        repo.allocate(material.unallocated_id, str(ObjectId(_user_id(services.database))))
        answer = sessions.unallocated_birth.request(
            protocol.request_topic(material.unallocated_id),
            protocol.response_topic(material.unallocated_id),
            protocol.encode(
                {
                    "op": "token",
                    "mac": material.unallocated_mac,
                    "cert": material.unallocated_birth_pem,
                }
            ),
        )
        sessions.close()
        return HostileReport(seed, broker, direct, unchanged, alive, answer.get("ok") is True)
    finally:
        server.stop()


def _user_id(database: Database) -> Any:
    doc = database.collection("users").find_one({})
    assert doc is not None
    return doc["_id"]


# --- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--broker-share", type=float, default=0.9, help="fraction via the broker")
    parser.add_argument("--frames", type=int, default=20_000, help="mutated serial frames")
    parser.add_argument("--churn", action="store_true", help="run the churn test instead")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"seed {seed} (replay with --seed {seed})", flush=True)
    from bench.stack import BenchStack

    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        workdir = Path(tmp)
        with BenchStack(workdir, lambda m: print(m, file=sys.stderr, flush=True)) as stack:
            services = Services(stack.database, stack.mongodb_uri, stack.ca, stack.layout, workdir)
            if args.churn:
                from bench.churn import churn

                outcome = churn(
                    stack.database, stack.mongodb_uri, stack.ca, stack.layout, workdir,
                    devices=args.devices, seconds=args.seconds, seed=seed,
                )  # fmt: skip
                actions = dict(outcome.actions)
                print(f"devices {outcome.devices}, {outcome.seconds:.0f} s, actions {actions}")
                print(f"connected at the end {outcome.connected_at_end}, "
                      f"database converged in {outcome.converge_seconds:.1f} s")  # fmt: skip
                problems = outcome.failures()
            else:
                from bench.hostile_serial import run_frames

                via_broker = round(args.messages * args.broker_share)
                report = run_messages(
                    services, seed=seed, broker_count=via_broker,
                    direct_count=args.messages - via_broker,
                )  # fmt: skip
                report.frames = run_frames(workdir, args.frames, seed)
                _print_report(report)
                problems = report.failures()
    for problem in problems:
        print(f"FAIL: {problem}")
    print("OK" if not problems else "FAILED")
    return 1 if problems else 0


def _print_report(report: HostileReport) -> None:
    b, d, f = report.broker, report.direct, report.frames
    rss = [x / MB for x in b.rss_samples]
    rows = [
        ("via broker", f"{b.sent} messages ({b.requests} requests, {b.statuses} status) "
         f"in {b.seconds:.1f} s = {b.sent / max(b.seconds, 1e-9):.0f}/s"),
        ("  answers", ", ".join(f"{k} {v}" for k, v in b.codes.most_common())),
        ("  ok (replays)", ", ".join(f"{k} {v}" for k, v in b.ok_by_family.items()) or "-"),
        ("  server RSS", f"{min(rss):.1f}..{max(rss):.1f} MB, growth after warm-up "
         f"{memory_growth_mb(b.rss_samples):.1f} MB"),
        ("direct", f"{d.sent} messages in {d.seconds:.1f} s "
         f"= {d.sent / max(d.seconds, 1e-9):.0f}/s"),
        ("  answers", ", ".join(f"{k} {v}" for k, v in d.codes.most_common())),
        ("database", "unchanged" if report.database_unchanged and not d.changed_batches
         else "CHANGED"),
        ("server", "alive, answers a valid request" if report.server_alive and report.valid_after
         else "FAILED"),
        ("serial frames", f"{f.sent} frames, {f.bytes_sent} B in {f.seconds:.1f} s, console "
         f"{'alive' if f.console_alive else 'DEAD'}, INFO after: {f.info_after.get('state')}, "
         f"state dir files: {len(f.state_files)}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name:<16} {value}")


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.broker_scale``: the broker side at fleet scale (issue #11), as a table.

For each fleet size (default 1,000 / 10,000 / 100,000 registered devices) a fresh database
gets that many ``device_acls`` and ``device_certificates`` documents (``--exceptions``
of them with a tier above 1 or explicit rules, i.e. a ``user`` block in the ACL file) and
``--revoked`` old serials per device in ``certificate_revocations`` (the CRL). Then, on a
real Mosquitto with the provisioning_guard plugin and a running ``AclSync``:

* files: the sync's full read of the three collections and the rendered ACL/CRL sizes;
* broker start (listeners accepting) and its VmRSS;
* reload: one reload over MQTT, until the plugin confirmed it (the broker serves nobody
  while it re-reads the files);
* rule change: a ``device_acls`` write -> the probe device's publish flips (real client),
  and whether the broker reloaded meanwhile (rights go over MQTT; only CRLs need one);
* revocation: ``revoke_current`` -> the device's live session is disconnected;
* the same two while the database takes ``--writes-per-s`` unrelated writes for
  ``--sustained`` seconds (p50 / p99 / max).

Progress goes to stderr, the table to stdout (``--json``: JSON on stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pymongo.errors
from bson import ObjectId

from bench.stack import percentile
from harness.local_services import MongoWireServer
from server.broker.acl_sync import AclSync
from server.broker.fleet_state import FleetState
from server.pki.ca import CertificateAuthority
from server.store.certificates import CertificateRecords, IssuedCertificate
from server.store.db import Database
from server.store.schema import (
    CERTIFICATE_REVOCATIONS,
    DEVICE_ACLS,
    DEVICE_CERTIFICATES,
    DEVICES,
)
from tests.broker_fixture import ACCEPTED, NOT_AUTHORIZED, LocalBroker, MqttClient

BATCH = 2000


def progress(message: str) -> None:
    print(f"[broker-scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --- the registered fleet ----------------------------------------------------------------


def _acl_doc(index: int, exception: bool) -> dict[str, Any]:
    device_id = f"fleet-{index:06d}"
    tier, rules = "1", []
    if exception:
        kind = index % 4
        tier = {0: "2", 1: "2", 2: "3", 3: "1"}[kind]
        if kind == 3:
            rules = [
                {"action": "publish", "topic": f"apps/{device_id}/out", "allow": True},
                {
                    "action": "subscribe",
                    "topic": f"devices/{device_id}/telemetry/x",
                    "allow": False,
                },
            ]
    return {"_id": ObjectId(), "device_id": device_id, "user_id": None, "tier": tier,
            "rules": rules, "last_updated": _now()}  # fmt: skip


def seed(database: Database, devices: int, exceptions: float, revoked_per_device: float) -> None:
    """Registered devices as the server leaves them: ACL, current certificate, old serials."""
    every = max(1, round(1 / exceptions)) if exceptions > 0 else 0
    expires = _now() + timedelta(days=60)
    acls, certificates, revocations = (
        database.collection(c) for c in (DEVICE_ACLS, DEVICE_CERTIFICATES, CERTIFICATE_REVOCATIONS)
    )
    for start in range(0, devices, BATCH):
        stop = min(devices, start + BATCH)
        acls.insert_many([_acl_doc(i, every > 0 and i % every == 0) for i in range(start, stop)])
        certificates.insert_many([
            {"_id": ObjectId(), "device_id": f"fleet-{i:06d}", "fingerprint": f"fp-{i}",
             "status": "active", "serial": secrets.token_hex(15).upper(), "expires_at": expires,
             "cn": f"fleet-{i:06d}", "created_at": _now()}
            for i in range(start, stop)
        ])  # fmt: skip
    old = round(devices * revoked_per_device)
    for start in range(0, old, BATCH):
        revocations.insert_many([
            {"_id": ObjectId(), "device_id": f"fleet-{i % devices:06d}", "reason": "superseded",
             "serial": secrets.token_hex(15).upper(), "revoked_at": _now(), "expires_at": expires}
            for i in range(start, min(old, start + BATCH))
        ])  # fmt: skip


# --- measurements ----------------------------------------------------------------------


@dataclass
class ScaleResult:
    devices: int
    user_blocks: int
    crl_serials: int
    seed_s: float = 0.0
    full_read_s: float = 0.0
    acl_kb: float = 0.0
    crl_kb: float = 0.0
    broker_start_s: float = 0.0
    broker_rss_mb: float = 0.0
    sync_first_pass_s: float = 0.0
    reload_s: list[float] = field(default_factory=list)
    rule_change_s: list[float] = field(default_factory=list)
    revocation_s: list[float] = field(default_factory=list)
    sustained_rule_change_s: list[float] = field(default_factory=list)
    sustained_revocation_s: list[float] = field(default_factory=list)
    sustained_writes: int = 0
    rule_changes_reloaded: int = 0
    """Rule changes during which the broker reloaded (it should not need to)."""


def _wait(check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def _rule_change(database: Database, probe: MqttClient, allow: bool) -> float:
    rules = [{"action": "publish", "topic": "apps/probe/out", "allow": True}] if allow else []
    want = ACCEPTED if allow else (NOT_AUTHORIZED,)
    started = time.monotonic()
    database.collection(DEVICE_ACLS).update_one(
        {"device_id": "probe"},
        {"$set": {"tier": "1", "rules": rules, "last_updated": _now()}},
        upsert=True,
    )

    def applied() -> bool:
        try:
            return probe.publish("apps/probe/out") in want
        except TimeoutError:  # no PUBACK within 3 s: the broker is busy (reloading)
            return False

    _wait(applied, 120)
    return time.monotonic() - started


def _revocation(broker: LocalBroker, database: Database, name: str, sync: AclSync) -> float:
    files, cert = broker.device(name)
    CertificateRecords(database).record_issued(name, None, IssuedCertificate.of(cert))
    with broker.client(files, broker.layout.operational_port) as session:
        started, reloads = time.monotonic(), sync.reloads
        CertificateRecords(database).revoke_current(name, "bench")
        _wait(lambda: not session.connected, 120)
        took = time.monotonic() - started
    _wait(lambda: sync.reloads > reloads, 120)  # the CRL reload that follows the cut
    return took


def _writer(database: Database, stop: threading.Event, per_second: float, count: list[int]) -> None:
    """Unrelated writes: device heartbeats and other devices' ACL edits, alternating."""
    next_at = time.monotonic()
    while not stop.is_set():
        if count[0] % 2:
            database.collection(DEVICES).update_one(
                {"clientId": "noise"}, {"$set": {"lastSeenAt": _now()}}, upsert=True
            )
        else:
            database.collection(DEVICE_ACLS).update_one(
                {"device_id": f"noise-{count[0] % 50}"},
                {"$set": {"tier": "2", "last_updated": _now()}},
                upsert=True,
            )
        count[0] += 1
        next_at += 1 / per_second
        stop.wait(max(0.0, next_at - time.monotonic()))


def measure(
    devices: int, uri: str, ca: CertificateAuthority, workdir: Path, args: argparse.Namespace
) -> ScaleResult:
    # Long socket timeouts: the embedded database scans 100,000 documents slowly.
    database = Database(uri, timeout_ms=20_000)
    database.init()
    try:
        started = time.monotonic()
        progress(f"{devices} devices: seeding the database")
        seed(database, devices, args.exceptions, args.revoked)
        seed_s = time.monotonic() - started
        started = time.monotonic()
        fleet = FleetState.load(database)
        full_read_s = time.monotonic() - started
        acl = fleet.operational_acl()
        result = ScaleResult(
            devices=devices,
            user_blocks=acl.count("\nuser "),
            crl_serials=len(fleet.serials(birth=False)),
            seed_s=seed_s,
            full_read_s=full_read_s,
            acl_kb=len(acl) / 1024,
        )
        progress(f"{devices} devices: starting Mosquitto")
        broker = LocalBroker(workdir / f"n{devices}", ca, database)
        try:
            result.crl_kb = broker.layout.crl_path.stat().st_size / 1024
            broker.mosquitto.stop()
            started = time.monotonic()
            broker.mosquitto.start()
            result.broker_start_s = time.monotonic() - started
            assert broker.mosquitto.process is not None
            result.broker_rss_mb = rss_mb(broker.mosquitto.process.pid)
            _measure_with_sync(broker, database, ca, result, args)
        finally:
            broker.stop()
        return result
    finally:
        with contextlib.suppress(pymongo.errors.PyMongoError):
            database.client.drop_database(database.db.name)
        database.close()


def _measure_with_sync(
    broker: LocalBroker,
    database: Database,
    ca: CertificateAuthority,
    result: ScaleResult,
    args: argparse.Namespace,
) -> None:
    started = time.monotonic()
    sync = AclSync(database, ca, broker.layout, interval=0.2, full_resync=3600).start()
    try:
        _wait(lambda: sync.syncs > 0, 600)
        result.sync_first_pass_s = time.monotonic() - started
        for _ in range(3):
            result.reload_s.append(sync.control.reload())
        progress(
            f"{result.devices} devices: first sync {result.sync_first_pass_s:.2f} s, "
            f"reloads {[round(x, 3) for x in result.reload_s]} s"
        )
        probe_files, _ = broker.device("probe")
        with broker.client(probe_files, broker.layout.operational_port) as probe:
            progress(f"{result.devices} devices: rule changes and revocations")
            for index in range(args.changes):
                reloads = sync.reloads
                result.rule_change_s.append(_rule_change(database, probe, index % 2 == 0))
                result.rule_changes_reloaded += sync.reloads > reloads
            for index in range(args.changes):
                result.revocation_s.append(_revocation(broker, database, f"revoked-{index}", sync))
            if args.sustained > 0:
                progress(
                    f"{result.devices} devices: {args.writes_per_s:.0f} writes/s "
                    f"for {args.sustained:.0f} s"
                )
                stop, count = threading.Event(), [0]
                writer = threading.Thread(
                    target=_writer, args=(database, stop, args.writes_per_s, count), daemon=True
                )
                writer.start()
                ends = time.monotonic() + args.sustained
                index = 0
                try:
                    while time.monotonic() < ends:
                        if index % 4 == 3:
                            result.sustained_revocation_s.append(
                                _revocation(broker, database, f"burst-{index}", sync)
                            )
                        else:
                            reloads = sync.reloads
                            change = _rule_change(database, probe, index % 2 == 0)
                            result.sustained_rule_change_s.append(change)
                            result.rule_changes_reloaded += sync.reloads > reloads
                        index += 1
                        time.sleep(0.2)
                finally:
                    stop.set()
                    writer.join()
                result.sustained_writes = count[0]
    finally:
        sync.stop()


# --- report ------------------------------------------------------------------------------


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {percentile(values, 0.99):.2f} / {max(values):.2f}"


def table(results: list[ScaleResult], args: argparse.Namespace) -> str:
    rows: list[tuple[str, ...]] = [("metric", *(f"{r.devices:,} devices" for r in results))]

    def row(name: str, cell: Callable[[ScaleResult], str]) -> None:
        rows.append((name, *(cell(r) for r in results)))

    row("ACL user blocks / CRL serials", lambda r: f"{r.user_blocks:,} / {r.crl_serials:,}")
    row("ACL file / CRL size", lambda r: f"{r.acl_kb:,.0f} KB / {r.crl_kb:,.0f} KB")
    row("sync: full read of 3 collections", lambda r: f"{r.full_read_s:.2f} s")
    row("broker start (listeners up)", lambda r: f"{r.broker_start_s:.2f} s")
    row("broker RSS after start", lambda r: f"{r.broker_rss_mb:.1f} MB")
    row("sync first pass (read, render, reload)", lambda r: f"{r.sync_first_pass_s:.2f} s")
    row("reload over MQTT, median", lambda r: f"{statistics.median(r.reload_s):.3f} s")
    row("rule change, p50 / p99 / max", lambda r: _stats(r.rule_change_s))
    row("revocation -> session cut, p50 / p99 / max", lambda r: _stats(r.revocation_s))
    label = f"under {args.writes_per_s:.0f} writes/s for {args.sustained:.0f} s"
    row(f"rule change {label}", lambda r: _stats(r.sustained_rule_change_s))
    row(f"revocation {label}", lambda r: _stats(r.sustained_revocation_s))
    row("rule changes with a reload", lambda r: f"{r.rule_changes_reloaded} of "
        f"{len(r.rule_change_s) + len(r.sustained_rule_change_s)}")  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_scale", description=__doc__)
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument(
        "--exceptions",
        type=float,
        default=0.1,
        help="share of devices with a user block (tier 2/3, rules)",
    )
    parser.add_argument(
        "--revoked",
        type=float,
        default=0.5,
        help="revoked (unexpired) serials per device on the CRL",
    )
    parser.add_argument("--changes", type=int, default=6)
    parser.add_argument("--sustained", type=float, default=30.0)
    parser.add_argument("--writes-per-s", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="broker-scale-") as tmp:
        workdir = Path(tmp)
        ca = CertificateAuthority.init(workdir / "ca")
        external = os.environ.get("MONGODB_URI")
        mongo = None if external else MongoWireServer(workdir / "mongo").start()
        base = external or (mongo.uri if mongo else "")
        try:
            results = []
            for devices in args.devices:
                parts = urllib.parse.urlsplit(base)
                name = f"/broker_scale_{uuid.uuid4().hex[:8]}"
                uri = urllib.parse.urlunsplit(parts._replace(path=name))
                results.append(measure(devices, uri, ca, workdir, args))
        finally:
            if mongo is not None:
                mongo.stop()
    report = table(results, args)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        print(report, file=sys.stderr)
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

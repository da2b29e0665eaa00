"""An already registered fleet for the benchmark: ``--registered 100000``.

The timed runs must cost the same whether the database holds a thousand devices or a
hundred thousand. ``prefill_fleet`` writes ``count`` devices as a deployed fleet looks:
ACTIVE, heard from a moment ago, each with its certificate record and default ACL, in
bulk inserts straight into the database (what provisioning would have written, without
provisioning them one by one), and loads one retained ``online`` status per device into
the broker, so a starting server faces the whole fleet's retained statuses.

The statuses go through a loopback listener without TLS or ACL that the benchmark adds
to its own broker (``bench_listener_conf``); nothing else ever has such a listener.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Final

import paho.mqtt.client as mqtt
from bson import ObjectId
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from server.store.db import Database, Document
from server.store.schema import DEVICE_ACLS, DEVICE_CERTIFICATES, DEVICES, DeviceStatus

INSERT_CHUNK: Final = 1000
PUBLISH_WINDOW: Final = 1000
"""QoS 1 publishes in flight at once while loading retained statuses."""


def bench_listener_conf(port: int) -> str:
    """A mosquitto.conf block: plain loopback listener, anonymous, no ACL (bench only)."""
    return (
        "\n# benchmark only: loads the registered fleet's retained statuses\n"
        f"listener {int(port)} 127.0.0.1\nallow_anonymous true\n"
    )


def fleet_client_id(index: int) -> str:
    return f"fleet-{index:06d}"


def _documents(index: int, user: ObjectId, now: datetime) -> tuple[Document, Document, Document]:
    client_id = fleet_client_id(index)
    mac = ":".join(["02", "F1", *(f"{index >> shift & 0xFF:02X}" for shift in (24, 16, 8, 0))])
    serial = f"F1{index:038X}"
    expires = now + timedelta(days=90)
    device: Document = {
        "macID": mac,
        "clientId": client_id,
        "userId": user,
        "status": DeviceStatus.ACTIVE.value,
        "allocatedAt": now,
        "provisionedAt": now,
        "lastSeenAt": now,
        "tokenUsed": True,
        "certificateSerial": serial,
        "certificateExpiresAt": expires,
    }
    certificate: Document = {
        "device_id": client_id,
        "user_id": user,
        "fingerprint": f"{index:064x}",
        "cn": client_id,
        "status": "active",
        "expires_at": expires,
        "created_at": now,
        "private_key": "",
        "certificate": "",
        "serial": serial,
    }
    acl: Document = {
        "device_id": client_id,
        "user_id": user,
        "tier": "1",
        "rules": [],
        "last_updated": now,
    }
    return device, certificate, acl


@dataclass(frozen=True)
class Prefill:
    devices: int
    insert_seconds: float
    retained_seconds: float


def prefill_fleet(database: Database, user_id: str, count: int, broker_port: int) -> Prefill:
    """``count`` ACTIVE devices with records, then their retained statuses in the broker."""
    user = ObjectId(user_id)
    now = datetime.now(timezone.utc)
    started = time.monotonic()
    for start in range(0, count, INSERT_CHUNK):
        rows = [_documents(i, user, now) for i in range(start, min(count, start + INSERT_CHUNK))]
        for name, column in ((DEVICES, 0), (DEVICE_CERTIFICATES, 1), (DEVICE_ACLS, 2)):
            _insert(database, name, [row[column] for row in rows])
    inserted = time.monotonic() - started
    started = time.monotonic()
    load_retained_statuses(broker_port, [fleet_client_id(i) for i in range(count)])
    return Prefill(count, inserted, time.monotonic() - started)


def _insert(database: Database, name: str, docs: list[Document]) -> None:
    database.call(lambda: database.collection(name).insert_many(docs, ordered=False))


def load_retained_statuses(port: int, client_ids: list[str]) -> None:
    """Publish a retained ``online`` per device through the bench listener (QoS 1, windowed)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet-loader")
    window = threading.Semaphore(PUBLISH_WINDOW)
    done = threading.Event()
    acked = [0]

    def on_publish(_c: mqtt.Client, _u: object, _mid: int, _rc: object, _p: object) -> None:
        window.release()
        acked[0] += 1
        if acked[0] == len(client_ids):
            done.set()

    client.on_publish = on_publish
    client.max_inflight_messages_set(PUBLISH_WINDOW)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        payload = protocol.encode({"status": "online"})
        for client_id in client_ids:
            window.acquire()
            client.publish(protocol.status_topic(client_id), payload, qos=1, retain=True)
        if client_ids and not done.wait(120):
            raise RuntimeError(f"retained statuses not acknowledged: {acked[0]}/{len(client_ids)}")
    finally:
        client.disconnect()
        client.loop_stop()
        client._reset_sockets()

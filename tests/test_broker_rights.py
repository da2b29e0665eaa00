"""The operational listener's ACL is the provisioning_guard plugin's rights table (issue #11,
fleet scale): read from ``acl-operational`` at start and at each reload, changed device by
device over the control topic without a reload. Real Mosquitto, real paho clients.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from harness.local_services import MosquittoBroker
from server.broker.acl_sync import AclSync, read_broker_state
from server.broker.broker_control import CONTROL_TOPIC, BrokerControl
from server.broker.mosquitto_conf import write_broker_files
from server.errors import ServerError
from server.store.schema import DEVICE_ACLS, DEVICE_CERTIFICATES
from tests.broker_fixture import ACCEPTED, NOT_AUTHORIZED, LocalBroker


@pytest.fixture
def control(broker: LocalBroker) -> Iterator[BrokerControl]:
    with BrokerControl(broker.layout, timeout=5.0) as broker_control:
        yield broker_control


def _write_files(broker: LocalBroker) -> None:
    assert broker.database is not None
    state = read_broker_state(broker.database)
    write_broker_files(broker.layout, state.acl_docs, state.revoked_device_ids, None)


def test_the_rights_file_is_read_at_start_and_at_each_reload(
    broker: LocalBroker, control: BrokerControl
) -> None:
    assert broker.database is not None
    assert control.stats() == {"loads": 1, "blocks": 0, "devices": 0}
    broker.database.collection(DEVICE_ACLS).insert_one({"device_id": "t2", "tier": "2"})
    with broker.client(broker.device("t2")[0], broker.layout.operational_port) as t2:
        assert t2.publish("devices/t2/app/x") == NOT_AUTHORIZED
        _write_files(broker)
        assert t2.publish("devices/t2/app/x") == NOT_AUTHORIZED  # written, not read yet
        control.reload()
        assert t2.publish("devices/t2/app/x") in ACCEPTED
        assert control.stats() == {"loads": 2, "blocks": 0, "devices": 1}
        assert "acl-operational: 5 patterns, 1 devices" in broker.log_text()


def test_a_rights_block_applies_at_once_without_a_reload(
    broker: LocalBroker, control: BrokerControl
) -> None:
    """The server listener's instance takes the block, the operational listener's answers
    the checks: one table, shared (Mosquitto dlopens the same .so once per listener)."""
    ports = broker.layout
    with (
        broker.client(broker.device("live")[0], ports.operational_port) as live,
        broker.client(broker.device("watcher")[0], ports.operational_port) as watcher,
        broker.client(broker.server_identity(), ports.server_port) as server,
    ):
        assert watcher.subscribe("devices/watcher/commands/#") == 1
        assert live.publish("apps/live/out") == NOT_AUTHORIZED
        control.update_rights({"live": ["topic write apps/live/out"]})
        assert live.publish("apps/live/out") in ACCEPTED  # no wait: applied before "done"
        assert live.publish("devices/live/status") in ACCEPTED  # the baseline stays

        # Denials first, wherever they stand in the block (acl_file put them in front).
        control.update_rights({"live": ["topic write apps/live/#", "topic deny apps/live/no"]})
        assert live.publish("apps/live/no") == NOT_AUTHORIZED
        assert live.publish("apps/live/yes") in ACCEPTED
        control.update_rights({"live": ["topic deny #", "topic write apps/live/out"]})
        assert live.publish("apps/live/out") == NOT_AUTHORIZED  # denials first
        assert live.publish("devices/live/status") == NOT_AUTHORIZED  # ... before patterns
        assert live.subscribe("devices/live/commands/#") == NOT_AUTHORIZED

        control.update_rights({"live": []})  # back to the baseline
        assert live.publish("apps/live/out") == NOT_AUTHORIZED
        assert live.publish("devices/live/status") in ACCEPTED
        assert live.subscribe("devices/live/commands/#") == 1

        # No reload happened, and another client's subscription was never interrupted.
        assert control.stats() == {"loads": 1, "blocks": 4, "devices": 0}
        assert server.publish("devices/watcher/commands/go", b"go") in ACCEPTED
        assert watcher.next_message().payload == b"go"
        assert watcher.connected and live.connected


def test_a_device_cannot_change_rights_over_the_control_topic(
    broker: LocalBroker, control: BrokerControl
) -> None:
    ports = broker.layout
    hostile = b"token t1\nuser attacker\ntopic readwrite #\nkick victim\nreload"
    with (
        broker.client(broker.device("attacker")[0], ports.operational_port) as operational,
        broker.client(broker.device("attacker", birth=True)[0], ports.provisioning_port) as birth,
        broker.client(broker.device("victim")[0], ports.operational_port) as victim,
    ):
        for attacker in (operational, birth):
            assert attacker.publish(CONTROL_TOPIC, hostile) == NOT_AUTHORIZED
            assert attacker.subscribe(f"{CONTROL_TOPIC}/response") == NOT_AUTHORIZED
        assert operational.publish("devices/victim/status") == NOT_AUTHORIZED
        assert victim.connected
    assert control.stats() == {"loads": 1, "blocks": 0, "devices": 0}


# --- malformed input never crashes the broker ---------------------------------------------

_MALFORMED = [
    "topic", "topic ", "topic read", "topic read ", "topic  read apps/x", "topic reed apps/x",
    "topic read apps/x y", "topic read apps/#/x", "topic read apps/x#", "topic read a+/x",
    "topic read %u/x", "topic write \x01/x", "topic readwrite apps/\x7f", "topic read\tapps/x",
    "topic deny " + "a/" * 600 + "b", "user", "user ", "user bad id", "user -dash",
    "user " + "x" * 65, "user CN=dev-1", "user a/b", "user dev+1", "user dev#",
    "pattern read", "pattern bogus devices/%u/x", "pattern read devices/%u/#/x",
    "patterns read devices/%u/x", "USER dev-1", "Topic read apps/x", "\x00user dev-1",
    "kick", "kick ", "kick bad id", "reload now", "token", "token bad token", "stats please",
    "\xff\xfe", "ümlaut", "#", " user dev-1", "user\tdev-1",
]  # fmt: skip


def _fuzz_lines(seed: int, count: int) -> list[str]:
    """Malformed lines: the list above, and random printable/binary garbage (random lines
    that start like a valid one are left out: they might be valid, and would apply)."""
    rng = random.Random(seed)
    lines = list(_MALFORMED)
    alphabet = "abc/+#$% \t\x01\x7fé" + "topic user pattern read write deny "
    while len(lines) < count:
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
        if line.split(" ")[0] not in ("user", "topic", "pattern"):
            lines.append(line)
    rng.shuffle(lines)
    return lines


def _log(broker: LocalBroker) -> str:
    return broker.layout.log_path.read_text(errors="replace")


def test_malformed_control_lines_are_ignored_and_logged(
    broker: LocalBroker, control: BrokerControl
) -> None:
    ports = broker.layout
    lines = _fuzz_lines(11, 400)
    for start in range(0, len(lines), 40):
        control._send(lines[start : start + 40])  # a NUL ends a message's text: its own
    # After the garbage, a valid block still applies; one with a malformed topic line
    # leaves its device with no rights at all (fail closed).
    clean = [line for line in lines if "\x00" not in line]
    control._send([*clean[:60], "user canary", "topic write apps/canary/out"])
    control._send(["user closed", "topic write apps/closed/out", "topic read apps/#/x"])
    with (
        broker.client(broker.device("canary")[0], ports.operational_port) as canary,
        broker.client(broker.device("closed")[0], ports.operational_port) as closed,
    ):
        assert canary.publish("apps/canary/out") in ACCEPTED
        assert closed.publish("devices/closed/status") == NOT_AUTHORIZED
        assert closed.publish("apps/closed/out") == NOT_AUTHORIZED
    assert broker.mosquitto.process is not None and broker.mosquitto.process.poll() is None
    assert control.stats()["loads"] == 1
    log = _log(broker)
    assert "control: malformed topic line: the device has no rights" in log
    assert "ignored a control line" in log


def test_malformed_file_lines_are_ignored_and_logged(
    broker: LocalBroker, control: BrokerControl
) -> None:
    ports = broker.layout
    garbage = _fuzz_lines(12, 400)
    text = broker.layout.acl_operational.read_text()
    text += "\n".join(garbage) + "\n"
    text += "user canary\ntopic write apps/canary/out\n"
    text += "user closed\ntopic write apps/closed/out\ntopic read apps/#/x\n"
    text += "user bad id\ntopic readwrite #\n"  # its topic lines belong to nobody
    broker.layout.acl_operational.write_bytes(text.encode("utf-8", "surrogateescape"))
    control.reload()
    with (
        broker.client(broker.device("canary")[0], ports.operational_port) as canary,
        broker.client(broker.device("closed")[0], ports.operational_port) as closed,
    ):
        assert canary.publish("apps/canary/out") in ACCEPTED
        assert canary.publish("devices/canary/status") in ACCEPTED  # patterns still read
        assert canary.publish("anything/else") == NOT_AUTHORIZED
        assert closed.publish("devices/closed/status") == NOT_AUTHORIZED
    assert control.stats() == {"loads": 2, "blocks": 0, "devices": 2}
    log = _log(broker)
    assert re.search(r"line \d+ ignored: malformed topic line: the device has no rights", log)
    assert re.search(r"line \d+ ignored: NUL byte", log)
    assert "topic line outside a valid user block" in log


def test_an_unreadable_rights_file_keeps_the_rights_and_refuses_a_start(
    broker: LocalBroker, control: BrokerControl
) -> None:
    assert broker.database is not None
    broker.database.collection(DEVICE_ACLS).insert_one({"device_id": "t2", "tier": "2"})
    _write_files(broker)
    control.reload()
    path = broker.layout.acl_operational
    saved = path.with_name("acl-operational.saved")
    os.replace(path, saved)
    path.mkdir()  # a directory: fopen works, reading fails
    with broker.client(broker.device("t2")[0], broker.layout.operational_port) as t2:
        control.reload()
        assert t2.publish("devices/t2/app/x") in ACCEPTED  # the old table stays
    assert control.stats()["loads"] == 2
    assert "rights unchanged" in _log(broker)
    control.close()
    broker.stop()
    path.rmdir()
    restarted = MosquittoBroker(broker.layout.directory, broker.layout.conf_path,
                                broker.layout.ports)  # fmt: skip
    with pytest.raises(ServerError):
        restarted.start(timeout=5)
    assert "needs a readable plugin_opt_rights_file" in _log(broker)
    os.replace(saved, path)
    broker.mosquitto.start()


# --- through the sync: database writes -> rights, without a reload ---------------------------


@pytest.fixture
def sync(broker: LocalBroker) -> Iterator[AclSync]:
    assert broker.database is not None
    acl_sync = AclSync(broker.database, broker.ca, broker.layout, interval=0.2).start()
    try:
        _eventually(lambda: acl_sync.syncs > 0, "first sync")
        yield acl_sync
    finally:
        acl_sync.stop()


def _eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.01)
    return time.monotonic() - started


def _set_acl(broker: LocalBroker, device_id: str, tier: str, rules: list[Any]) -> None:
    assert broker.database is not None
    broker.database.collection(DEVICE_ACLS).update_one(
        {"device_id": device_id},
        {"$set": {"tier": tier, "rules": rules, "last_updated": datetime.now(timezone.utc)}},
        upsert=True,
    )


def test_a_tier_downgrade_removes_rights_live_without_a_reload(
    broker: LocalBroker, sync: AclSync, control: BrokerControl
) -> None:
    ports = broker.layout
    with (
        broker.client(broker.device("t2")[0], ports.operational_port) as t2,
        broker.client(broker.device("listener")[0], ports.operational_port) as listener,
        broker.client(broker.server_identity(), ports.server_port) as server,
    ):
        assert listener.subscribe("devices/listener/commands/#") == 1
        _set_acl(broker, "t2", "2", [])
        _eventually(lambda: t2.publish("devices/t2/app/x") in ACCEPTED, "tier 2")
        assert t2.subscribe("devices/t2/#") == 1
        _set_acl(broker, "t2", "1", [{"action": "publish", "topic": "apps/t2", "allow": True}])
        took = _eventually(lambda: t2.publish("devices/t2/app/x") == NOT_AUTHORIZED, "tier 1")
        assert t2.publish("apps/t2") in ACCEPTED
        assert t2.subscribe("devices/t2/#") == NOT_AUTHORIZED
        assert t2.connected  # live: the same session lost the rights
        _set_acl(broker, "t2", "1", [])
        _eventually(lambda: t2.publish("apps/t2") == NOT_AUTHORIZED, "rule removed")
        print(f"tier 2 -> 1 applied after {took:.2f} s")
        assert server.publish("devices/listener/commands/x", b"x") in ACCEPTED
        assert listener.next_message().payload == b"x"  # never interrupted
    assert sync.reloads == 0 and sync.rights_updates >= 3
    assert control.stats()["loads"] == 1  # the broker read its file once: at start


def test_a_revoked_status_alone_cuts_and_leaves_a_pending_certificate_no_rights(
    broker: LocalBroker, sync: AclSync, control: BrokerControl
) -> None:
    """A web app that sets the current certificate's status to "revoked" (no CRL entry):
    the deny block goes to the broker with the kick, no reload."""
    assert broker.database is not None
    port = broker.layout.operational_port
    current, _ = broker.device("rv-1")
    pending, _ = broker.device("rv-1")  # the same CN, not on any CRL
    certificates = broker.database.collection(DEVICE_CERTIFICATES)
    certificates.insert_one({"device_id": "rv-1", "status": "active", "fingerprint": "f"})
    with broker.client(current, port) as session:
        assert session.publish("devices/rv-1/status") in ACCEPTED
        certificates.update_one({"device_id": "rv-1"}, {"$set": {"status": "revoked"}})
        took = _eventually(lambda: not session.connected, "cut")
    print(f"status revoked -> session cut after {took:.2f} s")
    with broker.client(pending, port) as again:
        assert again.publish("devices/rv-1/status") == NOT_AUTHORIZED
        assert again.subscribe("devices/rv-1/commands/#") == NOT_AUTHORIZED
    assert sync.reloads == 0
    assert control.stats()["loads"] == 1


def test_after_a_broker_restart_the_sync_resends_nothing_it_reads_the_file(
    broker: LocalBroker, sync: AclSync
) -> None:
    """Blocks sent over MQTT are also in the file (written first): a restarted broker has
    them; a request that failed while it was away is retried as a reload."""
    broker.stop()
    _set_acl(broker, "r-1", "2", [])
    _eventually(lambda: "user r-1" in broker.layout.acl_operational.read_text(), "written")
    _eventually(lambda: sync.failures >= 1, "the request failed")
    broker.mosquitto.start()
    _eventually(lambda: sync.reloads == 1, "a reload once the broker is back")
    with broker.client(broker.device("r-1")[0], broker.layout.operational_port) as device:
        assert device.publish("devices/r-1/app/x") in ACCEPTED

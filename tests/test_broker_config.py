"""Broker configuration: generated files, rule validation, and a real Mosquitto enforcing them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from harness.local_broker import reload_broker
from harness.local_services import MosquittoBroker, free_port
from server.broker.acl_sync import AclSync
from server.broker.guard_plugin import cached_guard_plugin
from server.broker.layout_file import load_layout
from server.broker.mosquitto_conf import (
    BrokerError,
    BrokerLayout,
    InvalidRule,
    render_mosquitto_conf,
    render_operational_acl,
    validate_rule,
    write_broker_files,
)
from server.cli.main import main as server_cli
from server.pki.ca import CertificateAuthority, serial_hex
from server.store.db import Database
from server.store.schema import CERTIFICATE_REVOCATIONS, DEVICE_ACLS
from tests.broker_fixture import (
    ACCEPTED,
    NOT_AUTHORIZED,
    ConnectRefused,
    LocalBroker,
    MqttClient,
    can_connect,
    message_property,
    publish_properties,
)


def _layout(tmp_path: Path, ca: CertificateAuthority) -> BrokerLayout:
    return BrokerLayout(tmp_path / "broker", ca.paths, 18831, 18832, 18830)


# --- generated files ------------------------------------------------------------------------


def _listeners(conf: str) -> dict[str, dict[str, str]]:
    """``{"port bind": {option: value}}`` for each listener block of a mosquitto.conf."""
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in conf.splitlines():
        if line.startswith("listener "):
            current = blocks.setdefault(line.split(" ", 1)[1], {})
        elif current is not None and line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            current[key] = value
    return blocks


def test_conf_has_three_mtls_listeners_each_with_its_acl_crl_and_the_plugin(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    layout = _layout(tmp_path, ca)
    conf = render_mosquitto_conf(layout)
    assert "per_listener_settings true" in conf.splitlines()
    # Under systemd: no pid or log file Mosquitto could not write after dropping root.
    assert "pid_file" not in conf and "log_dest stderr" in conf.splitlines()
    listeners = _listeners(conf)
    assert set(listeners) == {"18830 127.0.0.1", "18831 0.0.0.0", "18832 0.0.0.0"}
    for options in listeners.values():
        assert options["require_certificate"] == "true"
        assert options["allow_anonymous"] == "false"
        assert options["tls_version"] == "tlsv1.2"
        assert options["plugin"] == str(layout.guard_plugin)
        # Mosquitto reads copies in its own directory, never the CA's.
        assert options["certfile"] == str(layout.broker_cert)
        assert options["keyfile"] == str(layout.broker_key)
    server, provisioning = listeners["18830 127.0.0.1"], listeners["18831 0.0.0.0"]
    operational = listeners["18832 0.0.0.0"]
    assert [
        server["plugin_opt_listener"],
        provisioning["plugin_opt_listener"],
        operational["plugin_opt_listener"],
    ] == ["server", "provisioning", "operational"]
    assert server["cafile"] == operational["cafile"] == str(layout.device_ca_chain)
    assert provisioning["cafile"] == str(layout.factory_ca_chain)
    assert server["crlfile"] == operational["crlfile"] == str(layout.crl_path)
    assert provisioning["crlfile"] == str(layout.factory_crl_path)
    assert server["acl_file"] == str(layout.acl_server)
    # The plugin is the device listeners' whole ACL; it reads the operational rights file.
    assert "acl_file" not in provisioning and "acl_file" not in operational
    assert operational["plugin_opt_rights_file"] == str(layout.acl_operational)
    assert "plugin_opt_rights_file" not in server and "plugin_opt_rights_file" not in provisioning
    # Client id = certificate identity on the device listeners; birth usernames "CN=<id>".
    assert server["use_identity_as_username"] == operational["use_identity_as_username"]
    assert provisioning["use_subject_as_username"] == "true"
    assert provisioning["use_username_as_clientid"] == "true"
    assert operational["use_username_as_clientid"] == "true"
    assert "use_username_as_clientid" not in server  # several server processes, one identity
    with_runtime = dataclasses.replace(layout, runtime_dir=tmp_path / "run")
    assert f"pid_file {tmp_path / 'run' / 'mosquitto.pid'}" in render_mosquitto_conf(with_runtime)


def test_conf_refuses_a_path_that_would_inject_a_line(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    layout = BrokerLayout(tmp_path / "x\nacl_file /etc/passwd", ca.paths, 1, 2, 3)
    with pytest.raises(BrokerError, match="cannot be written"):
        render_mosquitto_conf(layout)


def test_tiers_and_rules_become_user_blocks_after_the_patterns() -> None:
    docs: list[dict[str, Any]] = [
        {"device_id": "dev-b", "tier": "2", "rules": []},
        {"device_id": "dev-a", "tier": "1", "rules": [
            {"action": "publish", "topic": "apps/dev-a/out", "allow": True},
            {"action": "subscribe", "topic": "devices/dev-a/telemetry/secret", "allow": False},
        ]},
        {"device_id": "dev-c", "tier": "3"},
        {"device_id": "dev-plain", "tier": "1", "rules": []},
    ]  # fmt: skip
    acl = render_operational_acl(docs, revoked_device_ids=["dev-r"])
    assert acl.index("pattern write devices/%u/status") < acl.index("user ")
    assert "user dev-plain" not in acl  # tier 1 without rules: the patterns are enough
    assert (
        "user dev-a\ntopic deny devices/dev-a/telemetry/secret\ntopic write apps/dev-a/out\n" in acl
    )
    assert "user dev-b\ntopic readwrite devices/dev-b/#\n" in acl
    assert "user dev-c\ntopic readwrite devices/dev-c/#\ntopic read fleet/#\n" in acl
    assert "user dev-r\ntopic deny #\n" in acl
    # Deterministic: the same input renders the same bytes (so unchanged data -> no reload).
    assert acl == render_operational_acl(list(reversed(docs)), ["dev-r"])


def test_revoked_device_loses_its_grants() -> None:
    docs = [{"device_id": "dev-r", "tier": "3", "rules": []}]
    acl = render_operational_acl(docs, ["dev-r"])
    assert "user dev-r\ntopic deny #\n" in acl
    assert "fleet" not in acl


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"action": "publish", "topic": "apps/x\nuser dev-1\ntopic readwrite #", "allow": True},
         "control"),
        ({"action": "publish", "topic": "apps/x\r", "allow": True}, "control"),
        ({"action": "publish", "topic": "apps/\u2028x", "allow": True}, "control"),
        ({"action": "publish", "topic": "apps/x y", "allow": True}, "whitespace"),
        ({"action": "publish", "topic": "devices/%u/x", "allow": True}, "%"),
        ({"action": "publish", "topic": "devices/%c/x", "allow": False}, "%"),
        ({"action": "publish", "topic": "apps/#/x", "allow": True}, "'#'"),
        ({"action": "publish", "topic": "apps/x#", "allow": True}, "'#'"),
        ({"action": "publish", "topic": "apps/a+/x", "allow": True}, "'\\+'"),
        ({"action": "publish", "topic": "apps//x", "allow": True}, "empty level"),
        ({"action": "subscribe", "topic": "$SYS/#", "allow": True}, "reserved"),
        ({"action": "publish", "topic": "a/" * 200, "allow": True}, "longer"),
        ({"action": "publish", "topic": "", "allow": True}, "non-empty"),
        ({"action": "publish", "topic": 7, "allow": True}, "non-empty"),
        ({"action": "both", "topic": "#", "allow": True}, "provisioning"),
        ({"action": "both", "topic": "+/dev-1/x", "allow": True}, "provisioning"),
        ({"action": "publish", "topic": "provisioning/dev-2/request", "allow": True},
         "provisioning"),
        ({"action": "subscribe", "topic": "devices/dev-2/commands", "allow": True}, "own"),
        ({"action": "subscribe", "topic": "devices/+/status", "allow": True}, "own"),
        ({"action": "subscribe", "topic": "devices/#", "allow": True}, "own"),
        ({"action": "subscribe", "topic": "devices", "allow": True}, "own"),
        ({"action": "readwrite", "topic": "apps/x", "allow": True}, "action"),
        ({"action": "publish", "topic": "apps/x", "allow": "yes"}, "allow"),
        ({"action": "publish", "topic": "apps/x"}, "allow"),
        ("topic readwrite #", "not an object"),
    ],
)  # fmt: skip
def test_unsafe_rules_are_rejected(rule: object, reason: str) -> None:
    with pytest.raises(InvalidRule, match=reason):
        validate_rule(rule, "dev-1")


@pytest.mark.parametrize(
    ("rule", "line"),
    [
        ({"action": "publish", "topic": "apps/dev-1/out", "allow": True}, "write apps/dev-1/out"),
        ({"action": "Subscribe", "topic": "fleet/+/news", "allow": True}, "read fleet/+/news"),
        ({"action": "both", "topic": "devices/dev-1/#", "allow": True},
         "readwrite devices/dev-1/#"),
        ({"action": "both", "topic": "#", "allow": False}, "deny #"),
        ({"action": "publish", "topic": "devices/dev-2/x", "allow": False}, "deny devices/dev-2/x"),
        ({"action": "publish", "topic": "capteur/température", "allow": True},
         "write capteur/température"),
    ],
)  # fmt: skip
def test_safe_rules_are_accepted(rule: dict[str, object], line: str) -> None:
    parsed = validate_rule(rule, "dev-1")
    assert f"{parsed.access} {parsed.topic}" == line


# Every line of a generated ACL file, whatever the database held.
_ACL_LINE = re.compile(
    r"^(#.*|pattern (read|write|readwrite|deny) \S+|user [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"
    r"|topic (read|write|readwrite|deny) [^\s%$]\S*|)$"
)


def test_hostile_documents_cannot_inject_acl_lines() -> None:
    injection = "apps/x\nuser provisioning-server\ntopic readwrite #"
    docs: list[dict[str, Any]] = [
        {"device_id": "dev-1\nuser dev-2", "tier": "3"},
        {"device_id": "provisioning-server", "tier": "3"},
        {"device_id": "dev+1", "tier": "3"},
        {"device_id": "dev-1", "tier": "2\ntopic readwrite #", "rules": [
            {"action": "publish", "topic": injection, "allow": True},
            {"action": "publish\ntopic readwrite #", "topic": "apps/x", "allow": True},
            {"action": "publish", "topic": "apps/ok", "allow": True, "extra": "\n"},
        ]},
        {"device_id": "dev-2", "rules": "topic readwrite #"},
        {"device_id": 17, "tier": "3"},
    ]  # fmt: skip
    acl = render_operational_acl(docs, ["dev-3\ntopic readwrite #"])
    for line in acl.split("\n"):
        assert _ACL_LINE.match(line), f"unexpected ACL line {line!r}"
    users = re.findall(r"^user (.*)$", acl, flags=re.MULTILINE)
    assert users == ["dev-1"], "only the valid device gets a block"
    # A bad tier falls back to tier 1; only the one valid rule survives.
    assert acl.endswith("user dev-1\ntopic write apps/ok\n")


def test_write_broker_files_reports_changes_and_writes_atomically(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    layout = _layout(tmp_path, ca)
    crl, factory_crl = ca.build_crl([]), ca.build_crl([], issuer="factory")
    docs = [{"device_id": "dev-1", "tier": "2"}]
    assert write_broker_files(layout, docs, [], crl, factory_crl) is True
    assert layout.crl_path.read_bytes() == crl
    assert layout.factory_crl_path.read_bytes() == factory_crl
    before = {p: p.stat().st_mtime_ns for p in layout.directory.iterdir()}
    assert write_broker_files(layout, docs, [], None, None) is False
    assert write_broker_files(layout, docs, [], crl, factory_crl) is False
    assert {p: p.stat().st_mtime_ns for p in layout.directory.iterdir()} == before
    assert write_broker_files(layout, [{"device_id": "dev-1", "tier": "3"}], [], None) is True
    assert write_broker_files(layout, docs, ["dev-1"], None) is True
    # No temp files are left behind; nothing is world-readable.
    assert sorted(p.name for p in layout.directory.iterdir()) == [
        "acl-operational", "acl-server", "crl.pem", "factory-crl.pem", "mosquitto.conf",
    ]  # fmt: skip
    assert stat.S_IMODE(layout.directory.stat().st_mode) == 0o2750
    for path in layout.directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


def test_write_broker_files_needs_a_crl_the_first_time(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    with pytest.raises(BrokerError, match=r"crl\.pem is missing"):
        write_broker_files(_layout(tmp_path, ca), [], [], None)


def test_reload_broker_names_a_missing_or_stale_pid_file(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    layout = _layout(tmp_path, ca)
    layout.directory.mkdir(parents=True)
    with pytest.raises(BrokerError, match="no pid file"):
        reload_broker(layout)
    layout.pid_path.write_text("garbage\n")
    with pytest.raises(BrokerError, match="not a process id"):
        reload_broker(layout)
    layout.pid_path.write_text(f"{os.getpid()}\n")  # a live process that is not Mosquitto
    with pytest.raises(BrokerError, match=r"stale: process \d+ is '"):
        reload_broker(layout)
    layout.pid_path.write_text("4194303\n")  # above any pid_max default: no such process
    with pytest.raises(BrokerError, match="stale: no process"):
        reload_broker(layout)


# A process that calls itself "mosquitto" (prctl PR_SET_NAME) and installs its SIGHUP handler
# only when told to: Mosquitto's window between writing its pid file and setting up its signal
# handlers, which a real broker opens for a few milliseconds at every start.
_STARTING_BROKER = """
import ctypes, signal, sys
ctypes.CDLL(None).prctl(15, b"mosquitto", 0, 0, 0)
print("named", flush=True)
sys.stdin.readline()
signal.signal(signal.SIGHUP, lambda *_: print("reloaded", flush=True))
print("handling", flush=True)
sys.stdin.readline()
"""


def test_reload_waits_until_the_broker_handles_sighup(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """A SIGHUP before Mosquitto handles it would kill the broker (the default action)."""
    layout = _layout(tmp_path, ca)
    layout.directory.mkdir(parents=True)
    starting = subprocess.Popen(
        [sys.executable, "-c", _STARTING_BROKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert starting.stdin is not None and starting.stdout is not None
        assert starting.stdout.readline() == "named\n"
        layout.pid_path.write_text(f"{starting.pid}\n")
        with pytest.raises(BrokerError, match="still starting"):
            reload_broker(layout)
        assert starting.poll() is None, "the reload killed a broker that was starting"
        starting.stdin.write("go\n")
        starting.stdin.flush()
        assert starting.stdout.readline() == "handling\n"
        reload_broker(layout)
        assert starting.stdout.readline() == "reloaded\n"
    finally:
        starting.kill()
        starting.wait()
        for stream in (starting.stdin, starting.stdout):
            if stream is not None:
                stream.close()


# --- a real Mosquitto ------------------------------------------------------------------------


def _delivered_only(receiver: MqttClient, sender: MqttClient, denied: str, allowed: str) -> None:
    """``sender`` publishes on ``denied`` then ``allowed``: only the second may arrive."""
    assert sender.publish(denied, b"denied") in ACCEPTED
    assert sender.publish(allowed, b"allowed") in ACCEPTED
    message = receiver.next_message()
    assert (message.topic, message.payload) == (allowed, b"allowed")
    assert receiver.messages.empty()


def test_birth_certificate_request_is_answered_by_the_server_identity(
    broker: LocalBroker,
) -> None:
    ports = broker.layout
    birth, _ = broker.device("dev-1", birth=True)
    with (
        broker.client(broker.server_identity(), ports.server_port) as server,
        broker.client(birth, ports.provisioning_port) as device,
    ):
        assert server.subscribe("$share/provisioners/provisioning/+/request") == 1
        assert device.subscribe("provisioning/dev-1/response") == 1
        props = publish_properties("provisioning/dev-1/response", b"corr-1")
        assert device.publish("provisioning/dev-1/request", b'{"v":1}', props) == 0
        request = server.next_message()
        assert request.topic == "provisioning/dev-1/request"
        reply = publish_properties(None, message_property(request, "CorrelationData"))
        reply_topic = message_property(request, "ResponseTopic")
        assert server.publish(reply_topic, b'{"ok":true}', reply) == 0
        response = device.next_message()
        assert response.payload == b'{"ok":true}'
        assert message_property(response, "CorrelationData") == b"corr-1"

        # Another device's topics are refused by the broker itself.
        assert device.publish("provisioning/dev-2/request") == NOT_AUTHORIZED
        assert device.publish("devices/dev-1/status") == NOT_AUTHORIZED
        assert server.messages.empty()
        # Subscribing to other devices' responses is refused, and they are never delivered.
        assert device.subscribe("provisioning/+/response") == NOT_AUTHORIZED
        assert device.subscribe("provisioning/dev-2/response") == NOT_AUTHORIZED
        _delivered_only(
            device, server, "provisioning/dev-2/response", "provisioning/dev-1/response"
        )


def test_each_listener_takes_only_its_own_certificates(broker: LocalBroker) -> None:
    ports = broker.layout
    birth, _ = broker.device("dev-1", birth=True)
    birth_chain, _ = broker.device("dev-1", birth=True, with_issuer=True)
    operational, _ = broker.device("dev-1")
    operational_chain, _ = broker.device("dev-1", with_issuer=True)
    server = broker.server_identity()
    assert can_connect(broker, birth, ports.provisioning_port)
    assert can_connect(broker, birth_chain, ports.provisioning_port)
    assert can_connect(broker, operational, ports.operational_port)
    assert can_connect(broker, server, ports.server_port)
    # Same root, so only the CRL check keeps these out (see render_mosquitto_conf).
    for files, port in [
        (birth, ports.operational_port),
        (birth_chain, ports.operational_port),
        (birth_chain, ports.server_port),
        (operational, ports.provisioning_port),
        (operational_chain, ports.provisioning_port),
        (server, ports.provisioning_port),
    ]:
        assert not can_connect(broker, files, port), (files.cert.name, port)


def test_operational_certificate_never_reaches_provisioning_topics(broker: LocalBroker) -> None:
    operational, _ = broker.device("dev-1")
    with (
        broker.client(operational, broker.layout.operational_port) as device,
        broker.client(broker.server_identity(), broker.layout.server_port) as server,
    ):
        assert device.publish("provisioning/dev-1/request") == NOT_AUTHORIZED
        assert device.subscribe("provisioning/dev-1/response") == NOT_AUTHORIZED
        assert device.subscribe("devices/dev-1/commands/#") == 1
        _delivered_only(device, server, "provisioning/dev-1/response", "devices/dev-1/commands/a")
        assert device.publish("devices/dev-1/status", b"online") in ACCEPTED


def test_server_identity_is_just_a_device_on_the_operational_listener(
    broker: LocalBroker,
) -> None:
    # The server's certificate (device CA) works on the operational listener, but there
    # its CN has no user block: no provisioning or devices' topics.
    with broker.client(broker.server_identity(), broker.layout.operational_port) as server:
        assert server.publish("provisioning/dev-1/response") == NOT_AUTHORIZED
        assert server.publish("devices/dev-1/commands/x") == NOT_AUTHORIZED


def _insert_acl(broker: LocalBroker, doc: dict[str, Any]) -> None:
    assert broker.database is not None
    broker.database.collection(DEVICE_ACLS).insert_one(dict(doc))


def _reload_and_wait(broker: LocalBroker, check: Any, timeout: float = 5.0) -> None:
    """SIGHUP and retry ``check`` until it passes: Mosquitto applies a reload asynchronously."""
    from server.broker.acl_sync import read_broker_state

    assert broker.database is not None
    state = read_broker_state(broker.database)
    write_broker_files(broker.layout, state.acl_docs, state.revoked_device_ids, None)
    reload_broker(broker.layout)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the broker did not apply the reload"
        time.sleep(0.05)


def test_tiers_and_explicit_rules_are_enforced(broker: LocalBroker) -> None:
    for doc in (
        {"device_id": "t1", "tier": "1", "rules": [
            {"action": "publish", "topic": "apps/t1/out", "allow": True},
            {"action": "both", "topic": "devices/t1/telemetry/secret", "allow": False},
            {"action": "publish", "topic": "devices/t2/x\ntopic readwrite #", "allow": True},
        ]},
        {"device_id": "t2", "tier": "2", "rules": []},
        {"device_id": "t3", "tier": "3", "rules": []},
    ):  # fmt: skip
        _insert_acl(broker, doc)
    ports = broker.layout
    with contextlib.ExitStack() as stack:
        t1, t2, t3 = (
            stack.enter_context(broker.client(broker.device(name)[0], ports.operational_port))
            for name in ("t1", "t2", "t3")
        )
        server = stack.enter_context(broker.client(broker.server_identity(), ports.server_port))
        # Before the reload, t1 has only the baseline.
        assert t1.publish("apps/t1/out") == NOT_AUTHORIZED
        _reload_and_wait(broker, lambda: t1.publish("apps/t1/out") in ACCEPTED)

        # Baseline (tier 1) for everybody.
        for name, client in (("t1", t1), ("t2", t2), ("t3", t3)):
            assert client.publish(f"devices/{name}/status") in ACCEPTED
            assert client.publish(f"devices/{name}/telemetry/temp") in ACCEPTED
            assert client.publish(f"devices/{name}/cert/renew") in ACCEPTED
            assert client.publish("devices/other/telemetry/temp") == NOT_AUTHORIZED
            assert client.publish(f"devices/{name}/commands/x") in (
                (NOT_AUTHORIZED,) if name == "t1" else ACCEPTED
            )
        # Tier 1: nothing else of its own; a deny rule beats the baseline pattern.
        assert t1.publish("devices/t1/app/x") == NOT_AUTHORIZED
        assert t1.publish("devices/t1/telemetry/secret") == NOT_AUTHORIZED
        # The injection attempt in t1's rules granted nothing.
        assert t1.publish("devices/t2/x") == NOT_AUTHORIZED
        assert t1.publish("anything/else") == NOT_AUTHORIZED
        # Reads: own commands yes, other devices' and the fleet's no (tiers 1, 2).
        for name, client in (("t1", t1), ("t2", t2)):
            assert client.subscribe("#") == NOT_AUTHORIZED
            assert client.subscribe("fleet/#") == NOT_AUTHORIZED
            assert client.subscribe(f"devices/{name}/commands/#") == 1
            _delivered_only(client, server, "fleet/news", f"devices/{name}/commands/a")
        assert t1.subscribe("devices/t1/#") == NOT_AUTHORIZED  # tier 1 reads commands only
        assert t2.subscribe("devices/t2/#") == 1
        assert t1.subscribe("devices/t1/telemetry/secret") == NOT_AUTHORIZED  # the deny rule
        assert t1.subscribe("devices/t1/cert/renew/response") == 1
        # Tier 2: its whole subtree; tier 3: plus the fleet broadcast.
        assert t2.publish("devices/t2/app/x") in ACCEPTED
        assert t3.publish("devices/t3/app/x") in ACCEPTED
        assert t3.publish("fleet/news") == NOT_AUTHORIZED
        assert t3.subscribe("fleet/#") == 1
        assert server.publish("fleet/news", b"hello") in ACCEPTED
        assert t3.next_message().payload == b"hello"


def test_connect_refused_is_reported_not_hung(broker: LocalBroker) -> None:
    birth, _ = broker.device("dev-1", birth=True)
    started = time.monotonic()
    with pytest.raises(ConnectRefused):
        broker.client(birth, broker.layout.operational_port)
    assert time.monotonic() - started < 4


# --- the files as Debian's mosquitto reads them (issue #11 item 7) ----------------------------


@pytest.fixture
def traversable_dir() -> Iterator[Path]:
    """A directory user ``mosquitto`` can traverse (pytest's tmp_path is 0700 root)."""
    base = Path(tempfile.mkdtemp(prefix="broker-as-mosquitto-", dir="/tmp"))
    os.chmod(base, 0o711)  # noqa: S103 (traverse, not list)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="starting Mosquitto as root is what drops to it")
def test_broker_config_output_starts_as_user_mosquitto(
    traversable_dir: Path, ca: CertificateAuthority, mongodb_uri: str, database: Database
) -> None:
    """What Debian's unit does: start as root, drop to ``mosquitto`` before reading files."""
    try:
        broker_user = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.fail("Debian's mosquitto package creates user mosquitto; it is missing here")
    out = traversable_dir / "broker"
    ports = [free_port() for _ in range(3)]
    result = CliRunner().invoke(server_cli, [
        "--mongodb-uri", mongodb_uri, "broker-config", "--out", str(out),
        "--ca-dir", str(ca.paths.directory), "--provisioning-port", str(ports[0]),
        "--operational-port", str(ports[1]), "--server-port", str(ports[2]),
        "--bind", "127.0.0.1", "--run-as", "mosquitto",
        "--guard-plugin", str(cached_guard_plugin()),
    ], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    # Nothing world-readable; Mosquitto's group reads everything; the key is a copy.
    assert (out.stat().st_gid, stat.S_IMODE(out.stat().st_mode)) == (broker_user.pw_gid, 0o2750)
    for path in out.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0 and path.stat().st_gid == broker_user.pw_gid, path.name
    assert "keyfile " + str(out / "broker.key") in (out / "mosquitto.conf").read_text()
    assert str(ca.paths.directory) not in (out / "mosquitto.conf").read_text()
    layout = load_layout(out)
    broker = MosquittoBroker(traversable_dir / "run", layout.conf_path, layout.ports).start()
    try:
        assert broker.process is not None
        status = Path(f"/proc/{broker.process.pid}/status").read_text()
        assert f"Uid:\t{broker_user.pw_uid}\t" in status  # it did drop root
        local = LocalBroker(traversable_dir, ca, database, running=(broker, layout))
        files, cert = local.device("as-mosquitto")
        with local.client(files, layout.operational_port) as device:
            assert device.publish("devices/as-mosquitto/status") in ACCEPTED
            assert device.subscribe("#") == NOT_AUTHORIZED  # the plugin loaded
            # A reload over MQTT re-reads the files as user mosquitto and cuts the device.
            database.collection(CERTIFICATE_REVOCATIONS).insert_one(
                {"serial": serial_hex(cert), "device_id": "as-mosquitto"}
            )
            with AclSync(database, ca, layout, interval=0.2):
                deadline = time.monotonic() + 5
                while device.connected:
                    assert time.monotonic() < deadline, broker.log_text()
                    time.sleep(0.05)
        assert not can_connect(local, files, layout.operational_port)
    finally:
        broker.stop()

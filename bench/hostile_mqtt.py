"""Hostile messages through a real broker to a real ``provision-server run`` process.

Three sessions with real TLS identities: the provisioned device's birth-certificate
session (provisioning listener), its operational session (renewal and status topics)
and an unallocated device's birth session. The server is a separate process, so a
crash shows as its exit and its resident memory is measured from ``/proc``.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import protocol
from bench.hostile_inputs import Channel, Hostile
from bench.stack import rss_bytes
from server.pki.ca import CertificateAuthority

WINDOW: Final = 100  # messages in flight (unanswered) at most
TIMEOUT_S: Final = 60.0
MB: Final = 1024 * 1024
# A server that never sweeps devices OFFLINE while a long hostile run keeps them busy.
QUIET_SERVER_ENV: Final = {"PROVISION_SERVER_POLICY_OFFLINE_TIMEOUT_S": "86400"}


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


class ServerProcess:
    """``provision-server run`` with its log in a file; the log lines are what we count."""

    def __init__(
        self,
        ca: CertificateAuthority,
        server_port: int,
        mongodb_uri: str,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log = log
        exe = Path(sys.executable).with_name("provision-server")
        argv = [
            str(exe), "--mongodb-uri", mongodb_uri, "run",
            "--ca-dir", str(ca.paths.directory),
            "--broker-host", "127.0.0.1", "--broker-port", str(server_port),
        ]  # fmt: skip
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        deadline = time.monotonic() + 30
        while "event=broker-connect result=ok" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"provision-server did not come up:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        time.sleep(0.3)  # the SUBACK follows the CONNACK callback

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, marker: str) -> int:
        return self.text().count(marker)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


class Session:
    """One MQTT v5 mTLS connection that pipelines QoS 1 publishes and collects replies."""

    def __init__(
        self,
        client_id: str,
        port: int,
        root_ca: Path,
        cert: Path,
        key: Path,
        *,
        name: str = "",
        will: bool = False,
    ) -> None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root_ca))
        context.load_cert_chain(str(cert), str(key))
        self.client_id = client_id
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=name or client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(context)
        self.client.max_inflight_messages_set(WINDOW)
        self.client.max_queued_messages_set(0)
        if will:  # what the agent sets: a retained "offline" on the device's status topic
            self.client.will_set(
                protocol.status_topic(client_id),
                protocol.encode({"status": "offline"}),
                qos=1,
                retain=True,
            )
        self.cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.acked: set[int] = set()
        self.refused: Counter[int] = Counter()  # PUBACK failure reason -> count
        self.replies: dict[bytes, dict[str, Any]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda _c, _u, mid, _rc, _p: self._ack(mid)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        self.wait(lambda: self.connack is not None, "CONNACK")
        if self.connack is not None and self.connack.is_failure:
            raise RuntimeError(f"{client_id}: connection refused: {self.connack}")

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def _ack(self, mid: int) -> None:
        with self.cond:
            self.acked.add(mid)
            self.cond.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            with self.cond:
                self.refused[int(rc.value)] += 1
        self._ack(mid)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        try:
            body = json.loads(message.payload)
        except ValueError:
            body = {"unparseable": True}
        if isinstance(correlation, bytes):
            with self.cond:
                self.replies[correlation] = body if isinstance(body, dict) else {"odd": body}
                self.cond.notify_all()

    def wait(self, ready: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
        with self.cond:
            if not self.cond.wait_for(ready, timeout):
                raise TimeoutError(f"{self.client_id}: timed out waiting for {what}")

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        self.wait(lambda: mid in self.acked, f"SUBACK {topic}")

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        reply_to: str | None = None,
        correlation: bytes | None = None,
        retain: bool = False,
    ) -> int:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if reply_to is not None:
            props.ResponseTopic = reply_to
        if correlation is not None:
            props.CorrelationData = correlation
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        return info.mid

    def request(self, topic: str, reply_to: str, payload: bytes) -> dict[str, Any]:
        correlation = os.urandom(8)
        self.publish(topic, payload, reply_to=reply_to, correlation=correlation)
        self.wait(lambda: correlation in self.replies, f"the answer on {reply_to}")
        return self.replies.pop(correlation)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho leaves its wake-up socket pair to __del__


@dataclass
class Sessions:
    """Where each (target, channel) goes: session, topic and reply topic."""

    active_birth: Session
    active_operational: Session
    unallocated_birth: Session
    active_id: str
    unallocated_id: str

    def route(self, message: Hostile) -> tuple[Session, str, str | None]:
        if message.target == "unallocated":
            cid = self.unallocated_id
            return self.unallocated_birth, protocol.request_topic(cid), protocol.response_topic(cid)
        cid = self.active_id
        if message.channel is Channel.REQUEST:
            return self.active_birth, protocol.request_topic(cid), protocol.response_topic(cid)
        if message.channel is Channel.RENEW:
            reply = protocol.renew_response_topic(cid)
            return self.active_operational, protocol.renew_topic(cid), reply
        return self.active_operational, protocol.status_topic(cid), None

    def all(self) -> tuple[Session, ...]:
        return (self.active_birth, self.active_operational, self.unallocated_birth)

    def close(self) -> None:
        for session in self.all():
            session.close()


@dataclass
class BrokerOutcome:
    sent: int = 0
    requests: int = 0
    statuses: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    ok_by_family: Counter[str] = field(default_factory=Counter)
    internal: list[str] = field(default_factory=list)
    rss_samples: list[int] = field(default_factory=list)
    seconds: float = 0.0


def send_over_broker(
    sessions: Sessions,
    messages: list[Hostile],
    server: ServerProcess,
    outcome: BrokerOutcome,
    *,
    sample_every: int = 500,
) -> None:
    """Publish ``messages`` with at most WINDOW unanswered; wait for the server to handle all."""
    started = time.monotonic()
    pending: dict[bytes, tuple[Session, Hostile]] = {}
    status_before = server.count("event=status device=")
    statuses = 0
    for index, message in enumerate(messages):
        session, topic, reply_to = sessions.route(message)
        correlation = index.to_bytes(8, "big") + os.urandom(2)
        if reply_to is None:
            session.publish(topic, message.payload)
            statuses += 1
        else:
            session.publish(topic, message.payload, reply_to=reply_to, correlation=correlation)
            pending[correlation] = (session, message)
            outcome.requests += 1
        outcome.sent += 1
        if len(pending) >= WINDOW:
            _collect(pending, outcome, block=True)
        if index % sample_every == 0:
            if not server.alive:
                raise RuntimeError(f"provision-server died:\n{server.text()[-3000:]}")
            outcome.rss_samples.append(server.rss())
    while pending:
        _collect(pending, outcome, block=True)
    deadline = time.monotonic() + TIMEOUT_S
    outcome.statuses += statuses
    while server.count("event=status device=") - status_before < statuses:
        if time.monotonic() > deadline or not server.alive:
            raise TimeoutError("the server did not handle every status message")
        time.sleep(0.1)
    outcome.rss_samples.append(server.rss())
    outcome.seconds += time.monotonic() - started


def _collect(
    pending: dict[bytes, tuple[Session, Hostile]], outcome: BrokerOutcome, *, block: bool
) -> None:
    """Take every reply that has arrived; with ``block``, wait for at least one."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        done = 0
        for correlation, (session, message) in list(pending.items()):
            with session.cond:
                body = session.replies.pop(correlation, None)
            if body is None:
                continue
            del pending[correlation]
            done += 1
            _record(outcome, message, body)
        if done or not block or not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} requests were never answered")
        time.sleep(0.002)


def _record(outcome: BrokerOutcome, message: Hostile, body: Mapping[str, Any]) -> None:
    if body.get("ok") is True:
        outcome.codes["ok"] += 1
        outcome.ok_by_family[message.family] += 1
        return
    error = body.get("error")
    code = str(error.get("code")) if isinstance(error, dict) else "malformed-response"
    outcome.codes[code] += 1
    if code == protocol.ErrorCode.INTERNAL.value:
        outcome.internal.append(f"{message.family}: {message.payload[:120]!r}")


def memory_growth_mb(samples: list[int]) -> float:
    """Growth after warm-up: the last sample against the one a fifth into the run."""
    if len(samples) < 2:
        return 0.0
    warm = samples[max(1, len(samples) // 5) - 1]
    return (samples[-1] - warm) / MB

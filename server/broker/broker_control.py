"""Change device rights, reload the broker and cut sessions over MQTT (provisioning_guard).

The plugin listens on ``$CONTROL/provisioning-guard/v1`` on the server listener (loopback);
only the server identity may publish there (acl-server). Compared with SIGHUP through a pid
file this needs no signal rights and no shared /run directory (the hardened server unit
has neither), and it tells when the reload is applied: the plugin answers from Mosquitto's
reload event, after the CRLs and before any further packet is read. Kicks sent with a
reload run there too, so a cut device can only reconnect against the new CRL and ACLs.
``update_rights`` replaces single devices' entries in the plugin's rights table (the
operational listener's ACL) without a reload, then kicks.

For other parts of the server: ``cut_device_sessions(layout, ["dev-1"])`` disconnects every
session of those devices now (operational and birth); the ACL sync already does it for
every revocation it sees in the database.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol import CLIENT_ID_RE
from server.broker.mosquitto_conf import BrokerError, BrokerLayout
from server.pki.ca import SERVER_CLIENT_CN

log = logging.getLogger(__name__)

CONTROL_TOPIC: Final = "$CONTROL/provisioning-guard/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"
KICKS_PER_MESSAGE: Final = 5000
"""About 100 kB per message, far below the broker's 1 MiB packet limit."""
RIGHTS_BYTES_PER_MESSAGE: Final = 256 * 1024
"""Rights blocks per message (a block is never split across two)."""
DEFAULT_TIMEOUT_S: Final = 10.0


def _valid_ids(device_ids: Iterable[str]) -> list[str]:
    """Device ids the plugin accepts; never the server's own identity."""
    valid: list[str] = []
    for device_id in device_ids:
        if isinstance(device_id, str) and CLIENT_ID_RE.match(device_id):
            if device_id != SERVER_CLIENT_CN:
                valid.append(device_id)
        else:
            log.warning("event=kick_skipped reason=bad_device_id device_id=%r", device_id)
    return sorted(set(valid))


class BrokerControl:
    """A connection as the server identity that asks the plugin to reload and to kick."""

    def __init__(self, layout: BrokerLayout, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.layout = layout
        self.timeout = timeout
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()  # one request at a time
        self._events: dict[str, threading.Event] = {}
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._suback: list[ReasonCode] = []
        self._stats: dict[str, dict[str, int]] = {}

    # -- connection --

    def _tls(self) -> ssl.SSLContext:
        paths = self.layout.ca
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(paths.root_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(paths.server_client_cert), str(paths.server_client_key))
        return context

    def _connect(self) -> mqtt.Client:
        if self._client is not None and self._connected.is_set():
            return self._client
        self.close()
        self._connected.clear()
        self._subscribed.clear()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{SERVER_CLIENT_CN}-control-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.tls_set_context(self._tls())
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        try:
            client.connect("127.0.0.1", self.layout.server_port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            client._reset_sockets()  # paho leaves its wake-up sockets to __del__ otherwise
            raise BrokerError(
                f"cannot reach the broker's server listener 127.0.0.1:"
                f"{self.layout.server_port}: {exc}"
            ) from None
        self._client = client
        client.loop_start()
        if not self._subscribed.wait(self.timeout):
            self.close()
            raise BrokerError("the broker did not accept the control connection in time")
        if any(code.is_failure for code in self._suback):
            self.close()
            raise BrokerError(
                f"the broker refused {RESPONSE_TOPIC} (is the provisioning_guard plugin loaded "
                "and acl-server current?)"
            )
        return client

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.warning("event=broker_control_refused reason=%s", rc)
            return
        self._connected.set()
        client.subscribe(RESPONSE_TOPIC, qos=0)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self._connected.clear()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        self._suback = list(codes)
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        verb, _, rest = message.payload.decode("ascii", "replace").partition(" ")
        token, *fields = rest.split(" ")
        if verb == "stats" and token in self._events:
            pairs = (field.partition("=") for field in fields)
            self._stats[token] = {k: int(v) for k, _, v in pairs if v.isdigit()}
        event = self._events.get(token) if verb == "done" else None
        if event is not None:
            event.set()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
            client._reset_sockets()

    # -- requests --

    def _send(self, lines: Sequence[str]) -> str:
        token = uuid.uuid4().hex[:16]
        event = threading.Event()
        self._events[token] = event
        try:
            client = self._connect()
            payload = "\n".join([f"token {token}", *lines]).encode()
            client.publish(CONTROL_TOPIC, payload, qos=1)
            if not event.wait(self.timeout):
                self.close()  # a fresh connection next time
                raise BrokerError(
                    f"the broker did not confirm a control request in {self.timeout} s"
                )
        finally:
            self._events.pop(token, None)
        return token

    def reload(self, kick: Iterable[str] = (), kick_birth: Iterable[str] = ()) -> float:
        """Reload conf, ACLs and CRLs, then disconnect the given devices' sessions.

        ``kick``: every session of those devices (operational and birth certificates);
        ``kick_birth``: their birth-certificate sessions only. Returns the seconds until
        the broker confirmed. Raises BrokerError if it cannot be reached or does not answer.
        """
        started = time.monotonic()
        lines = [f"kick {i}" for i in _valid_ids(kick)]
        lines += [f"kick-birth {i}" for i in _valid_ids(kick_birth)]
        with self._lock:
            self._send(["reload", *lines[:KICKS_PER_MESSAGE]])
            for start in range(KICKS_PER_MESSAGE, len(lines), KICKS_PER_MESSAGE):
                self._send(lines[start : start + KICKS_PER_MESSAGE])
        return time.monotonic() - started

    def update_rights(self, blocks: Mapping[str, Sequence[str]], kick: Iterable[str] = ()) -> float:
        """Replace these devices' rights in the broker at once, then cut ``kick``'s sessions.

        ``blocks``: clientId -> its ``topic <access> <topic>`` lines (``acl_rules`` renders
        and validates them; no lines = back to the baseline). The broker's file must
        already say the same (a reload re-reads it). Returns the seconds until confirmed.
        """
        started = time.monotonic()
        messages: list[list[str]] = [[]]
        size = 0
        for device_id in _valid_ids(blocks):
            block = [f"user {device_id}", *blocks[device_id]]
            block_size = sum(len(line) + 1 for line in block)
            if messages[-1] and size + block_size > RIGHTS_BYTES_PER_MESSAGE:
                messages.append([])
                size = 0
            messages[-1] += block
            size += block_size
        kicks = [f"kick {i}" for i in _valid_ids(kick)]
        with self._lock:
            for lines in messages[:-1]:
                self._send(lines)
            # The kicks after every block: a cut device reconnects to its new rights.
            self._send(messages[-1] + kicks[:KICKS_PER_MESSAGE])
            for start in range(KICKS_PER_MESSAGE, len(kicks), KICKS_PER_MESSAGE):
                self._send(kicks[start : start + KICKS_PER_MESSAGE])
        return time.monotonic() - started

    def stats(self) -> dict[str, int]:
        """The plugin's counters: ``loads`` (rights file reads: start and reloads),
        ``blocks`` (device entries replaced over MQTT), ``devices`` (entries now)."""
        with self._lock:
            token = self._send(["stats"])
        return self._stats.pop(token, {})

    def cut_sessions(self, device_ids: Iterable[str], *, birth_only: bool = False) -> None:
        """Disconnect every session of ``device_ids`` now, without a reload (no last will)."""
        verb = "kick-birth" if birth_only else "kick"
        lines = [f"{verb} {i}" for i in _valid_ids(device_ids)]
        with self._lock:
            for start in range(0, len(lines), KICKS_PER_MESSAGE):
                self._send(lines[start : start + KICKS_PER_MESSAGE])

    def __enter__(self) -> BrokerControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cut_device_sessions(
    layout: BrokerLayout, device_ids: Iterable[str], *, birth_only: bool = False
) -> None:
    """Disconnect every live session of ``device_ids`` (operational and birth, or birth only).

    Only a cut: to keep a device out, its certificates must also be revoked (written to
    ``certificate_revocations``), which the ACL sync turns into a CRL entry and a cut.
    """
    with BrokerControl(layout) as control:
        control.cut_sessions(device_ids, birth_only=birth_only)

"""``provision-server doctor``: is this backend fit to provision devices? One line per check.

Checks, in order: ``config`` (sanity of the values together), ``database`` (reachable),
``indexes`` (the web app's and ours), ``ca`` (validity horizons of the CA, broker and
server certificates), ``crl`` (nextUpdate horizons of the CRLs the broker loads),
``broker`` (a real MQTT connection with the server's identity) and ``broker-files``
(the ACL file and CRL agree with the database). Nothing is changed.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
import time
import uuid
from collections.abc import MutableMapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

import click
import paho.mqtt.client as mqtt
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from agent.health import (
    CheckResult,
    Outcome,
    failed,
    healthy,
    passed,
    render_json,
    render_text,
    warned,
)
from server.broker.acl_rules import render_operational_acl
from server.broker.acl_sync import read_broker_state
from server.broker.layout_file import load_layout
from server.broker.mosquitto_conf import BrokerLayout
from server.cli.state import config_option
from server.config import ServerConfig, load_server_config
from server.errors import ServerError
from server.pki.ca_files import CaPaths, load_cert
from server.store.db import Database
from server.store.schema import INDEXES

CA_WARN: Final = timedelta(days=90)
CRL_WARN: Final = timedelta(days=5)
BROKER_TIMEOUT_S: Final = 5.0
DATABASE_TIMEOUT_MS: Final = 2000


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _days(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 86400:.0f} days"


class ServerDoctor:
    """Runs the checks; ``now`` can be moved for tests of the validity horizons."""

    def __init__(
        self, config: ServerConfig, database: Database, now: datetime | None = None
    ) -> None:
        self.config = config
        self.database = database
        self.now = now or datetime.now(timezone.utc)
        self.layout: BrokerLayout | None = None

    def run(self) -> list[CheckResult]:
        results = [self._config()]
        database = self._database()
        results.append(database)
        if database.outcome != Outcome.FAIL:
            results.append(self._indexes())
        results += [self._ca(), self._crl(), self._broker()]
        if database.outcome != Outcome.FAIL and self.layout is not None:
            results.append(self._broker_files(self.layout))
        return results

    # --- config -----------------------------------------------------------------

    def _config(self) -> CheckResult:
        c = self.config
        problems: list[str] = []
        warnings: list[str] = []
        if not c.ca_dir.is_dir():
            problems.append(f"ca.dir {c.ca_dir} does not exist (run `provision-server ca init`)")
        if c.ca_passphrase_file is not None:
            try:
                mode = c.ca_passphrase_file.stat().st_mode & 0o777
                if mode & 0o077:
                    warnings.append(
                        f"ca.passphrase_file {c.ca_passphrase_file} has mode {mode:04o}: "
                        f"chmod 600 it"
                    )
            except OSError as exc:
                problems.append(f"ca.passphrase_file {c.ca_passphrase_file}: {exc.strerror}")
        if c.token_lifetime_s >= c.certificate_validity_days * 86400:
            problems.append("policy.token_lifetime_s is not shorter than the certificate validity")
        if c.offline_timeout_s <= c.status_write_interval_s:
            problems.append(
                "policy.offline_timeout_s must exceed policy.status_write_interval_s, or the "
                "sweep marks live devices OFFLINE between their heartbeat writes"
            )
        if c.metrics_port is not None and not is_loopback(c.metrics_host):
            warnings.append(
                f"metrics.host {c.metrics_host} is not loopback: /metrics has no authentication"
            )
        if c.broker_config_dir is None:
            warnings.append(
                "broker.config_dir is not set: ACL changes and revocations never reach the broker"
            )
        else:
            try:
                self.layout = load_layout(c.broker_config_dir)
            except ServerError as exc:
                problems.append(exc.message)
        if problems:
            return failed("config", "; ".join(problems))
        if warnings:
            return warned("config", "; ".join(warnings))
        return passed("config", "values are consistent")

    # --- database ------------------------------------------------------------------

    def _database(self) -> CheckResult:
        started = time.monotonic()
        try:
            self.database.ping()
        except ServerError as exc:
            return failed("database", exc.message)
        ms = (time.monotonic() - started) * 1000
        return passed("database", f"{self.database.safe_uri} answers ({ms:.0f} ms)")

    def _index_information(self, collection: str) -> MutableMapping[str, Any]:
        def read() -> MutableMapping[str, Any]:
            return self.database.collection(collection).index_information()

        return self.database.call(read)

    def _indexes(self) -> CheckResult:
        missing: list[str] = []
        wrong: list[str] = []
        try:
            # One listing per collection (each may be on a busy database).
            listings = {
                name: self._index_information(name)
                for name in dict.fromkeys(spec.collection for spec in INDEXES)
            }
            for spec in INDEXES:
                info = listings[spec.collection]
                found = [
                    bool(index.get("unique", False))
                    for index in info.values()
                    if [key for key, _ in index["key"]] == list(spec.keys)
                ]
                if not found:
                    missing.append(spec.label)
                elif spec.unique not in found:
                    wrong.append(spec.label)
        except ServerError as exc:
            return failed("indexes", exc.message)
        if wrong:
            return failed(
                "indexes", f"wrong uniqueness on {', '.join(wrong)}: fix by hand (never dropped)"
            )
        if missing:
            return failed(
                "indexes", f"missing {', '.join(missing)}: run `provision-server db init`"
            )
        return passed("indexes", f"all {len(INDEXES)} indexes present")

    # --- PKI -----------------------------------------------------------------------

    def _ca(self) -> CheckResult:
        paths = CaPaths.of(self.config.ca_dir)
        horizons: list[tuple[str, datetime]] = []
        try:
            for name, path in (
                ("device CA", paths.device_ca_cert),
                ("factory CA", paths.factory_ca_cert),
                ("root", paths.root_cert),
                ("broker certificate", paths.broker_cert),
                ("server identity", paths.server_client_cert),
            ):
                horizons.append((name, load_cert(path).not_valid_after_utc))
        except ServerError as exc:
            return failed("ca", exc.message)
        expired = [f"{n} expired on {_iso(t)}" for n, t in horizons if t <= self.now]
        if expired:
            return failed("ca", "; ".join(expired) + ": renew the CA material")
        soon = [
            f"{n} expires in {_days(t - self.now)} ({_iso(t)})"
            for n, t in horizons
            if t - self.now < CA_WARN
        ]
        if soon:
            return warned("ca", "; ".join(soon) + ": plan the renewal")
        name, first = min(horizons, key=lambda h: h[1])
        return passed("ca", f"first to expire: {name} in {_days(first - self.now)}")

    def _crl(self) -> CheckResult:
        if self.layout is None:
            return warned("crl", "no broker.config_dir: no CRL is kept for the broker")
        horizons: list[tuple[str, datetime]] = []
        for name, path in (
            ("device", self.layout.crl_path),
            ("factory", self.layout.factory_crl_path),
        ):
            try:
                crl = x509.load_pem_x509_crl(path.read_bytes())
            except (OSError, ValueError) as exc:
                return failed("crl", f"cannot read the {name} CRL {path}: {exc}")
            if crl.next_update_utc is None:
                return failed("crl", f"the {name} CRL {path} has no nextUpdate")
            horizons.append((name, crl.next_update_utc))
        late = [f"{n} CRL nextUpdate passed on {_iso(t)}" for n, t in horizons if t <= self.now]
        if late:
            return failed(
                "crl",
                "; ".join(late) + ": the broker refuses every client of that listener; "
                "start `provision-server run` with broker.config_dir to refresh it",
            )
        soon = [
            f"{n} CRL nextUpdate in {_days(t - self.now)}"
            for n, t in horizons
            if t - self.now < CRL_WARN
        ]
        if soon:
            return warned("crl", "; ".join(soon) + ": is the ACL/CRL sync running?")
        return passed(
            "crl", ", ".join(f"{n} CRL valid for {_days(t - self.now)}" for n, t in horizons)
        )

    # --- broker --------------------------------------------------------------------

    def _broker(self) -> CheckResult:
        c = self.config
        where = f"{c.broker_host}:{c.broker_port}"
        try:
            context = _server_tls_context(CaPaths.of(c.ca_dir))
        except (OSError, ssl.SSLError) as exc:
            return failed("broker", f"cannot load the server identity from {c.ca_dir}: {exc}")
        done = threading.Event()
        outcome: list[str] = []

        def on_connect(client: mqtt.Client, userdata: object, flags: object, reason: object,
                       properties: object) -> None:  # fmt: skip
            outcome.append(str(reason))
            done.set()

        def on_disconnect(*args: object) -> None:
            done.set()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"provisioning-server-doctor-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        client.tls_set_context(context)
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        try:
            client.connect(c.broker_host, c.broker_port, keepalive=10)
        except OSError as exc:
            client._reset_sockets()
            return failed("broker", f"cannot connect to {where}: {exc}; is Mosquitto running?")
        client.loop_start()
        try:
            done.wait(BROKER_TIMEOUT_S)
            client.disconnect()
        finally:
            client.loop_stop()
            # paho closes its wake-up socket pair only in __del__ (see mqtt_transport.stop).
            client._reset_sockets()
        if outcome == ["Success"]:
            return passed("broker", f"{where} accepts the server identity (MQTT v5 over TLS)")
        reason = outcome[0] if outcome else "no CONNACK (TLS refused or timed out)"
        return failed(
            "broker",
            f"{where} refused the server identity: {reason}; check broker.host/port and "
            "that the broker trusts this CA",
        )

    def _broker_files(self, layout: BrokerLayout) -> CheckResult:
        try:
            state = read_broker_state(self.database)
        except ServerError as exc:
            return failed("broker-files", exc.message)
        stale: list[str] = []
        expected_acl = render_operational_acl(state.acl_docs, state.revoked_device_ids)
        try:
            if layout.acl_operational.read_text() != expected_acl:
                stale.append(f"{layout.acl_operational} differs from device_acls")
            crl = x509.load_pem_x509_crl(layout.crl_path.read_bytes())
        except (OSError, ValueError) as exc:
            return failed("broker-files", f"cannot read the broker's files: {exc}")
        listed = frozenset(entry.serial_number for entry in crl)
        if listed != state.serial_set:
            stale.append(
                f"{layout.crl_path} lists {len(listed)} serial(s), the database "
                f"{len(state.serial_set)}"
            )
        if stale:
            return failed(
                "broker-files",
                "; ".join(stale) + ": is `provision-server run` with broker.config_dir running?",
            )
        return passed(
            "broker-files",
            f"ACL ({len(state.acl_docs)} device(s)) and CRL ({len(listed)} serial(s)) match the "
            "database",
        )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _server_tls_context(paths: CaPaths) -> ssl.SSLContext:
    """The server's own MQTT identity, trusting only our root (as the transport does)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(paths.root_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(paths.server_client_cert), str(paths.server_client_key))
    return context


def diagnose(config: ServerConfig, now: datetime | None = None) -> list[CheckResult]:
    """Every check for ``config`` (the database from its ``database.uri``)."""
    try:
        database = Database(config.mongodb_uri, timeout_ms=DATABASE_TIMEOUT_MS)
    except ServerError as exc:
        return [failed("config", exc.message)]
    try:
        return ServerDoctor(config, database, now).run()
    finally:
        database.close()


@click.command("doctor")
@config_option("the one `run` uses")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_context
def doctor_command(ctx: click.Context, config_path: Path | None, as_json: bool) -> None:
    """Check config, database and indexes, CA and CRL horizons, the broker, and
    that the broker's ACL and CRL files match the database.

    One line per check (pass, warn or fail, and what to do); exit 1 if any failed.
    """
    root = ctx.find_root()
    explicit_uri = root.params.get("mongodb_uri")
    default_uri = root.command.params[0].default if root.command.params else None
    try:
        config = load_server_config(
            config_path, mongodb_uri=explicit_uri if explicit_uri != default_uri else None
        )
    except ServerError as exc:
        results = [failed("config", exc.message)]
    else:
        results = diagnose(config)
    click.echo(render_json(results) if as_json else render_text(results))
    raise SystemExit(0 if healthy(results) else 1)

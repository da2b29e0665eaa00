"""Prometheus metrics of ``provision-server run --metrics-port PORT``, in one place.

Two kinds of instrumentation keep the service code nearly free of it:

* events reported as they happen (a request answered, a certificate signed, a
  database command): ``ServerMetrics`` methods called from a few hooks;
* state the running objects already hold (queue depths, the broker connection,
  status batches, ACL/CRL sync progress, CA and CRL validity): read when Prometheus
  scrapes, by ``_StateCollector``, so nothing has to push it. The objects are seen
  through the small protocols below, so this module imports none of them.

Validity horizons are Unix timestamps (``..._timestamp_seconds``, the Prometheus
convention); rules and dashboards subtract ``time()`` (docs/metrics.md). Every
metric lives in the ``ServerMetrics``' own registry, never the global one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol
from wsgiref.simple_server import WSGIServer

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pymongo import monitoring

from server.errors import ServerError
from server.pki.ca import CertificateAuthority

log = logging.getLogger("provision.server")

PREFIX: Final = "provision"
REQUEST_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DB_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class TransportState(Protocol):
    @property
    def connected(self) -> bool: ...

    def queue_depths(self) -> Mapping[str, int]: ...


class StatusWriterState(Protocol):
    @property
    def batches(self) -> int: ...

    @property
    def written(self) -> int: ...

    def pending_count(self) -> int: ...


class SyncState(Protocol):
    @property
    def syncs(self) -> int: ...

    @property
    def reloads(self) -> int: ...

    @property
    def rights_updates(self) -> int: ...

    @property
    def kicked(self) -> int: ...

    @property
    def failures(self) -> int: ...

    @property
    def last_success(self) -> float | None: ...

    def lag_seconds(self) -> float: ...


class GroupCommitState(Protocol):
    @property
    def batches(self) -> int: ...

    @property
    def operations(self) -> int: ...


class DatabaseState(Protocol):
    @property
    def group(self) -> GroupCommitState | None: ...


class ServerMetrics:
    """The metrics of one server process; thread-safe (prometheus_client is)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Device requests answered, by operation and result (ok or the error code).",
            ["op", "result"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time to handle one device request (parse, checks, database, signing).",
            ["op"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.db_seconds = Histogram(
            f"{PREFIX}_db_command_duration_seconds",
            "MongoDB command round trips by command name (pymongo command monitoring).",
            ["command"],
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.db_errors = Counter(
            f"{PREFIX}_db_command_errors",
            "MongoDB commands that failed (server error or lost connection).",
            ["command"],
            registry=r,
        )
        self.issued = Counter(
            f"{PREFIX}_certificates_issued",
            "Operational certificates this process signed: first, reprovision, renewal.",
            ["kind"],
            registry=r,
        )
        self.signing_failures = Counter(
            f"{PREFIX}_signing_failures",
            "Certificate signings that raised (CA key, passphrase, builder).",
            registry=r,
        )
        self.state = _StateCollector()
        r.register(self.state)

    # --- events ------------------------------------------------------------------

    def request(self, op: str, result: str, seconds: float) -> None:
        """One answered request; ``result`` is ``ok`` or the protocol error code.

        ``op`` is one of the protocol's operations (the parser admits no other), or
        ``?`` for a payload too broken to name one: exported as ``unparsed``.
        """
        op = "unparsed" if op == "?" else op
        self.requests.labels(op, result).inc()
        self.request_seconds.labels(op).observe(seconds)

    def certificate_issued(self, kind: str) -> None:
        self.issued.labels(kind).inc()

    def signing_failed(self) -> None:
        self.signing_failures.inc()

    def command_listener(self) -> monitoring.CommandListener:
        """A pymongo listener for the server's MongoClient (``event_listeners``)."""
        return _CommandTimer(self)

    # --- exposition ------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsEndpoint:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread until ``close()``."""
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ServerError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                "choose another --metrics-port"
            ) from None
        endpoint = MetricsEndpoint(server, thread, host, port)
        log.info("event=metrics url=%s", endpoint.url)
        return endpoint


@dataclass
class MetricsEndpoint:
    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _CommandTimer(monitoring.CommandListener):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.metrics.db_seconds.labels(event.command_name).observe(event.duration_micros / 1e6)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.metrics.db_seconds.labels(event.command_name).observe(event.duration_micros / 1e6)
        self.metrics.db_errors.labels(event.command_name).inc()


class CrlFile:
    """A CRL file's nextUpdate and entry count, parsed again only when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int] | None = None
        self.next_update: float | None = None
        self.entries = 0

    def refresh(self) -> bool:
        """True when the file could be read (the values are current)."""
        try:
            st = self.path.stat()
            key = (st.st_mtime_ns, st.st_size)
            if key != self._seen:
                crl = x509.load_pem_x509_crl(self.path.read_bytes())
                update = crl.next_update_utc
                self.next_update = update.timestamp() if update else None
                self.entries = len(crl)
                self._seen = key
        except (OSError, ValueError):
            return False
        return True


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc)
    family.add_metric([], value)
    return family


class _StateCollector(Collector):
    """Reads the running objects' own counters and state on every scrape."""

    def __init__(self) -> None:
        self.transport: TransportState | None = None
        self.database: DatabaseState | None = None
        self.status_writer: StatusWriterState | None = None
        self.sync: SyncState | None = None
        self.ca: CertificateAuthority | None = None
        self.crls: dict[str, CrlFile] = {}

    def collect(self) -> Iterator[Metric]:
        yield from self._transport()
        yield from self._group_commit()
        yield from self._status()
        yield from self._sync()
        yield from self._pki()

    def _transport(self) -> Iterator[Metric]:
        if self.transport is None:
            return
        depth = _gauge("queue_depth", "Accepted messages waiting for a worker.", ["queue"])
        for name, size in self.transport.queue_depths().items():
            depth.add_metric([name], size)
        yield depth
        connected = _gauge("broker_connected", "1 while the MQTT session to the broker is up.")
        connected.add_metric([], 1.0 if self.transport.connected else 0.0)
        yield connected

    def _group_commit(self) -> Iterator[Metric]:
        group = self.database.group if self.database is not None else None
        if group is None:
            return
        yield _counter(
            "db_group_commit_batches", "Database round trips shared by requests in flight.",
            group.batches,
        )  # fmt: skip
        yield _counter(
            "db_group_commit_operations", "Operations sent in those shared round trips.",
            group.operations,
        )  # fmt: skip

    def _status(self) -> Iterator[Metric]:
        writer = self.status_writer
        if writer is None:
            return
        yield _counter("status_batches", "Bulk writes of device statuses.", writer.batches)
        yield _counter(
            "status_batch_devices", "Device status changes written in batches.", writer.written
        )
        pending = _gauge("status_pending", "Device status changes waiting for the next batch.")
        pending.add_metric([], writer.pending_count())
        yield pending

    def _sync(self) -> Iterator[Metric]:
        sync = self.sync
        if sync is None:
            return
        lag = _gauge(
            "broker_sync_lag_seconds",
            "Age of the oldest database change not yet in the broker's ACL/CRL files "
            "(the last change's time to apply when none is pending).",
        )
        lag.add_metric([], sync.lag_seconds())
        yield lag
        last = _gauge(
            "broker_sync_last_success_timestamp_seconds",
            "When the ACL/CRL files were last brought in step with the database.",
        )
        if sync.last_success is not None:
            last.add_metric([], sync.last_success)
        yield last
        yield _counter("broker_syncs", "ACL/CRL synchronisations completed.", sync.syncs)
        yield _counter("broker_reloads", "Broker reloads after a file changed.", sync.reloads)
        yield _counter(
            "broker_rights_updates",
            "Device rights changed in the broker's table over MQTT, without a reload.",
            sync.rights_updates,
        )
        yield _counter(
            "broker_sessions_cut",
            "Device session cuts asked of the broker (revocations, by any process or the CLI).",
            sync.kicked,
        )
        yield _counter("broker_sync_failures", "ACL/CRL synchronisations failed.", sync.failures)

    def _pki(self) -> Iterator[Metric]:
        if self.ca is not None:
            expiry = _gauge(
                "ca_not_after_timestamp_seconds", "When each CA certificate expires.", ["ca"]
            )
            for name, cert in (
                ("root", self.ca.root),
                ("device", self.ca.device_ca),
                ("factory", self.ca.factory_ca),
            ):
                expiry.add_metric([name], cert.not_valid_after_utc.timestamp())
            yield expiry
        if self.crls:
            next_update = _gauge(
                "crl_next_update_timestamp_seconds",
                "nextUpdate of the CRL the broker loads; past it every client is refused.",
                ["issuer"],
            )
            revoked = _gauge("crl_revoked_certificates", "Serials listed in the CRL.", ["issuer"])
            for issuer, crl in self.crls.items():
                if crl.refresh() and crl.next_update is not None:
                    next_update.add_metric([issuer], crl.next_update)
                    revoked.add_metric([issuer], crl.entries)
            yield next_update
            yield revoked

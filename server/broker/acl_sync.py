"""Keep the broker's ACL file and CRLs in step with MongoDB, and cut revoked sessions.

``AclSync`` mirrors ``device_acls``, ``device_certificates`` and ``certificate_revocations``
in memory (``FleetState``), writes the broker's files when they change, and brings the
broker's provisioning_guard plugin up to date over MQTT (``BrokerUpdater``): changed
devices' rights without a reload, a reload when a CRL changed, the sessions of every device
whose certificate was just revoked cut. It notices writes by anybody (the web app's too):

* with a change stream (``db.watch``) where the server offers one (secantusdb, a replica
  set, Atlas): the changed ``_id``s are re-read (no rescan); a batch closes
  ``BATCH_WINDOW_S`` after its first change however many follow, so a stream of writes
  cannot postpone a sync (the old "drain until empty" starved for 78 s under load);
* otherwise (standalone mongod) by polling a cheap fingerprint every ``interval``
  (counts, newest ``last_updated``); an edit that does not touch ``last_updated`` is
  picked up by the full resync every ``full_resync`` seconds (change streams do one too).

The CRLs are rebuilt when their serials change and every ``crl_refresh`` (default 1 day)
although nothing changed, because OpenSSL refuses EVERY client of the listener once the
CRL's nextUpdate (``crl_validity``, default 7 days) has passed. Revocations whose
document says ``"kind": "birth"`` go on the factory CRL (provisioning listener).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

import pymongo
import pymongo.errors
from pymongo.change_stream import DatabaseChangeStream

from server.broker.broker_assets import install_broker_assets
from server.broker.broker_control import BrokerControl
from server.broker.broker_crls import CrlFile, enforced_now
from server.broker.broker_update import BrokerUpdater
from server.broker.fleet_state import WATCHED, Cuts, FleetState
from server.broker.fleet_state import parse_serial as parse_serial  # re-exported
from server.broker.mosquitto_conf import BrokerLayout, update_broker_files
from server.errors import ServerError
from server.pki.ca import CertificateAuthority
from server.store.db import Database, Document
from server.store.schema import (
    CERTIFICATE_REVOCATIONS,
    DEVICE_ACLS,
    DEVICE_CERTIFICATES,
    CertificateStatus,
)

log = logging.getLogger(__name__)

DEFAULT_CRL_VALIDITY: Final = timedelta(days=7)
DEFAULT_CRL_REFRESH: Final = timedelta(days=1)
BATCH_WINDOW_S: Final = 0.05
"""How long a batch stays open after its first change (bounded: changes keep coming)."""
MAX_BATCH: Final = 5000
STREAM_WAIT_MS: Final = 100
"""The change stream's longest wait for a change (keeps batches and stop() prompt)."""


@dataclass(frozen=True)
class BrokerState:
    """What the broker's files are generated from (a full read; see FleetState)."""

    acl_docs: tuple[Document, ...]
    revoked_device_ids: frozenset[str]
    revoked_serials: tuple[tuple[int, datetime], ...]
    birth_serials: tuple[tuple[int, datetime], ...] = ()

    @property
    def serial_set(self) -> frozenset[int]:
        return frozenset(serial for serial, _ in self.revoked_serials)

    def crl_pem(
        self, ca: CertificateAuthority, validity: timedelta = DEFAULT_CRL_VALIDITY
    ) -> bytes:
        return ca.build_crl(self.revoked_serials, validity)

    def factory_crl_pem(
        self, ca: CertificateAuthority, validity: timedelta = DEFAULT_CRL_VALIDITY
    ) -> bytes:
        return ca.build_crl(self.birth_serials, validity, issuer="factory")


def read_broker_state(database: Database) -> BrokerState:
    """Read the three collections (raises DatabaseUnavailable when MongoDB is away)."""
    fleet = FleetState.load(database)
    return BrokerState(
        tuple(fleet.acl_docs.values()),
        fleet.revoked_device_ids,
        tuple(sorted(fleet.serials(birth=False).items())),
        tuple(sorted(fleet.serials(birth=True).items())),
    )


class AclSync:
    """Background thread that keeps the broker's ACL file and CRLs current and cuts sessions."""

    def __init__(
        self,
        database: Database,
        ca: CertificateAuthority,
        layout: BrokerLayout,
        interval: float = 1.0,
        *,
        full_resync: float = 60.0,
        crl_validity: timedelta = DEFAULT_CRL_VALIDITY,
        crl_refresh: timedelta = DEFAULT_CRL_REFRESH,
        use_change_streams: bool = True,
        control: BrokerControl | None = None,
    ) -> None:
        if crl_refresh >= crl_validity:
            raise ServerError("crl_refresh must be shorter than crl_validity")
        self.database = database
        self.ca = ca
        self.layout = layout
        self.interval = interval
        self.full_resync = full_resync
        self.crl_validity = crl_validity
        self.crl_refresh = crl_refresh
        self.use_change_streams = use_change_streams
        self.control = control or BrokerControl(layout)
        self.mode = "idle"
        """``change_stream`` or ``polling`` once running (for logs and tests)."""
        self.syncs = 0
        self.updater = BrokerUpdater(layout, self.control)
        self.failures = 0
        self.last_success: float | None = None
        """Wall-clock time of the last completed sync (for the metrics)."""
        self.last_apply_s = 0.0
        """Seconds from the first change of the last batch until the broker confirmed it."""
        self._pending_since: float | None = None  # wall clock: the change's own time
        self._last_lag = 0.0
        self.fleet: FleetState | None = None
        self._crl = CrlFile(layout.crl_path, "device")
        self._factory_crl = CrlFile(layout.factory_crl_path, "factory")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def reloads(self) -> int:
        """Broker reloads (a CRL or the configuration changed, or recovery)."""
        return self.updater.reloads

    @property
    def rights_updates(self) -> int:
        """Device rights changed over MQTT without a reload."""
        return self.updater.rights_updates

    @property
    def kicked(self) -> int:
        return self.updater.kicked

    # -- one synchronisation --

    def sync_now(self) -> bool:
        """Read everything, write the files, reload if one changed; True if one changed.

        Compared with the previous full read (if any), newly revoked devices are cut.
        """
        with self._lock:
            pending = self._pending_since
            before = self.fleet
            self.fleet = FleetState.load(self.database)
            # A full pass checks the CRL files themselves again (someone may have rewritten
            # them); between full passes what was written is known.
            self._crl.forget()
            self._factory_crl.forget()
            if before is not None:
                cuts = self.fleet.changes_since(before)
            else:
                cuts = self.fleet.changes_since_files(*enforced_now(self.layout))
            changed = self._apply(cuts)
            self._completed(pending)
            return changed

    def _apply_changes(self, dirty: dict[str, set[Any]], first_change: float) -> None:
        with self._lock:
            pending = self._pending_since
            if self.fleet is None:
                self.fleet = FleetState.load(self.database)
                cuts = Cuts()
            else:
                cuts = self.fleet.refresh(self.database, dirty)
            self._apply(cuts)
            self._completed(pending)
            self.last_apply_s = time.monotonic() - first_change

    def _completed(self, pending: float | None) -> None:
        if pending is not None:
            self._last_lag = max(0.0, time.time() - pending)
            if self._pending_since == pending:
                self._pending_since = None
        self.last_success = time.time()

    def note_change(self, written_at: object = None) -> None:
        """A database change was seen: the lag runs until a sync completes after it.

        ``written_at`` is the change event's ``wallTime`` (when the database applied it);
        without one (polling), the lag starts now.
        """
        if isinstance(written_at, datetime):
            aware = written_at if written_at.tzinfo else written_at.replace(tzinfo=timezone.utc)
            seen = min(aware.timestamp(), time.time())
        else:
            seen = time.time()
        if self._pending_since is None or seen < self._pending_since:
            self._pending_since = seen

    def lag_seconds(self) -> float:
        """How long the oldest change seen is waiting, else how long the last one took."""
        pending = self._pending_since
        return max(0.0, time.time() - pending) if pending is not None else self._last_lag

    def _write(self, fleet: FleetState, *, crls: bool) -> frozenset[Path]:
        """Conf and ACLs, and with ``crls`` the CRLs (50,000 serials take 0.4 s to sign)."""
        try:
            return update_broker_files(
                self.layout, (), (),
                self._crl.needed(self.ca, fleet.serials(birth=False), self.crl_validity,
                                 self.crl_refresh) if crls else None,
                self._factory_crl.needed(self.ca, fleet.serials(birth=True), self.crl_validity,
                                         self.crl_refresh) if crls else None,
                operational_acl=fleet.operational_acl(),
            )  # fmt: skip
        except BaseException:
            self._crl.forget()
            self._factory_crl.forget()
            # Files written before the failure (a CRL?) look unchanged next time: reload then.
            self.updater.require_reload()
            raise

    def _apply(self, cuts: Cuts) -> bool:
        """Write what changed, then bring the broker to it: files first (a broker that
        restarts or reloads meanwhile reads them), rights before the CRLs (a device whose
        current certificate was just revoked is cut with its deny block before its CRL is
        even signed; the reload then refuses its handshake)."""
        fleet = self.fleet
        assert fleet is not None
        paths = (self.layout.crl_path, self.layout.factory_crl_path)
        crls_first = not all(path.exists() for path in paths)
        changed = self._write(fleet, crls=crls_first)
        self.syncs += 1
        applied = self.updater.apply(
            fleet.device_blocks(), changed, cuts, then=lambda: self._write(fleet, crls=True)
        )
        if applied.rights or applied.reload_s is not None or applied.cut or applied.cut_birth:
            log.info(
                "event=acl_sync_applied devices=%d revoked_devices=%d rights=%d cut=%s "
                "cut_birth=%s reload_s=%s",
                len(fleet.acl_docs), len(fleet.revoked_device_ids), applied.rights,
                ",".join(sorted(applied.cut)) or "-", ",".join(sorted(applied.cut_birth)) or "-",
                "-" if applied.reload_s is None else f"{applied.reload_s:.3f}",
            )  # fmt: skip
        return bool(changed | applied.written)

    # -- the thread --

    def start(self) -> AclSync:
        if self._thread is not None:
            raise ServerError("AclSync already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="acl-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.control.close()
        self.mode = "idle"

    def __enter__(self) -> AclSync:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        stream_allowed = self.use_change_streams
        assets_copied = False
        while not self._stop.is_set():
            stream: DatabaseChangeStream[Document] | None = None
            try:
                if not assets_copied:
                    # A re-issued broker certificate reaches the broker's copies.
                    install_broker_assets(self.layout)
                    assets_copied = True
                # Open the stream before syncing, so no change falls between the two.
                if stream_allowed:
                    stream = self._open_stream()
                    if stream is None:
                        stream_allowed = False
                self.mode = "change_stream" if stream is not None else "polling"
                seen = self._fingerprint() if stream is None else None
                self.sync_now()
                if stream is not None:
                    self._follow_stream(stream)
                else:
                    self._poll(seen)
            except (ServerError, pymongo.errors.PyMongoError, OSError) as exc:
                self.failures += 1
                log.warning("event=acl_sync_failed error=%s retry_in=%.1f", exc, self.interval)
                self._stop.wait(self.interval)
            finally:
                if stream is not None:
                    with contextlib.suppress(pymongo.errors.PyMongoError):
                        stream.close()

    def _open_stream(self) -> DatabaseChangeStream[Document] | None:
        pipeline = [{"$match": {"ns.coll": {"$in": list(WATCHED)}}}]
        try:
            return self.database.call(
                lambda: self.database.db.watch(pipeline, max_await_time_ms=STREAM_WAIT_MS)
            )
        except pymongo.errors.OperationFailure as exc:
            # A standalone mongod: "$changeStream stage is only supported on replica sets".
            log.info("event=acl_sync_polling reason=%s", exc.details or exc)
            return None

    def _follow_stream(self, stream: DatabaseChangeStream[Document]) -> None:
        """Apply changes batch by batch; return when the full resync is due.

        A batch closes BATCH_WINDOW_S after its first change (or at MAX_BATCH), whatever
        keeps arriving: the latency is bounded by the window plus one apply, never by
        the write rate. Changes arriving during an apply wait in the stream for the next.
        """
        deadline = time.monotonic() + self.full_resync
        while not self._stop.is_set() and time.monotonic() < deadline:
            change = stream.try_next()
            if change is None:
                continue
            first_change = time.monotonic()
            self.note_change(change.get("wallTime"))
            dirty: dict[str, set[Any]] = defaultdict(set)
            full = not self._note(dirty, change)
            count = 1
            while (
                not full
                and count < MAX_BATCH
                and time.monotonic() - first_change < BATCH_WINDOW_S
                and not self._stop.is_set()
            ):
                change = stream.try_next()
                if change is None:
                    break
                full = not self._note(dirty, change)
                count += 1
            if full:
                return  # a dropped collection or an invalidated stream: read everything
            self._apply_changes(dirty, first_change)

    @staticmethod
    def _note(dirty: dict[str, set[Any]], change: Document) -> bool:
        """Record the changed document; False for events that need a full read."""
        collection = (change.get("ns") or {}).get("coll")
        key = (change.get("documentKey") or {}).get("_id")
        operation = change.get("operationType")
        if operation in ("insert", "update", "replace", "delete") and key is not None:
            if collection in WATCHED:
                dirty[collection].add(key)
            return True
        return False

    def _fingerprint(self) -> tuple[object, ...]:
        def read() -> tuple[object, ...]:
            acls = self.database.collection(DEVICE_ACLS)
            newest = acls.find_one(
                {}, {"_id": 0, "last_updated": 1}, sort=[("last_updated", pymongo.DESCENDING)]
            )
            return (
                acls.count_documents({}),
                newest.get("last_updated") if newest else None,
                self.database.collection(DEVICE_CERTIFICATES).count_documents(
                    {"status": CertificateStatus.REVOKED.value}
                ),
                self.database.collection(CERTIFICATE_REVOCATIONS).count_documents({}),
            )

        return self.database.call(read)

    def _poll(self, seen: tuple[object, ...] | None) -> None:
        """Return when the fingerprint differs from ``seen`` or the full resync is due."""
        deadline = time.monotonic() + self.full_resync
        while not self._stop.wait(self.interval):
            if time.monotonic() >= deadline:
                return
            current = self._fingerprint()
            if current != seen:
                self.note_change()
                return

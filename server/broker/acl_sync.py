"""Keep the broker's ACL files and CRL in step with MongoDB.

``AclSync`` regenerates the files from ``device_acls``, ``device_certificates`` and
``certificate_revocations`` and SIGHUPs Mosquitto when a file changed. It notices
changes written by anybody (the web app writes ``device_acls`` directly):

* with a change stream (``db.watch``) where the server offers one (secantusdb, a replica
  set, Atlas): a change is applied within about ``interval`` seconds;
* otherwise (standalone mongod) by polling a cheap fingerprint every ``interval``
  (counts, newest ``last_updated``) - an edit that does not touch ``last_updated``
  is picked up by the full resync every ``full_resync`` seconds.

The CRL is rebuilt when the set of revoked serials changes and every ``crl_refresh``
(default 1 day) although nothing changed, because OpenSSL refuses EVERY client of the
listener once the CRL's nextUpdate (``crl_validity``, default 7 days) has passed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

import pymongo
import pymongo.errors
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pymongo.change_stream import DatabaseChangeStream

from server.broker.mosquitto_conf import BrokerLayout, reload_broker, write_broker_files
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

WATCHED: Final = (DEVICE_ACLS, DEVICE_CERTIFICATES, CERTIFICATE_REVOCATIONS)
DEFAULT_CRL_VALIDITY: Final = timedelta(days=7)
DEFAULT_CRL_REFRESH: Final = timedelta(days=1)


def parse_serial(value: object) -> int | None:
    """A revocation's ``serial``: hex string (``certificateSerial`` spelling, colons ok) or int."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str):
        text = value.replace(":", "").strip()
        try:
            number = int(text, 16)
        except ValueError:
            return None
        return number if number > 0 else None
    return None


@dataclass(frozen=True)
class BrokerState:
    """What the broker's files are generated from."""

    acl_docs: tuple[Document, ...]
    revoked_device_ids: frozenset[str]
    revoked_serials: tuple[tuple[int, datetime], ...]

    @property
    def serial_set(self) -> frozenset[int]:
        return frozenset(serial for serial, _ in self.revoked_serials)

    def crl_pem(
        self, ca: CertificateAuthority, validity: timedelta = DEFAULT_CRL_VALIDITY
    ) -> bytes:
        return ca.build_crl(self.revoked_serials, validity)


def read_broker_state(database: Database) -> BrokerState:
    """Read the three collections (raises DatabaseUnavailable when MongoDB is away)."""

    def read() -> BrokerState:
        acls = tuple(
            database.collection(DEVICE_ACLS).find(
                {}, {"_id": 0, "device_id": 1, "tier": 1, "rules": 1}
            )
        )
        revoked_ids = frozenset(
            doc["device_id"]
            for doc in database.collection(DEVICE_CERTIFICATES).find(
                {"status": CertificateStatus.REVOKED.value}, {"_id": 0, "device_id": 1}
            )
            if isinstance(doc.get("device_id"), str)
        )
        serials: dict[int, datetime] = {}
        for doc in database.collection(CERTIFICATE_REVOCATIONS).find({}, {"_id": 0}):
            serial = parse_serial(doc.get("serial"))
            if serial is None:
                log.warning(
                    "event=revocation_skipped reason=bad_serial serial=%r", doc.get("serial")
                )
                continue
            serials[serial] = _revocation_date(doc)
        return BrokerState(acls, revoked_ids, tuple(sorted(serials.items())))

    return database.call(read)


def _revocation_date(doc: Mapping[str, Any]) -> datetime:
    for key in ("revoked_at", "created_at"):
        value = doc.get(key)
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.now(timezone.utc)


class AclSync:
    """Background thread that keeps the broker's ACL files and CRL up to date."""

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
        self.mode = "idle"
        """``change_stream`` or ``polling`` once running (for logs and tests)."""
        self.syncs = 0
        self.reloads = 0
        self.failures = 0
        self.last_success: float | None = None
        """Wall-clock time of the last completed sync (for the metrics)."""
        self._pending_since: float | None = None  # wall clock: the change's own time
        self._last_lag = 0.0
        self._lock = threading.Lock()
        self._reload_pending = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one synchronisation --

    def sync_now(self) -> bool:
        """Regenerate the files now; SIGHUP the broker if one changed. True if changed."""
        with self._lock:
            pending = self._pending_since
            state = read_broker_state(self.database)
            changed = write_broker_files(
                self.layout,
                state.acl_docs,
                state.revoked_device_ids,
                self._crl_if_needed(state),
                self._factory_crl_if_needed(),
            )
            self.syncs += 1
            if changed or self._reload_pending:
                # Stays pending if the SIGHUP fails, so the next sync retries it although
                # the files no longer change.
                self._reload_pending = True
                reload_broker(self.layout)
                self._reload_pending = False
                self.reloads += 1
                log.info(
                    "event=acl_sync_applied devices=%d revoked_devices=%d revoked_serials=%d",
                    len(state.acl_docs), len(state.revoked_device_ids), len(state.revoked_serials),
                )  # fmt: skip
            if pending is not None:
                self._last_lag = max(0.0, time.time() - pending)
                self._pending_since = None
            self.last_success = time.time()
            return changed

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

    def _crl_if_needed(self, state: BrokerState) -> bytes | None:
        """A new device CRL if the revoked set changed or the current one is due; else None."""
        if self._crl_is_current(self.layout.crl_path, self.ca.device_ca, state.serial_set):
            return None
        return state.crl_pem(self.ca, self.crl_validity)

    def _factory_crl_if_needed(self) -> bytes | None:
        """The factory CRL lists nothing (no birth revocations yet) but must stay fresh."""
        if self._crl_is_current(self.layout.factory_crl_path, self.ca.factory_ca, frozenset()):
            return None
        return self.ca.build_crl([], self.crl_validity, issuer="factory")

    def _crl_is_current(
        self, path: Path, issuer: x509.Certificate, serials: frozenset[int]
    ) -> bool:
        """True if ``path`` is a CRL of ``issuer`` listing ``serials`` and not yet due."""
        try:
            crl = x509.load_pem_x509_crl(path.read_bytes())
        except (OSError, ValueError):
            return False
        issuer_key = issuer.public_key()
        if not isinstance(issuer_key, ec.EllipticCurvePublicKey):
            return False
        if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer_key):
            return False
        next_update = crl.next_update_utc
        remaining = next_update - datetime.now(timezone.utc) if next_update else timedelta(0)
        listed = frozenset(entry.serial_number for entry in crl)
        return listed == serials and remaining > self.crl_validity - self.crl_refresh

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
        self.mode = "idle"

    def __enter__(self) -> AclSync:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        stream_allowed = self.use_change_streams
        while not self._stop.is_set():
            stream: DatabaseChangeStream[Document] | None = None
            try:
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
        max_await = max(50, int(self.interval * 1000))
        try:
            return self.database.call(
                lambda: self.database.db.watch(pipeline, max_await_time_ms=max_await)
            )
        except pymongo.errors.OperationFailure as exc:
            # A standalone mongod: "$changeStream stage is only supported on replica sets".
            log.info("event=acl_sync_polling reason=%s", exc.details or exc)
            return None

    def _follow_stream(self, stream: DatabaseChangeStream[Document]) -> None:
        """Return after a change (debounced) or when the full resync is due."""
        deadline = time.monotonic() + self.full_resync
        while not self._stop.is_set() and time.monotonic() < deadline:
            change = stream.try_next()
            if change is not None:
                self.note_change(change.get("wallTime"))
                # Drain what arrived together, so a burst costs one sync.
                while stream.try_next() is not None and not self._stop.is_set():
                    pass
                self.sync_now()
                deadline = time.monotonic() + self.full_resync

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

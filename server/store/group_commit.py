"""Group commit: the requests in flight share database round trips.

Worker threads call ``insert``, ``update`` and ``find`` and block until their
operation's batch has been written or read; one committer thread takes every
operation pending when it is free and sends them as one ``insert_many``, one
unordered ``bulk_write`` and one ``$in`` query per collection. There is no timer:
an operation that finds a batch slot free goes at once (a lone device waits for
nothing), and those arriving while ``in_flight`` batches are out form the next one,
so batches grow exactly as fast as the database is slow - or as far away (a 20 ms
round trip costs a batch what it used to cost each operation).

Each operation keeps its own guard and gets its own answer:

* ``insert`` -> True, or False for a duplicate key (the write errors name the
  operation by its index in the batch);
* ``update`` -> whether its filter, which holds the expected state, matched. When a
  bulk's matched count equals its number of updates, all of them did; otherwise one
  read of the batch's documents tells which now hold the value only that update
  writes (its ``proof``: a new token's hash, a new certificate's serial);
* ``find`` -> the document whose key field equals the value, or None; ``find_all`` ->
  every document with that value (a selective field: a device's few ledger records).

This module only knows pymongo; ``server.store.db.Database`` routes its batched
helpers here when a committer is attached (``provision-server run`` does).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Final

import pymongo.errors
from pymongo import UpdateOne
from pymongo.database import Database as MongoDatabase

from server.errors import ServerError

log = logging.getLogger("provision.server")

Document = dict[str, Any]
DUPLICATE_KEY: Final = 11000
IN_FLIGHT: Final = 3
"""Batches out at once by default: with the database far away, a request waits for its
own batch's round trip, not also for the one before it. With a database that is
CPU-bound (single-threaded, on the server's cores) more batches in flight only cut the
same work into more, smaller commands; 1 there (``service.db_batches_in_flight``)."""
SENDERS: Final = 8
"""Commands of one batch in flight at once (collections x kinds of operation)."""
MAX_BATCH: Final = 200
"""Operations per command: well inside any socket timeout on the embedded database."""


def _write_error(error: Document) -> pymongo.errors.WriteError:
    """One operation's entry of a BulkWriteError, as the error pymongo raises for one write."""
    return pymongo.errors.WriteError(str(error.get("errmsg", "write error")), error.get("code"))


@dataclass(eq=False)
class _Op:
    kind: str  # "insert" | "update" | "find" | "find_all"
    collection: str
    document: Document = field(default_factory=dict)  # insert: the doc; update: the $-update
    key: tuple[str, Any] = ("", None)  # update/find: the unique field and its value
    guard: Document = field(default_factory=dict)  # update: the whole filter
    proof: tuple[str, Any] = ("", None)  # update: a field only this update writes
    projection: tuple[str, ...] = ()  # find: fields wanted (empty: all)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class GroupCommit:
    """One committer thread batching the inserts, guarded updates and lookups of many workers."""

    def __init__(
        self,
        db: MongoDatabase[Document],
        guard: Callable[[], AbstractContextManager[None]],
        max_batch: int = MAX_BATCH,
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.db = db
        self.guard = guard
        """Maps connectivity errors (``Database.guard``): raised to every waiting worker."""
        self.max_batch = max_batch
        self._pending: list[_Op] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._senders = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="group-send")
        self.in_flight = in_flight
        self._batch_pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="group")
        self._slots = threading.BoundedSemaphore(in_flight)
        self.batches = 0
        self.operations = 0

    # --- the workers' side -------------------------------------------------------

    def insert(self, collection: str, document: Document) -> bool:
        """Insert ``document``; False if a unique index already holds its key."""
        return bool(self._submit(_Op("insert", collection, document=document)))

    def update(
        self,
        collection: str,
        key: tuple[str, Any],
        guard: Document,
        update: Document,
        proof: tuple[str, Any],
    ) -> bool:
        """Apply ``update`` where ``guard`` matches; True if it did.

        ``key`` (field, value) names the one document (``guard`` includes it) and
        ``proof`` (field, value) a value the update sets that nothing else writes.
        """
        op = _Op("update", collection, document=update, key=key, guard=guard, proof=proof)
        return bool(self._submit(op))

    def find(
        self, collection: str, key: tuple[str, Any], projection: Iterable[str] = ()
    ) -> Document | None:
        """The document whose ``key`` field has ``key``'s value (a unique field)."""
        op = _Op("find", collection, key=key, projection=tuple(projection))
        found: Document | None = self._submit(op)
        return found

    def find_all(self, collection: str, key: tuple[str, Any]) -> list[Document]:
        """Every document whose ``key`` field has the value (an indexed, selective field)."""
        found: list[Document] = self._submit(_Op("find_all", collection, key=key))
        return found

    def insert_and_find_all(
        self,
        inserts: Iterable[tuple[str, Document]],
        finds: Iterable[tuple[str, tuple[str, Any]]] = (),
    ) -> tuple[list[bool], list[list[Document]]]:
        """Several inserts and ``find_all`` lookups in the same batch: one round trip.

        For operations that do not depend on each other (a certificate record, its ACL
        and the read of the device's ledger records): nothing orders them in the batch.
        """
        ins = [_Op("insert", collection, document=document) for collection, document in inserts]
        looks = [_Op("find_all", collection, key=key) for collection, key in finds]
        results = self._submit_all([*ins, *looks])
        return [bool(r) for r in results[: len(ins)]], list(results[len(ins) :])

    def _submit(self, op: _Op) -> Any:
        """Queue ``op`` and wait for its result."""
        return self._submit_all([op])[0]

    def _submit_all(self, ops: list[_Op]) -> list[Any]:
        """Queue ``ops`` together (the same batch), wait for all; their results in order."""
        with self._cond:
            if self._thread is None or self._stopping:
                raise RuntimeError("GroupCommit is not running")
            self._pending.extend(ops)
            self._cond.notify()
        for op in ops:
            op.done.wait()
        for op in ops:
            if op.error is not None:
                raise op.error
        return [op.result for op in ops]

    # --- the committer ------------------------------------------------------------

    def start(self) -> GroupCommit:
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is pending, then stop; later calls raise."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._batch_pool.shutdown(wait=True)
        self._senders.shutdown(wait=False)

    def _run(self) -> None:
        while True:
            # A free slot first: while in_flight batches are out, arrivals pile up into
            # the next one (that is the batching); with a slot free, they go at once.
            self._slots.acquire()
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                if not batch and self._stopping:
                    self._slots.release()
                    return
            self.batches += 1
            self.operations += len(batch)
            self._batch_pool.submit(self._commit_and_free, batch)

    def _commit_and_free(self, batch: list[_Op]) -> None:
        try:
            self._commit(batch)
        finally:
            self._slots.release()

    def _commit(self, batch: list[_Op]) -> None:
        """One command per kind and collection, all sent at once (one round trip, not six).

        The operations of one batch, and of the batches in flight together, come from
        different requests (a request waits for each operation before its next), so
        nothing orders them against each other.
        """
        groups: dict[tuple[str, str], list[_Op]] = defaultdict(list)
        for op in batch:
            groups[(op.kind, op.collection)].append(op)
        chunks = [
            ops[start : start + self.max_batch]
            for ops in groups.values()
            for start in range(0, len(ops), self.max_batch)
        ]
        if len(chunks) == 1:
            self._send(chunks[0])
            return
        for _ in self._senders.map(self._send, chunks):
            pass

    def _send(self, chunk: list[_Op]) -> None:
        try:
            with self.guard():
                if chunk[0].kind == "insert":
                    self._insert(chunk)
                elif chunk[0].kind == "update":
                    self._update(chunk)
                elif chunk[0].kind == "find":
                    self._find(chunk)
                else:
                    self._find_all(chunk)
        except Exception as exc:  # every waiting worker gets the error
            for op in chunk:
                if not op.done.is_set():
                    op.finish(error=exc)
            if not isinstance(exc, pymongo.errors.PyMongoError | ServerError):
                log.exception("event=group-commit result=internal-error")

    def _insert(self, ops: list[_Op]) -> None:
        failed: dict[int, Document] = {}
        try:
            self.db[ops[0].collection].insert_many([op.document for op in ops], ordered=False)
        except pymongo.errors.BulkWriteError as exc:
            failed = {int(e["index"]): e for e in exc.details.get("writeErrors", [])}
        for index, op in enumerate(ops):
            error = failed.get(index)
            if error is None:
                op.finish(True)
            elif error.get("code") == DUPLICATE_KEY:
                op.finish(False)
            else:
                op.finish(error=_write_error(error))

    def _update(self, ops: list[_Op]) -> None:
        requests = [UpdateOne(op.guard, op.document) for op in ops]
        failed: dict[int, Document] = {}
        try:
            matched = self.db[ops[0].collection].bulk_write(requests, ordered=False).matched_count
        except pymongo.errors.BulkWriteError as exc:
            failed = {int(e["index"]): e for e in exc.details.get("writeErrors", [])}
            matched = int(exc.details.get("nMatched", 0))
        applied = [op for index, op in enumerate(ops) if index not in failed]
        for index, error in failed.items():
            ops[index].finish(error=_write_error(error))
        if matched == len(applied):
            for op in applied:
                op.finish(True)
            return
        # Some guards did not match: the documents tell whose update is in them.
        for op, holds in zip(applied, self._holds_proof(applied), strict=True):
            op.finish(holds)

    def _holds_proof(self, ops: list[_Op]) -> list[bool]:
        by_key: dict[str, list[_Op]] = defaultdict(list)
        for op in ops:
            by_key[op.key[0]].append(op)
        found: dict[tuple[str, Any], Document] = {}
        for key_field, group in by_key.items():
            proofs = {op.proof[0] for op in group}
            projection = {"_id": 0, key_field: 1, **dict.fromkeys(proofs, 1)}
            query = {key_field: {"$in": list({op.key[1] for op in group})}}
            for doc in self.db[ops[0].collection].find(query, projection):
                found[(key_field, doc.get(key_field))] = doc
        return [found.get(op.key, {}).get(op.proof[0]) == op.proof[1] for op in ops]

    def _find_all(self, ops: list[_Op]) -> None:
        by_field: dict[str, list[_Op]] = defaultdict(list)
        for op in ops:
            by_field[op.key[0]].append(op)
        for key_field, group in by_field.items():
            query = {key_field: {"$in": list({op.key[1] for op in group})}}
            docs: dict[Any, list[Document]] = defaultdict(list)
            for doc in self.db[ops[0].collection].find(query):
                docs[doc.get(key_field)].append(doc)
            for op in group:
                op.finish([dict(doc) for doc in docs.get(op.key[1], [])])

    def _find(self, ops: list[_Op]) -> None:
        by_shape: dict[tuple[str, tuple[str, ...]], list[_Op]] = defaultdict(list)
        for op in ops:
            by_shape[(op.key[0], op.projection)].append(op)
        for (key_field, fields), group in by_shape.items():
            projection = {key_field: 1, **dict.fromkeys(fields, 1)} if fields else None
            query = {key_field: {"$in": list({op.key[1] for op in group})}}
            docs = {
                doc.get(key_field): doc
                for doc in self.db[ops[0].collection].find(query, projection)
            }
            for op in group:
                doc = docs.get(op.key[1])
                op.finish(None if doc is None else dict(doc))

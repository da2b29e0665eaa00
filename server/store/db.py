"""MongoDB connection and index management for the web app's database."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import pymongo
import pymongo.errors
from pymongo.collection import Collection
from pymongo.database import Database as MongoDatabase
from pymongo.monitoring import CommandListener

from server.errors import ConfigError, DatabaseUnavailable, ServerError
from server.store.group_commit import IN_FLIGHT, GroupCommit
from server.store.schema import INDEXES, WEB_APP_COLLECTIONS, IndexSpec

DEFAULT_DATABASE: Final = "device_provisioning"
DEFAULT_TIMEOUT_MS: Final = 3000

Document = dict[str, Any]
T = TypeVar("T")

# Errors that mean "the database is not there right now": devices get the
# retryable UNAVAILABLE code, the CLI a one-line message.
_UNAVAILABLE_ERRORS: Final = (
    pymongo.errors.ConnectionFailure,
    pymongo.errors.ServerSelectionTimeoutError,
    pymongo.errors.NetworkTimeout,
    pymongo.errors.AutoReconnect,
)


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by ``***`` (safe for logs and errors)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def database_name(uri: str) -> str:
    """Database named in the URI path (``mongodb://host/NAME``), else the default."""
    path = urllib.parse.urlsplit(uri).path.lstrip("/")
    return path or DEFAULT_DATABASE


@dataclass(frozen=True)
class IndexReport:
    created: tuple[str, ...]
    present: tuple[str, ...]


class Database:
    """The web app's database: collections by their seed names, errors mapped."""

    def __init__(
        self,
        uri: str,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        event_listeners: Sequence[CommandListener] = (),
    ) -> None:
        if not uri.startswith(("mongodb://", "mongodb+srv://")):
            raise ConfigError(
                f"MongoDB URI {redact_uri(uri)!r} must start with mongodb:// or mongodb+srv://"
            )
        self.uri = uri
        self.safe_uri = redact_uri(uri)
        try:
            self.client: pymongo.MongoClient[Document] = pymongo.MongoClient(
                uri,
                serverSelectionTimeoutMS=timeout_ms,
                connectTimeoutMS=timeout_ms,
                socketTimeoutMS=max(timeout_ms * 5, 10_000),
                tz_aware=True,
                event_listeners=list(event_listeners),  # the server's metrics time commands
            )
        except pymongo.errors.ConfigurationError as exc:
            raise ConfigError(f"MongoDB URI {self.safe_uri!r} is invalid: {exc}") from None
        self.db: MongoDatabase[Document] = self.client[database_name(uri)]
        self.group: GroupCommit | None = None
        """Set by ``start_group_commit``: the batched helpers below then share round trips."""

    def collection(self, name: str) -> Collection[Document]:
        return self.db[name]

    def close(self) -> None:
        self.stop_group_commit()
        self.client.close()

    # --- operations that requests in flight may share (group commit) ---------------

    def start_group_commit(self, in_flight: int = IN_FLIGHT) -> GroupCommit:
        """From now on the batched helpers go through one committer thread.

        ``in_flight``: batches out at once (``GroupCommit``)."""
        if self.group is None:
            self.group = GroupCommit(self.db, self.guard, in_flight=in_flight).start()
        return self.group

    def stop_group_commit(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.stop()

    def insert_new(self, name: str, document: Document) -> bool:
        """Insert ``document``; False (nothing written) if a unique key already exists."""
        if self.group is not None:
            return self.group.insert(name, document)
        try:
            self.call(lambda: self.collection(name).insert_one(document))
        except pymongo.errors.DuplicateKeyError:
            return False
        return True

    def insert_and_find_all(
        self,
        inserts: Sequence[tuple[str, Document]],
        finds: Sequence[tuple[str, tuple[str, Any]]] = (),
    ) -> tuple[list[bool], list[list[Document]]]:
        """``insert_new`` of each document and ``find_all_by`` of each lookup: one batch
        (one round trip) when group commit runs. Only for operations independent of each
        other: the lookups may or may not see the inserts."""
        if self.group is not None:
            return self.group.insert_and_find_all(inserts, finds)
        inserted = [self.insert_new(name, document) for name, document in inserts]
        return inserted, [self.find_all_by(name, key) for name, key in finds]

    def update_guarded(
        self,
        name: str,
        key: tuple[str, Any],
        guard: Document,
        update: Document,
        proof: tuple[str, Any],
    ) -> bool:
        """One update whose filter ``guard`` holds the expected state; True if it matched.

        ``key`` names the document (a unique field and value, also in ``guard``) and
        ``proof`` a field and value that only this update writes: with group commit
        they tell, after a bulk, which of its updates matched.
        """
        if self.group is not None:
            return self.group.update(name, key, guard, update, proof)
        result = self.call(lambda: self.collection(name).update_one(guard, update))
        return result.matched_count == 1

    def find_all_by(self, name: str, key: tuple[str, Any]) -> list[Document]:
        """Every document whose (indexed, selective) ``key`` field has the value."""
        if self.group is not None:
            return self.group.find_all(name, key)
        return self.call(lambda: list(self.collection(name).find({key[0]: key[1]})))

    def find_by(
        self, name: str, key: tuple[str, Any], projection: Sequence[str] = ()
    ) -> Document | None:
        """The document whose unique ``key`` field has the value (all fields, or those)."""
        if self.group is not None:
            return self.group.find(name, key, projection)
        fields = {key[0]: 1, **dict.fromkeys(projection, 1)} if projection else None
        return self.call(lambda: self.collection(name).find_one({key[0]: key[1]}, fields))

    def ping(self) -> None:
        self.call(lambda: self.client.admin.command("ping"))

    def call(self, operation: Callable[[], T]) -> T:
        """Run one database operation, turning connectivity failures into DatabaseUnavailable."""
        with self.guard():
            return operation()

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except _UNAVAILABLE_ERRORS as exc:
            raise DatabaseUnavailable(
                f"MongoDB at {self.safe_uri} is unreachable ({type(exc).__name__}); "
                "check that it runs and MONGODB_URI is right",
                retry_after=5.0,
            ) from None

    def init(self) -> IndexReport:
        """Create the seed's collections and indexes; idempotent, keeps existing data.

        An index the web app already created on the same key (under Prisma's
        or Mongoose's name) counts as present; one with the wrong uniqueness
        is reported, never dropped.
        """
        created: list[str] = []
        present: list[str] = []
        with self.guard():
            existing_collections = set(self.db.list_collection_names())
            for name in WEB_APP_COLLECTIONS:
                if name not in existing_collections:
                    # Another process may create it between the listing and here.
                    with contextlib.suppress(pymongo.errors.CollectionInvalid):
                        self.db.create_collection(name)
            for spec in INDEXES:
                if self._has_index(spec):
                    present.append(spec.label)
                    continue
                self.collection(spec.collection).create_index(
                    [(key, pymongo.ASCENDING) for key in spec.keys], unique=spec.unique
                )
                created.append(spec.label)
        return IndexReport(tuple(created), tuple(present))

    def _has_index(self, spec: IndexSpec) -> bool:
        info = self.collection(spec.collection).index_information()
        for name, index in info.items():
            keys = [key for key, _direction in index["key"]]
            if keys != list(spec.keys):
                continue
            if bool(index.get("unique", False)) != spec.unique:
                raise ServerError(
                    f"index {name!r} on {spec.collection}.{'+'.join(spec.keys)} exists with "
                    f"unique={bool(index.get('unique', False))}, the web app's schema needs "
                    f"unique={spec.unique}; fix it by hand, this tool never drops indexes"
                )
            return True
        return False

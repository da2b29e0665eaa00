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

    def collection(self, name: str) -> Collection[Document]:
        return self.db[name]

    def close(self) -> None:
        self.client.close()

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

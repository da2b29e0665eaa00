"""Device documents and their lifecycle transitions in the ``devices`` collection.

Every transition is ONE ``update_one`` whose filter holds the expected current
status, so two servers (or the web app) racing on a device cannot both win.
``update_one`` + ``matched_count`` rather than ``find_one_and_update``: the
embedded MongoDB-wire server slows down sharply on the latter (design.md §7).
"""

from __future__ import annotations

import re
from collections.abc import Collection as AbstractCollection
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, Final

import pymongo.errors
from bson import ObjectId
from bson.errors import InvalidId

from agent.protocol import CLIENT_ID_RE, default_client_id, normalise_mac
from server.errors import DeviceConflict, ServerError, UnknownDevice, WrongState
from server.store.db import Database, Document
from server.store.schema import DEVICES, USERS, DeviceStatus

_MAC_LIKE: Final = re.compile(r"^[0-9A-Fa-f]{2}([:\-]?[0-9A-Fa-f]{2}){5}$")


def utcnow() -> datetime:
    """Current time as stored in BSON dates (millisecond precision, UTC)."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)


def parse_user_id(text: str) -> ObjectId:
    try:
        return ObjectId(text)
    except (InvalidId, TypeError):
        raise ServerError(
            f"user id {text!r} is not a MongoDB ObjectId "
            "(24 hex digits, e.g. the web app's user.id)"
        ) from None


def validate_client_id(client_id: str) -> str:
    if not CLIENT_ID_RE.match(client_id):
        raise ServerError(
            f"clientId {client_id!r} is invalid: use 1-64 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    return client_id


def silent_query(cutoff: datetime) -> Document:
    """ACTIVE devices last seen before ``cutoff``: bounded by the status+lastSeenAt index.

    Equality on ``status`` then the range on ``lastSeenAt`` (in that key order), so the
    database reads only the devices that fell silent, whatever the fleet's size.
    """
    return {"status": DeviceStatus.ACTIVE.value, "lastSeenAt": {"$lt": cutoff}}


class DeviceRepository:
    """The ``devices`` collection: lookups and lifecycle transitions."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.collection = database.collection(DEVICES)

    # --- lookups -------------------------------------------------------------

    def find(self, device: str) -> Document:
        """Find by MAC (any common spelling) or clientId; UnknownDevice if absent."""
        query: dict[str, Any]
        if _MAC_LIKE.match(device):
            query = {"macID": normalise_mac(device)}
        else:
            query = {"clientId": device}
        doc = self.database.call(lambda: self.collection.find_one(query))
        if doc is None:
            raise UnknownDevice(
                f"no device with {'MAC' if 'macID' in query else 'clientId'} "
                f"{device!r}; list them with `provision-server device list`"
            )
        return doc

    def by_client_id(self, client_id: str) -> Document | None:
        return self.database.find_by(DEVICES, ("clientId", client_id))

    def list(self, status: DeviceStatus | None = None) -> list[Document]:
        query: dict[str, Any] = {} if status is None else {"status": status.value}
        return self.database.call(
            lambda: list(self.collection.find(query).sort("clientId", pymongo.ASCENDING))
        )

    # --- creation ------------------------------------------------------------

    def add(self, mac: str, client_id: str | None = None) -> Document:
        """Insert an UNALLOCATED device, writing every Prisma-defaulted field."""
        try:
            mac = normalise_mac(mac)
        except ValueError as exc:
            raise ServerError(str(exc)) from None
        client_id = validate_client_id(client_id or default_client_id(mac))
        doc: Document = {
            "_id": ObjectId(),
            "macID": mac,
            "clientId": client_id,
            "status": DeviceStatus.UNALLOCATED.value,
            "tokenUsed": False,
        }
        try:
            self.database.call(lambda: self.collection.insert_one(doc))
        except pymongo.errors.DuplicateKeyError as exc:
            field = "macID" if "macID" in str(exc) else "clientId"
            value = mac if field == "macID" else client_id
            raise DeviceConflict(f"a device with {field} {value!r} already exists") from None
        return doc

    # --- transitions ---------------------------------------------------------

    def mark_silent_offline(self, cutoff: datetime) -> int:
        """ACTIVE devices not seen since ``cutoff`` become OFFLINE; returns how many."""
        result = self.database.call(
            lambda: self.collection.update_many(
                silent_query(cutoff), {"$set": {"status": DeviceStatus.OFFLINE.value}}
            )
        )
        return int(result.modified_count)

    def transition(
        self,
        client_id: str,
        *,
        expected: AbstractCollection[DeviceStatus],
        new: DeviceStatus,
        set_fields: Document | None = None,
        unset_fields: Iterable[str] = (),
        extra_filter: Document | None = None,
    ) -> None:
        """Move a device from one of ``expected`` to ``new`` in one atomic update.

        Raises UnknownDevice or WrongState (naming the actual status) when the
        filter matched nothing; the document is then unchanged.
        """
        query: Document = {
            "clientId": client_id,
            "status": {"$in": [status.value for status in expected]},
            **(extra_filter or {}),
        }
        update: Document = {"$set": {"status": new.value, **(set_fields or {})}}
        unset = list(unset_fields)
        if unset:
            update["$unset"] = dict.fromkeys(unset, "")
        result = self.database.call(lambda: self.collection.update_one(query, update))
        if result.matched_count == 1:
            return
        current = self.by_client_id(client_id)
        if current is None:
            raise UnknownDevice(f"no device with clientId {client_id!r}")
        wanted = "/".join(status.value for status in expected)
        raise WrongState(
            f"device {client_id!r} is {current.get('status')!r}, expected {wanted}",
        )

    def allocate(self, device: str, user_id: str) -> Document:
        """UNALLOCATED -> ALLOCATED for an existing user, as the web app does."""
        user = parse_user_id(user_id)
        doc = self.find(device)
        known_user = self.database.call(
            lambda: self.database.collection(USERS).find_one({"_id": user}, {"_id": 1})
        )
        if known_user is None:
            raise ServerError(
                f"no user with id {user_id} in the users collection; create the user in the web "
                "app first"
            )
        self.transition(
            doc["clientId"],
            expected={DeviceStatus.UNALLOCATED},
            new=DeviceStatus.ALLOCATED,
            set_fields={"userId": user, "allocatedAt": utcnow()},
        )
        return self.find(doc["clientId"])

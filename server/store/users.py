"""The web app's ``users`` collection, as far as this product needs it.

The seed does not describe user documents; the web app owns them. We only
read ``_id`` (to check an allocation target exists) and, for demos and tests,
create minimal users with ``email``/``name``.
"""

from __future__ import annotations

import pymongo.errors
from bson import ObjectId

from server.errors import ServerError
from server.store.db import Database, Document
from server.store.schema import USERS


class UserRepository:
    def __init__(self, database: Database) -> None:
        self.database = database
        self.collection = database.collection(USERS)

    def add(self, email: str, name: str = "") -> Document:
        """Create a user, or return the existing one with this e-mail (idempotent)."""
        if "@" not in email or len(email) > 254:
            raise ServerError(f"{email!r} is not an e-mail address")
        existing = self.database.call(lambda: self.collection.find_one({"email": email}))
        if existing is not None:
            return existing
        doc: Document = {"_id": ObjectId(), "email": email, "name": name}
        try:
            self.database.call(lambda: self.collection.insert_one(doc))
        except pymongo.errors.DuplicateKeyError:
            raise ServerError(f"a user with e-mail {email!r} already exists") from None
        return doc

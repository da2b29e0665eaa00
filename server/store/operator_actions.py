"""The audit trail of operators: who did what to which device, and when (``operator_actions``).

Every operator action the admin CLI performs (allocate, revoke, quarantine,
reprovision approval) adds one document once the action succeeded; a refused
action changes nothing and records nothing. The web app may write the same
documents for actions taken in its UI (docs/schema.md). server/store/history.py
merges them with the certificate records into one timeline per device.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Mapping
from enum import Enum
from typing import Any, Final

import pymongo
from bson import ObjectId

from server.store.db import Database, Document
from server.store.devices import utcnow
from server.store.schema import OPERATOR_ACTIONS

OPERATOR_ENV: Final = "PROVISION_OPERATOR"
MAX_OPERATOR_CHARS: Final = 200


class OperatorAction(str, Enum):
    ALLOCATE = "allocate"
    REVOKE = "revoke"
    QUARANTINE = "quarantine"
    RELEASE = "release"
    REPROVISION_APPROVAL = "reprovision-approval"


def current_operator(env: Mapping[str, str] = os.environ) -> str:
    """Who acts: ``$PROVISION_OPERATOR`` (e.g. set by a wrapper), else ``login@host``."""
    named = env.get(OPERATOR_ENV, "").strip()
    if named:
        return named[:MAX_OPERATOR_CHARS]
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        login = f"uid-{os.geteuid()}"
    return f"{login}@{socket.gethostname()}"


class OperatorActionLog:
    """Appends to and reads ``operator_actions``."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.collection = database.collection(OPERATOR_ACTIONS)

    def record(
        self,
        action: OperatorAction,
        device_id: str,
        operator: str,
        details: Mapping[str, Any] | None = None,
    ) -> Document:
        """Store one action; ``details`` holds what the action needs to be understood."""
        doc: Document = {
            "_id": ObjectId(),
            "action": action.value,
            "device_id": device_id,
            "operator": operator,
            "at": utcnow(),
            "details": dict(details or {}),
        }
        self.database.call(lambda: self.collection.insert_one(doc))
        return doc

    def for_device(self, device_id: str) -> list[Document]:
        return self.database.call(
            lambda: list(
                self.collection.find({"device_id": device_id}).sort("at", pymongo.ASCENDING)
            )
        )

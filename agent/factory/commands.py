"""The factory console's command set, shared by the board and the station.

Transport (HELLO, chunking, retries) is ``agent.factory.link``; this module
says what the commands mean. Every payload is a UTF-8 JSON object, both
ways, so a log or a protocol analyser shows it plainly; nothing secret ever
crosses the wire (the birth key stays on the board, only its CSR leaves).

=========  =====================================  ================================
command    request                                answer
=========  =====================================  ================================
INFO       ``{}``                                 ``{mac, serial, state, clientId?,
                                                  certificate?}``
GEN_KEY    ``{clientId}``                         ``{csr}`` (same key every time
                                                  until ``provision-agent reset``)
PUT        ``{item, data}`` (one of ``ITEMS``)    ``{item, sha256}``
COMMIT     ``{sha256}`` (``commit_digest``)       ``{state, clientId}``
FINALIZE   ``{}``                                 ``{state}``
=========  =====================================  ================================

Errors come back as the link's ERROR frame with an ``agent.protocol``
``ErrorCode``: ``WRONG_STATE`` (locked, nothing staged, not committed),
``BAD_REQUEST`` (malformed payload, hash mismatch), ``MAC_MISMATCH`` (the
certificate names another board).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import Enum, IntEnum
from typing import Any, Final

from agent.errors import AgentError
from agent.protocol import ErrorCode


class Command(IntEnum):
    INFO = 0x10
    GEN_KEY = 0x11
    PUT = 0x12
    COMMIT = 0x13
    FINALIZE = 0x14


class IdentityState(str, Enum):
    """What the board holds: no key, a key, a committed identity, a locked identity."""

    NONE = "none"
    KEYED = "keyed"
    COMMITTED = "committed"
    FINALIZED = "finalized"


# PUT items, in the order the commit hash covers them.
ITEM_CLIENT_ID: Final = "clientId"
ITEM_CERTIFICATE: Final = "certificate"
ITEM_CA_CHAIN: Final = "caChain"
ITEM_ENDPOINTS: Final = "endpoints"
ITEMS: Final = (ITEM_CLIENT_ID, ITEM_CERTIFICATE, ITEM_CA_CHAIN, ITEM_ENDPOINTS)
MAX_ITEM_BYTES: Final = 64 * 1024


class FactoryCommandError(AgentError):
    """A factory command was refused; the code travels to the station in an ERROR frame."""

    code = ErrorCode.BAD_REQUEST


class BoardLocked(FactoryCommandError):
    code = ErrorCode.WRONG_STATE


class WrongStep(FactoryCommandError):
    """A command arrived before the one it depends on (COMMIT before PUT, ...)."""

    code = ErrorCode.WRONG_STATE


class CertificateMismatch(FactoryCommandError):
    code = ErrorCode.MAC_MISMATCH


def commit_digest(items: Mapping[str, bytes]) -> str:
    """SHA-256 over every item in ``ITEMS`` order, each as name, length and bytes."""
    missing = [name for name in ITEMS if name not in items]
    if missing:
        raise WrongStep(f"nothing staged for {', '.join(missing)}: PUT them before COMMIT")
    digest = hashlib.sha256()
    for name in ITEMS:
        data = items[name]
        digest.update(name.encode("ascii") + b"\0" + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(obj), separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode(payload: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object payload; FactoryCommandError (BAD_REQUEST) if it is not one."""
    try:
        obj = json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FactoryCommandError(f"{what}: payload is not UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise FactoryCommandError(f"{what}: payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise FactoryCommandError(f"{what}: payload must be a JSON object")
    return obj


def text_field(obj: Mapping[str, Any], name: str, what: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise FactoryCommandError(f"{what}: field {name!r} must be a non-empty string")
    return value

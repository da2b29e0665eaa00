"""The wire contract between device and server: topics, messages, error codes.

Both sides import this one module, so a change here is a protocol change:
bump ``PROTOCOL_VERSION`` when an old peer would misread a message.
Parsing is strict: unknown ops, unknown fields and wrong types are errors,
because a provisioning endpoint must never guess what a device meant.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Literal

PROTOCOL_VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 16 * 1024
MAX_PEM_CHARS: Final = 8 * 1024
MAX_TEXT_CHARS: Final = 512

CLIENT_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAC_RE: Final = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")


class ErrorCode(str, Enum):
    """Closed, stable set of error codes; ``retryable`` tells the agent what to do.

    Retryable means "the same request, sent again later, may succeed".
    Non-retryable token errors send the agent back to the token step.
    """

    BAD_REQUEST = "BAD_REQUEST"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    UNKNOWN_OP = "UNKNOWN_OP"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNKNOWN_DEVICE = "UNKNOWN_DEVICE"
    NOT_ALLOCATED = "NOT_ALLOCATED"
    MAC_MISMATCH = "MAC_MISMATCH"
    TOKEN_INVALID = "TOKEN_INVALID"  # noqa: S105 (an error code)
    TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105 (an error code)
    CSR_INVALID = "CSR_INVALID"
    WRONG_STATE = "WRONG_STATE"
    WRONG_TOPIC = "WRONG_TOPIC"
    REPROVISION_NOT_APPROVED = "REPROVISION_NOT_APPROVED"
    CLONE_SUSPECTED = "CLONE_SUSPECTED"
    QUARANTINED = "QUARANTINED"
    PROOF_INVALID = "PROOF_INVALID"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE: Final = frozenset(
    {
        ErrorCode.NOT_ALLOCATED,
        ErrorCode.REPROVISION_NOT_APPROVED,
        ErrorCode.CLONE_SUSPECTED,
        ErrorCode.RATE_LIMITED,
        ErrorCode.UNAVAILABLE,
        ErrorCode.INTERNAL,
    }
)


class ProtocolError(Exception):
    """A message that violates the contract; carries the code sent back to the peer."""

    def __init__(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


# --- topics -----------------------------------------------------------------

PROVISIONING_PREFIX: Final = "provisioning"
DEVICES_PREFIX: Final = "devices"
SHARE_GROUP: Final = "provisioners"


def request_topic(client_id: str) -> str:
    return f"{PROVISIONING_PREFIX}/{client_id}/request"


def response_topic(client_id: str) -> str:
    return f"{PROVISIONING_PREFIX}/{client_id}/response"


def status_topic(client_id: str) -> str:
    return f"{DEVICES_PREFIX}/{client_id}/status"


def renew_topic(client_id: str) -> str:
    return f"{DEVICES_PREFIX}/{client_id}/cert/renew"


def renew_response_topic(client_id: str) -> str:
    return f"{DEVICES_PREFIX}/{client_id}/cert/renew/response"


def shared(topic_filter: str) -> str:
    """Shared-subscription form, so several server processes split the load."""
    return f"$share/{SHARE_GROUP}/{topic_filter}"


SERVER_REQUEST_FILTER: Final = f"{PROVISIONING_PREFIX}/+/request"
SERVER_STATUS_FILTER: Final = f"{DEVICES_PREFIX}/+/status"
SERVER_RENEW_FILTER: Final = f"{DEVICES_PREFIX}/+/cert/renew"


class RequestChannel(str, Enum):
    """The topic a request came on; each op belongs to exactly one (else WRONG_TOPIC)."""

    PROVISIONING = "provisioning"  # provisioning/<id>/request, birth certificate
    RENEWAL = "renewal"  # devices/<id>/cert/renew, operational certificate


OPS_BY_CHANNEL: Final = {
    RequestChannel.PROVISIONING: frozenset({"token", "csr"}),
    RequestChannel.RENEWAL: frozenset({"renew", "renew-confirm"}),
}


def client_id_from_topic(topic: str) -> str:
    """The clientId segment of a per-device topic (``<prefix>/<clientId>/...``)."""
    parts = topic.split("/")
    if len(parts) < 3 or not CLIENT_ID_RE.match(parts[1]):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"topic {topic!r} has no valid clientId")
    return parts[1]


# --- messages ----------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """Sent with the birth certificate (PEM) the broker authenticated the device with."""

    mac: str
    cert: str
    op: Literal["token"] = "token"


@dataclass(frozen=True)
class CsrRequest:
    token: str
    csr: str
    op: Literal["csr"] = "csr"


@dataclass(frozen=True)
class RenewRequest:
    csr: str
    op: Literal["renew"] = "renew"


@dataclass(frozen=True)
class RenewConfirm:
    """``signature``: base64 of the new key's signature over ``renewal_proof_message``."""

    serial: str
    signature: str
    op: Literal["renew-confirm"] = "renew-confirm"


RENEWAL_PROOF_LABEL: Final = "device-provisioning renew-confirm v1"


def renewal_proof_message(client_id: str, serial: str, nonce: str) -> bytes:
    """What a device signs with its NEW key to confirm a renewal (the server checks it).

    The nonce comes from the ``renew`` response; binding clientId and serial keeps a
    signature from being replayed for another device or certificate.
    """
    return "\n".join((RENEWAL_PROOF_LABEL, client_id, serial, nonce)).encode("utf-8")


@dataclass(frozen=True)
class StatusReport:
    status: Literal["online", "offline", "error"]
    ts: str | None = None
    error: str | None = None


Request = TokenRequest | CsrRequest | RenewRequest | RenewConfirm

_FIELDS: Final[dict[str, dict[str, int]]] = {
    # op -> field -> max length
    "token": {"mac": 17, "cert": MAX_PEM_CHARS},
    "csr": {"token": 128, "csr": MAX_PEM_CHARS},
    "renew": {"csr": MAX_PEM_CHARS},
    "renew-confirm": {"serial": 64, "signature": 1024},
}


def _load_object(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"payload is {len(payload)} bytes, the limit is {MAX_PAYLOAD_BYTES}",
        )
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError, JSONDecodeError and an integer past
        # Python's 4,300-digit conversion limit (``"v": 5000 digits``).
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"payload is not UTF-8 JSON: {str(exc)[:120]}"
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "payload must be a JSON object")
    version = obj.get("v")
    if type(version) is not int:
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'field "v" must be an integer')
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported (expected {PROTOCOL_VERSION})",
        )
    return obj


def _check_encodable(name: str, value: str) -> None:
    """JSON may escape lone surrogates (``"\\ud800"``); no UTF-8 consumer can take them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f'field "{name}" holds an unpaired surrogate'
        ) from None


def _string_fields(obj: dict[str, Any], spec: dict[str, int], allowed: set[str]) -> dict[str, str]:
    extra = sorted(set(obj) - allowed - set(spec))
    if extra:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown field(s): {', '.join(extra)}")
    values: dict[str, str] = {}
    for name, limit in spec.items():
        value = obj.get(name)
        if not isinstance(value, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f'field "{name}" must be a string')
        if not value or len(value) > limit:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f'field "{name}" must be 1..{limit} characters'
            )
        _check_encodable(name, value)
        values[name] = value
    return values


def parse_request(payload: bytes) -> Request:
    """Parse a device request strictly; raise ProtocolError with the code to send back."""
    obj = _load_object(payload)
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'field "op" must be a string')
    spec = _FIELDS.get(op)
    if spec is None:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:32]!r}")
    fields = _string_fields(obj, spec, {"v", "op"})
    if op == "token":
        mac = fields["mac"].upper()
        if not MAC_RE.match(mac):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, 'field "mac" must look like AA:BB:CC:DD:EE:FF'
            )
        return TokenRequest(mac=mac, cert=fields["cert"])
    if op == "csr":
        return CsrRequest(token=fields["token"], csr=fields["csr"])
    if op == "renew":
        return RenewRequest(csr=fields["csr"])
    return RenewConfirm(serial=fields["serial"], signature=fields["signature"])


def parse_status(payload: bytes) -> StatusReport:
    """Parse a device status message (retained ``online``/``offline``, or ``error``)."""
    obj = _load_object(payload)
    extra = sorted(set(obj) - {"v", "status", "ts", "error"})
    if extra:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown field(s): {', '.join(extra)}")
    status = obj.get("status")
    if status not in ("online", "offline", "error"):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, 'field "status" must be "online", "offline" or "error"'
        )
    ts = obj.get("ts")
    if ts is not None and (not isinstance(ts, str) or len(ts) > 64):
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'field "ts" must be an ISO 8601 string')
    error = obj.get("error")
    if error is not None and (not isinstance(error, str) or len(error) > MAX_TEXT_CHARS):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f'field "error" must be a string of <= {MAX_TEXT_CHARS} chars'
        )
    for name, text in (("ts", ts), ("error", error)):
        if text is not None:
            _check_encodable(name, text)
    if status == "error" and not error:
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'status "error" needs an "error" text')
    return StatusReport(status=status, ts=ts, error=error)


def encode(obj: dict[str, Any]) -> bytes:
    """Serialise a message, adding the protocol version."""
    return json.dumps({"v": PROTOCOL_VERSION, **obj}, separators=(",", ":")).encode()


def ok_response(op: str, **fields: Any) -> bytes:
    return encode({"ok": True, "op": op, **fields})


def error_response(error: ProtocolError) -> bytes:
    body: dict[str, Any] = {"code": error.code.value, "message": error.message}
    if error.retry_after is not None:
        body["retryAfter"] = error.retry_after
    return encode({"ok": False, "error": body})


@dataclass(frozen=True)
class Response:
    """A server response as the agent sees it."""

    ok: bool
    fields: dict[str, Any]
    error: ProtocolError | None


def parse_response(payload: bytes) -> Response:
    """Parse a server response; a malformed one becomes a retryable INTERNAL error."""
    try:
        obj = _load_object(payload)
    except ProtocolError as exc:
        return Response(False, {}, ProtocolError(ErrorCode.INTERNAL, f"bad response: {exc}"))
    if obj.get("ok") is True:
        return Response(True, obj, None)
    err = obj.get("error")
    if not isinstance(err, dict):
        return Response(False, obj, ProtocolError(ErrorCode.INTERNAL, "response without error"))
    try:
        code = ErrorCode(err.get("code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    retry_after = err.get("retryAfter")
    return Response(
        False,
        obj,
        ProtocolError(
            code,
            str(err.get("message", ""))[:MAX_TEXT_CHARS],
            float(retry_after) if isinstance(retry_after, (int, float)) else None,
        ),
    )


def mac_uri(mac: str) -> str:
    """RFC 9039 device URI for a MAC: ``urn:dev:mac:<12 lowercase hex>``."""
    return "urn:dev:mac:" + mac.replace(":", "").lower()


def normalise_mac(text: str) -> str:
    """Return ``AA:BB:CC:DD:EE:FF`` for common MAC spellings, or raise ValueError."""
    hexdigits = re.sub(r"[:\-.\s]", "", text.strip()).upper()
    if not re.fullmatch(r"[0-9A-F]{12}", hexdigits):
        raise ValueError(
            f"{text!r} is not a MAC address (expected 12 hex digits, e.g. AA:BB:CC:DD:EE:FF)"
        )
    mac = ":".join(hexdigits[i : i + 2] for i in range(0, 12, 2))
    if mac in ("00:00:00:00:00:00", "FF:FF:FF:FF:FF:FF"):
        raise ValueError(f"{text!r} is not a usable MAC address (all-zero or broadcast)")
    return mac


def default_client_id(mac: str) -> str:
    """The clientId a device gets when nobody chose one: ``dev-<12 lowercase hex>``."""
    return "dev-" + normalise_mac(mac).replace(":", "").lower()

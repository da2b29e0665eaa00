"""One exception root for the server, with codes shared with the wire protocol.

A ``ServerError`` that reaches a device becomes ``{"ok": false, "error": ...}``
with the same code; one that reaches the CLI becomes a one-line message and
exit code 1.
"""

from __future__ import annotations

from agent.protocol import ErrorCode, ProtocolError


class ServerError(Exception):
    """Root of every expected server-side failure."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def to_protocol(self) -> ProtocolError:
        return ProtocolError(self.code, self.message, self.retry_after)


class ConfigError(ServerError):
    """A configuration file, option or environment variable is invalid."""

    code = ErrorCode.INTERNAL


class DatabaseUnavailable(ServerError):
    """MongoDB cannot be reached; devices should retry later."""

    code = ErrorCode.UNAVAILABLE


class UnknownDevice(ServerError):
    code = ErrorCode.UNKNOWN_DEVICE


class DeviceConflict(ServerError):
    """A unique field (macID, clientId) already belongs to another device."""

    code = ErrorCode.BAD_REQUEST


class WrongState(ServerError):
    """The device is not in the status the transition expects."""

    code = ErrorCode.WRONG_STATE


class NotAllocated(ServerError):
    code = ErrorCode.NOT_ALLOCATED


class MacMismatch(ServerError):
    code = ErrorCode.MAC_MISMATCH


class RateLimited(ServerError):
    code = ErrorCode.RATE_LIMITED


class TokenInvalid(ServerError):
    code = ErrorCode.TOKEN_INVALID


class TokenExpired(ServerError):
    code = ErrorCode.TOKEN_EXPIRED


class CsrInvalid(ServerError):
    code = ErrorCode.CSR_INVALID


class ReprovisionNotApproved(ServerError):
    """A provisioned device asks to start again and the policy wants an operator first."""

    code = ErrorCode.REPROVISION_NOT_APPROVED


class CloneSuspected(ServerError):
    """A birth-certificate request for a device whose operational session is live."""

    code = ErrorCode.CLONE_SUSPECTED


class Quarantined(ServerError):
    """The birth certificate presented is revoked."""

    code = ErrorCode.QUARANTINED


class ProofInvalid(ServerError):
    """``renew-confirm`` is not signed by the pending certificate's key."""

    code = ErrorCode.PROOF_INVALID


class CaError(ServerError):
    """CA material is missing, unreadable, or would be overwritten."""

    code = ErrorCode.INTERNAL

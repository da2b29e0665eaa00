"""The service's policy: its tunable limits and which statuses each operation accepts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Final

from server.store.db import Document
from server.store.schema import DeviceStatus


class ReprovisionPolicy(str, Enum):
    """``policy.reprovision``: when a device that was provisioned may start again alone.

    approval: never by itself; an operator sets it back to ALLOCATED (`provision-server
        device reprovision`, or the web app). The default.
    offline: also once it has been OFFLINE for ``reprovision_offline_after`` (field
        self-recovery after a lost key). Risk: whoever holds the birth certificate takes
        over a device that is switched off long enough.
    always: also from PROVISIONED, and from ACTIVE or OFFLINE once silent for the
        offline timeout. Risk: anyone with the birth certificate (sent in clear by TLS
        1.2) takes over any device that is switched off. Development fleets only.

    ERROR (an operator revocation, or the device's own error report) always needs approval,
    and a device heard from within the offline timeout (ACTIVE, or OFFLINE since moments
    ago) is refused as a probable clone, whatever the policy.
    """

    APPROVAL = "approval"
    OFFLINE = "offline"
    ALWAYS = "always"


# Statuses from which a token is always accepted: first provisioning (the owner
# allocated it, or an operator approved re-provisioning) and a device asking again
# during provisioning (its token expired).
TOKEN_FROM: Final = frozenset({DeviceStatus.ALLOCATED, DeviceStatus.PROVISIONING})
# A device that was provisioned: starting again needs the policy's consent.
REPROVISION_FROM: Final = frozenset(
    {DeviceStatus.PROVISIONED, DeviceStatus.ACTIVE, DeviceStatus.OFFLINE, DeviceStatus.ERROR}
)
# Statuses in which a device holds the certificate issued for its last token.
HOLDS_CERTIFICATE = frozenset({DeviceStatus.PROVISIONED, DeviceStatus.ACTIVE, DeviceStatus.OFFLINE})
ONLINE_FROM = frozenset({DeviceStatus.PROVISIONED, DeviceStatus.ACTIVE, DeviceStatus.OFFLINE})


@dataclass(frozen=True)
class ServicePolicy:
    token_lifetime: timedelta = timedelta(seconds=300)
    token_min_interval: float = 1.0
    certificate_validity: timedelta = timedelta(days=90)
    not_allocated_retry_after: float = 60.0
    status_write_interval: float = 30.0
    offline_timeout: timedelta = timedelta(seconds=180)
    reprovision: ReprovisionPolicy = ReprovisionPolicy.APPROVAL
    reprovision_offline_after: timedelta = timedelta(hours=1)
    reprovision_retry_after: float = 60.0
    renew_min_interval: float = 60.0


def token_guard(policy: ServicePolicy, now: datetime) -> Document:
    """The ``devices`` filter (beside clientId and MAC) under which a token may be issued.

    Besides the statuses, the filter keeps out a device heard from within the offline
    timeout (``recently_heard_left``), so the guard never issues what the refusal would
    call a probable clone.
    """
    clauses: list[dict[str, Any]] = [{"status": {"$in": [s.value for s in TOKEN_FROM]}}]
    quiet = now - policy.offline_timeout
    if policy.reprovision is ReprovisionPolicy.OFFLINE:
        cutoff = min(quiet, now - policy.reprovision_offline_after)
        clauses.append({"status": DeviceStatus.OFFLINE.value, "lastSeenAt": {"$lt": cutoff}})
    elif policy.reprovision is ReprovisionPolicy.ALWAYS:
        clauses.append({"status": DeviceStatus.PROVISIONED.value})
        in_service = [DeviceStatus.ACTIVE.value, DeviceStatus.OFFLINE.value]
        clauses.append({"status": {"$in": in_service}, "lastSeenAt": {"$lt": quiet}})
        clauses.append({"status": {"$in": in_service}, "lastSeenAt": {"$exists": False}})
    return clauses[0] if len(clauses) == 1 else {"$or": clauses}


def reprovision_hint(policy: ServicePolicy, status: str) -> str:
    """What a provisioned device in ``status`` is waiting for (REPROVISION_NOT_APPROVED)."""
    if status == DeviceStatus.ERROR.value or policy.reprovision is ReprovisionPolicy.APPROVAL:
        return "an operator must approve it (`provision-server device reprovision`)"
    return f"policy {policy.reprovision.value!r} does not allow it yet"


def _left(device: Document, now: datetime, window: timedelta, statuses: set[str]) -> float:
    seen = device.get("lastSeenAt")
    if device.get("status") not in statuses or not isinstance(seen, datetime):
        return 0.0
    return max(0.0, (seen + window - now).total_seconds())


def live_session_left(device: Document, now: datetime, offline_timeout: timedelta) -> float:
    """Seconds for which the device's operational session still counts as live (0: not live).

    Live is what the server saw on the status topic: ACTIVE (an ``online`` came, no
    ``offline`` or last will since) and heard from within ``offline_timeout``.
    """
    return _left(device, now, offline_timeout, {DeviceStatus.ACTIVE.value})


def recently_heard_left(device: Document, now: datetime, offline_timeout: timedelta) -> float:
    """Like ``live_session_left``, but an OFFLINE device heard from lately counts too.

    A clone ends the device's session before it asks: a connection with the device's
    client id closes the device's own (MQTT client ids are one namespace on the broker),
    and the last will reports OFFLINE a moment before the token request arrives.
    """
    statuses = {DeviceStatus.ACTIVE.value, DeviceStatus.OFFLINE.value}
    return _left(device, now, offline_timeout, statuses)

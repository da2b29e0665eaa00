"""The web app's MongoDB contract: collection names, enums, field names, indexes.

Everything here mirrors ``seed/schema-compatibility.md`` (the Prisma schema of
the operator's Next.js app). Change it only together with the web app.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

DEVICES: Final = "devices"
DEVICE_ACLS: Final = "device_acls"
DEVICE_CERTIFICATES: Final = "device_certificates"
USERS: Final = "users"
SOCIALS: Final = "socials"
# Ours, where the seed is silent: one document per revoked certificate, the
# source of the CRL (device_certificates keeps only the current one per device).
CERTIFICATE_REVOCATIONS: Final = "certificate_revocations"
# Ours: the audit trail, one document per operator action (server/store/operator_actions.py).
OPERATOR_ACTIONS: Final = "operator_actions"
# Ours: one record per certificate the CA signs (server/store/issuances.py).
CERTIFICATE_ISSUANCES: Final = "certificate_issuances"
# Ours: refusals that looked like attacks (server/store/security_events.py).
SECURITY_EVENTS: Final = "security_events"

WEB_APP_COLLECTIONS: Final = (DEVICES, DEVICE_ACLS, DEVICE_CERTIFICATES, USERS, SOCIALS)


class DeviceStatus(str, Enum):
    """``DeviceStatus`` enum of the Prisma schema; values are the exact strings."""

    UNALLOCATED = "UNALLOCATED"
    ALLOCATED = "ALLOCATED"
    PROVISIONING = "PROVISIONING"
    PROVISIONED = "PROVISIONED"
    ACTIVE = "ACTIVE"
    OFFLINE = "OFFLINE"
    ERROR = "ERROR"


class DeviceTier(str, Enum):
    """``DeviceTier``: stored as the strings '1', '2', '3'."""

    TIER_1 = "1"
    TIER_2 = "2"
    TIER_3 = "3"


class CertificateStatus(str, Enum):
    """``DeviceCertificateStatus``: lower-case strings."""

    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True)
class IndexSpec:
    collection: str
    field: str
    unique: bool = False
    then: tuple[str, ...] = ()
    """Further keys after ``field``: a compound index."""

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.field, *self.then)

    @property
    def label(self) -> str:
        return f"{self.collection}.{'+'.join(self.keys)}{' (unique)' if self.unique else ''}"


INDEXES: Final = (
    IndexSpec(DEVICES, "macID", unique=True),
    IndexSpec(DEVICES, "clientId", unique=True),
    IndexSpec(DEVICES, "userId"),
    IndexSpec(DEVICES, "status"),
    # Ours, not the web app's: the offline sweep's {status: ACTIVE, lastSeenAt < cutoff}
    # then reads only the silent devices, not every ACTIVE device of the fleet.
    IndexSpec(DEVICES, "status", then=("lastSeenAt",)),
    IndexSpec(DEVICE_ACLS, "device_id", unique=True),
    IndexSpec(DEVICE_ACLS, "user_id"),
    IndexSpec(DEVICE_ACLS, "tier"),
    IndexSpec(DEVICE_ACLS, "last_updated"),
    IndexSpec(DEVICE_CERTIFICATES, "device_id", unique=True),
    IndexSpec(DEVICE_CERTIFICATES, "fingerprint", unique=True),
    IndexSpec(DEVICE_CERTIFICATES, "user_id"),
    IndexSpec(DEVICE_CERTIFICATES, "cn"),
    IndexSpec(DEVICE_CERTIFICATES, "status"),
    IndexSpec(DEVICE_CERTIFICATES, "expires_at"),
    IndexSpec(DEVICE_CERTIFICATES, "created_at"),
    IndexSpec(CERTIFICATE_REVOCATIONS, "serial", unique=True),
    IndexSpec(CERTIFICATE_REVOCATIONS, "device_id"),
    IndexSpec(OPERATOR_ACTIONS, "device_id"),
    IndexSpec(OPERATOR_ACTIONS, "at"),
    IndexSpec(CERTIFICATE_ISSUANCES, "serial", unique=True),
    IndexSpec(CERTIFICATE_ISSUANCES, "device_id"),
    IndexSpec(SECURITY_EVENTS, "device_id"),
)

# Device fields of the seed (plus crt / ca_certificate of its step 4); the
# round-trip tests check that we never write a device field outside this set.
DEVICE_FIELDS: Final = frozenset(
    {
        "_id",
        "macID",
        "clientId",
        "userId",
        "status",
        "allocatedAt",
        "provisionedAt",
        "lastSeenAt",
        "provisioningToken",
        "tokenExpiresAt",
        "tokenUsed",
        "certificateSerial",
        "certificateExpiresAt",
        "errorMessage",
        "crt",
        "ca_certificate",
    }
)

"""The service's policy: its tunable limits and which statuses each operation accepts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from server.store.schema import DeviceStatus

# A device may ask for a token from any status but UNALLOCATED: it proves who
# it is with its birth certificate, and re-provisioning (factory reset, lost
# key) must work. The old certificate is revoked once the new one is issued.
TOKEN_FROM = frozenset(DeviceStatus) - {DeviceStatus.UNALLOCATED}
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

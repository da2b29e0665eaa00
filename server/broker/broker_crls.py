"""The broker's two CRLs as files: what they list, and whether one must be re-signed.

OpenSSL refuses EVERY client of a listener once its CRL's nextUpdate has passed, so a CRL
is re-signed when its serials change and, although nothing changed, once less than
``validity - refresh`` of it is left (see docs/broker.md, "CRL expiry").
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from server.broker.acl_rules import REVOKED_BLOCK
from server.broker.mosquitto_conf import BrokerLayout
from server.pki.ca import CertificateAuthority


def listed_serials(path: Path) -> frozenset[int]:
    """Serials of the CRL at ``path`` (empty if it is missing or unreadable)."""
    try:
        return frozenset(e.serial_number for e in x509.load_pem_x509_crl(path.read_bytes()))
    except (OSError, ValueError):
        return frozenset()


def enforced_now(layout: BrokerLayout) -> tuple[frozenset[int], frozenset[int], frozenset[str]]:
    """What the broker's files enforce now: device CRL serials, factory CRL serials, and the
    devices whose ACL block is deny-all (revoked)."""
    denied: set[str] = set()
    with contextlib.suppress(OSError):
        user = None
        for line in layout.acl_operational.read_text().splitlines():
            if line.startswith("user "):
                user = line[5:]
            elif user is not None and (line,) == REVOKED_BLOCK:
                denied.add(user)
    return (
        listed_serials(layout.crl_path),
        listed_serials(layout.factory_crl_path),
        frozenset(denied),
    )


def crl_is_current(
    path: Path,
    issuer: x509.Certificate,
    serials: frozenset[int],
    validity: timedelta,
    refresh: timedelta,
) -> bool:
    """True if ``path`` is a CRL of ``issuer`` listing ``serials`` and not yet due."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return False
    issuer_key = issuer.public_key()
    if not isinstance(issuer_key, ec.EllipticCurvePublicKey):
        return False
    if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer_key):
        return False
    next_update = crl.next_update_utc
    remaining = next_update - datetime.now(timezone.utc) if next_update else timedelta(0)
    listed = frozenset(entry.serial_number for entry in crl)
    return listed == serials and remaining > validity - refresh


def crl_if_needed(
    path: Path,
    ca: CertificateAuthority,
    issuer: Literal["device", "factory"],
    revoked: dict[int, datetime],
    validity: timedelta,
    refresh: timedelta,
) -> bytes | None:
    """A new CRL if its serials changed or the current one is due; else None."""
    issuer_cert = ca.device_ca if issuer == "device" else ca.factory_ca
    if crl_is_current(path, issuer_cert, frozenset(revoked), validity, refresh):
        return None
    return ca.build_crl(sorted(revoked.items()), validity, issuer=issuer)


class CrlFile:
    """One CRL file and what it is known to hold, so a sync that changes no revocation
    does not re-read and re-verify a 100,000-entry CRL (about 0.3 s) on every pass."""

    def __init__(self, path: Path, issuer: Literal["device", "factory"]) -> None:
        self.path = path
        self.issuer = issuer
        self._serials: frozenset[int] | None = None  # None: unknown, read the file
        self._next_update: datetime | None = None

    def forget(self) -> None:
        """After a failed write: the file may not hold what was last built."""
        self._serials = None

    def needed(
        self,
        ca: CertificateAuthority,
        revoked: dict[int, datetime],
        validity: timedelta,
        refresh: timedelta,
    ) -> bytes | None:
        """A new CRL if its serials changed or the current one is due; else None."""
        wanted = frozenset(revoked)
        now = datetime.now(timezone.utc)
        if self._serials is None:
            pem = crl_if_needed(self.path, ca, self.issuer, revoked, validity, refresh)
            self._serials = wanted
            self._next_update = now + validity if pem is not None else self._file_next_update()
            return pem
        due = self._next_update is None or self._next_update - now <= validity - refresh
        if self._serials == wanted and not due:
            return None
        self._serials, self._next_update = wanted, now + validity
        return ca.build_crl(sorted(revoked.items()), validity, issuer=self.issuer)

    def _file_next_update(self) -> datetime | None:
        try:
            return x509.load_pem_x509_crl(self.path.read_bytes()).next_update_utc
        except (OSError, ValueError):
            return None

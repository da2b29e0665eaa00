"""Single-use provisioning tokens: random, short-lived, stored only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

HASH_PREFIX: Final = "sha256:"


def hash_token(token: str) -> str:
    """The form stored in ``devices.provisioningToken``: ``sha256:<hex>``."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored: object) -> bool:
    """Constant-time comparison of a presented token with the stored hash."""
    if not isinstance(stored, str) or not stored.startswith(HASH_PREFIX):
        return False
    return hmac.compare_digest(hash_token(token), stored)


@dataclass(frozen=True)
class IssuedToken:
    token: str  # the only copy of the plain token; it goes to the device and nowhere else
    hashed: str
    expires_at: datetime

    def __repr__(self) -> str:
        return f"IssuedToken(hashed={self.hashed[:15]}..., expires_at={self.expires_at})"


@dataclass(frozen=True)
class TokenIssuer:
    """Makes tokens with 256 bits of entropy and a fixed lifetime."""

    lifetime: timedelta = timedelta(seconds=300)

    def issue(self, now: datetime) -> IssuedToken:
        token = secrets.token_urlsafe(32)
        return IssuedToken(token, hash_token(token), now + self.lifetime)

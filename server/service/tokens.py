"""Single-use provisioning tokens: random, short-lived, stored only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
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


class TokenRateLimiter:
    """At most one token per device per ``interval`` seconds (per server process).

    Every token issue is a database write and invalidates the previous token,
    so a device (or a bug in one) asking in a loop must be slowed down. The
    answer is the retryable RATE_LIMITED with the seconds left.
    """

    MAX_TRACKED = 100_000

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def wait_time(self, client_id: str) -> float:
        """Seconds until ``client_id`` may get a token; 0 means now."""
        if self.interval <= 0:
            return 0.0
        with self._lock:
            last = self._last.get(client_id)
        if last is None:
            return 0.0
        return max(0.0, last + self.interval - time.monotonic())

    def issued(self, client_id: str) -> None:
        if self.interval <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._last) >= self.MAX_TRACKED:
                cutoff = now - self.interval
                self._last = {k: v for k, v in self._last.items() if v > cutoff}
            self._last[client_id] = now

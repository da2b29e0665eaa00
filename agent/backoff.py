"""Retry delays: exponential backoff with full jitter (AWS architecture blog, 2015).

Full jitter draws each delay uniformly from ``[0, min(cap, base * 2**attempt)]``,
so a fleet that lost its broker at the same moment does not come back in step.
A server's ``retryAfter`` is a floor: the delay is ``retryAfter`` plus a jittered
share, never less, so devices told "come back in 30 s" still spread out.
"""

from __future__ import annotations

import random
import secrets


def full_jitter(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """A delay in ``[0, min(maximum, initial * 2**attempt)]`` (``attempt`` counts from 0)."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    # Cap the exponent so 2**attempt cannot overflow a float after days of retries.
    ceiling = min(maximum, initial * 2 ** min(attempt, 62))
    return rng.uniform(0.0, ceiling)


class Backoff:
    """Successive retry delays for one kind of operation; ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self.attempt = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        """The delay before the next try; grows the attempt counter."""
        delay = full_jitter(self.attempt, self.initial, self.maximum, self._rng)
        self.attempt += 1
        if retry_after is not None and retry_after > 0:
            # The server's hint is a floor; the jitter (at most the hint again) spreads the fleet.
            return retry_after + min(delay, retry_after)
        return delay

    def reset(self) -> None:
        self.attempt = 0

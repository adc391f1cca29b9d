"""A per-client token bucket, used to rate-limit enrollment and failed dashboard logins.

In-process only: behind a load balancer with N processes the effective limit is N times the setting,
which is the intended order of magnitude (this guards against a runaway script, not a botnet).
"""

from __future__ import annotations

import threading
import time

from fleet_server.errors import RateLimitedError

MAX_TRACKED_CLIENTS = 100_000


class RateLimiter:
    """Allow ``rate_per_minute`` requests per client, with bursts up to the same number."""

    def __init__(self, rate_per_minute: int) -> None:
        self.capacity = float(rate_per_minute)
        self.refill_per_s = rate_per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, client: str, what: str = "requests") -> None:
        """Spend one token for ``client``; a :class:`RateLimitedError` (429) when none is left."""
        if not self.spend(client):
            raise RateLimitedError(f"too many {what} from {client}; retry in a minute")

    def spend(self, client: str) -> bool:
        """Spend one token for ``client`` if one is left; whether one was."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.refill_per_s)
            if tokens < 1.0:
                return False
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._buckets.clear()
            self._buckets[client] = (tokens - 1.0, now)
            return True

    def exhausted(self, client: str) -> bool:
        """Whether ``client`` has no token left now (a check that spends nothing)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.refill_per_s) < 1.0

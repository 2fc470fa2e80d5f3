"""Token buckets: the rate-limit arithmetic the server's admission control and the
client SDK (keycell.client) share.

A bucket holds up to `capacity` tokens and refills at `rate` tokens a second. Taking
is non-blocking: `take()` either spends the tokens and answers 0, or spends nothing
and answers how many seconds until they will be there (what `Retry-After` says and
what a client sleeps). The clock is injected so tests need no sleeping. Not
thread-safe by itself; callers that share a bucket across threads hold a lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    def __init__(
        self,
        rate: float,
        capacity: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else max(1.0, rate))
        if self.capacity <= 0:
            raise ValueError("capacity must be positive")
        self.clock = clock
        self._tokens = self.capacity
        self._at = clock()

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self.clock()
        if now > self._at:
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, n: float = 1.0, *, floor: float = 0.0) -> float:
        """Spend `n` tokens if that leaves at least `floor` in the bucket: answer 0.
        Otherwise spend nothing and answer the seconds until it would succeed. A
        `floor` keeps a reserve for more important callers (admission classes)."""
        if n > self.capacity:
            raise ValueError("cannot take more tokens than the bucket holds")
        self._refill()
        needed = n + floor
        if self._tokens >= needed:
            self._tokens -= n
            return 0.0
        return (needed - self._tokens) / self.rate

"""The client's policies, shared by the sync and async clients and watchers: retries
with decorrelated jitter, the renewal window, and a client-side rate limiter.

Decorrelated jitter (the AWS Architecture Blog's "Exponential Backoff and Jitter"):
    sleep = min(cap, random.uniform(base, previous_sleep * 3))
so a fleet that failed together does not retry together. When the server said
`Retry-After`, the client waits at least that long, plus a jittered slice of the
next backoff so the fleet told "1 s" does not return in the same millisecond.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from keycell.client.errors import ConnectionFailed, KeycellError, RateLimited, Sealed, Unavailable
from keycell.control_plane.ratelimit import TokenBucket


def decorrelated_jitter(
    previous: float, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """The next sleep: min(cap, uniform(base, previous * 3)), previous starting at base."""
    r = rng or random
    high = max(base, previous * 3)
    return min(cap, r.uniform(base, high))


@dataclass
class RetryPolicy:
    """Bounded retries for answers that may succeed later: 429, 503 (not sealed),
    502/504 and connection failures. `attempts` counts the first try."""

    attempts: int = 4
    base: float = 0.1
    cap: float = 10.0
    rng: random.Random = field(default_factory=random.Random)

    def retryable(self, error: KeycellError) -> bool:
        return isinstance(error, RateLimited | Unavailable | ConnectionFailed) and not isinstance(
            error, Sealed
        )

    def delay(self, previous: float, error: KeycellError) -> float:
        """Seconds to sleep before the next attempt, after `previous` slept last time
        (0 before the first retry)."""
        jittered = decorrelated_jitter(previous or self.base, base=self.base, cap=self.cap, rng=self.rng)
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            return float(retry_after) + self.rng.uniform(0, jittered)
        return jittered


@dataclass
class RenewalWindow:
    """When to renew a credential: at a uniformly random point between `low` and
    `high` of its TTL (default 50-80%), so credentials issued together are not
    renewed together."""

    low: float = 0.5
    high: float = 0.8
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high < 1:
            raise ValueError("the renewal window must satisfy 0 < low <= high < 1")

    def delay(self, ttl: float) -> float:
        return max(0.0, ttl) * self.rng.uniform(self.low, self.high)


class RateLimiter:
    """A client-side token bucket (thread-safe): `acquire()` waits for a token,
    `acquire_async()` does the same without blocking the event loop."""

    def __init__(
        self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.bucket = TokenBucket(rate, burst, clock=clock)
        self._lock = threading.Lock()

    def try_acquire(self) -> float:
        """0 when a token was taken, else the seconds to wait before trying again."""
        with self._lock:
            return self.bucket.take()

    def acquire(self, sleep: Callable[[float], None] = time.sleep) -> float:
        """Wait for a token; answer the seconds waited."""
        waited = 0.0
        while (wait := self.try_acquire()) > 0:
            sleep(wait)
            waited += wait
        return waited

    async def acquire_async(self) -> float:
        waited = 0.0
        while (wait := self.try_acquire()) > 0:
            await asyncio.sleep(wait)
            waited += wait
        return waited

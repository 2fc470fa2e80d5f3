"""Admission control: what the regional API does before a request reaches the router,
so a thundering herd cannot take the cell down.

Three defences, all per process (a self-hosted server has one set per worker; a
Lambda instance has its own):

- a global token bucket and one per identity (the digest of the caller's token, or
  its address when it sends none); past either, the answer is 429 with
  `Retry-After`, in Vault's error shape;
- priority classes: revocations are never rate limited (they shrink exposure);
  renewals may drain the global bucket to empty, ordinary requests only to a
  quarter of it, new issuance (logins, token creation, credential issue) only to
  half of it, so under pressure issuance is refused first and renewals last;
- a bounded in-flight window with a bounded priority queue (`AdmissionGate`, for
  the asyncio server): when full, the least important, newest waiter is shed.

Limits come from the environment (`AdmissionConfig.from_env`): KEYCELL_RATE_GLOBAL
and KEYCELL_RATE_PER_IDENTITY (requests a second, 0 turns the limit off),
KEYCELL_MAX_INFLIGHT and KEYCELL_MAX_QUEUE, and the largest request body,
KEYCELL_MAX_REQUEST_SIZE (bytes, Vault's `max_request_size`), and the time it may take
to arrive, KEYCELL_HTTP_READ_TIMEOUT (seconds, Vault's `http_read_timeout`). The
defaults are far above what one worker serves, so they only bite when configured or
under abuse.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum

from keycell.control_plane.errors import InvalidRequest, RateLimited
from keycell.control_plane.ratelimit import TokenBucket


class Priority(IntEnum):
    """Lower goes first."""

    REVOKE = 0
    RENEW = 1
    NORMAL = 2
    ISSUE = 3


# Part of the global bucket each class must leave for the classes above it.
_FLOOR = {Priority.REVOKE: 0.0, Priority.RENEW: 0.0, Priority.NORMAL: 0.25, Priority.ISSUE: 0.5}

_REVOKE = re.compile(r"(?:^|/)(?:revoke[a-z-]*|revoke)(?:/|$)")
_RENEW = re.compile(r"(?:^|/)renew(?:-self|-accessor)?(?:/|$)")
_ISSUE = re.compile(
    r"(?:^auth/[^/]+/login(?:/|$))|(?:^auth/token/create)|(?:/issue/)|(?:/creds/)|(?:^sys/wrapping/wrap$)"
)


def classify(method: str, path: str) -> Priority:
    """The class of a request, from its path below /v1/ (Vault's layout)."""
    path = path.strip("/")
    if method.upper() in ("GET", "HEAD", "LIST"):
        return Priority.NORMAL
    if _REVOKE.search(path):
        return Priority.REVOKE
    if _RENEW.search(path):
        return Priority.RENEW
    if _ISSUE.search(path):
        return Priority.ISSUE
    return Priority.NORMAL


def _env_number(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number, not {text!r}") from None
    if value < 0:
        raise InvalidRequest(f"{name} must not be negative")
    return value


@dataclass(frozen=True)
class AdmissionConfig:
    global_rate: float = 50_000.0  # requests a second per process; 0: no limit
    per_identity_rate: float = 10_000.0  # requests a second per identity per process; 0: no limit
    burst_seconds: float = 1.0  # bucket capacity, in seconds of rate
    max_inflight: int = 64  # requests admitted at once per worker (AdmissionGate)
    max_queue: int = 2048  # requests waiting for admission per worker
    max_identities: int = 65_536  # per-identity buckets kept (least recently used dropped)
    # Largest request body accepted, in bytes (Vault's listener `max_request_size`,
    # default 32 MiB); past it the answer is 413 before the rest is read.
    max_request_size: int = 32 * 1024 * 1024
    # Seconds a request body may take to arrive once admitted (Vault's listener
    # `http_read_timeout`, 30 s): a slow upload holds its admission slot at most this long.
    read_timeout: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AdmissionConfig:
        env = os.environ if env is None else env
        base = cls()
        return cls(
            global_rate=_env_number(env, "KEYCELL_RATE_GLOBAL", base.global_rate),
            per_identity_rate=_env_number(env, "KEYCELL_RATE_PER_IDENTITY", base.per_identity_rate),
            burst_seconds=_env_number(env, "KEYCELL_RATE_BURST_SECONDS", base.burst_seconds) or 1.0,
            max_inflight=max(1, int(_env_number(env, "KEYCELL_MAX_INFLIGHT", base.max_inflight))),
            max_queue=int(_env_number(env, "KEYCELL_MAX_QUEUE", base.max_queue)),
            max_request_size=max(1, int(_env_number(env, "KEYCELL_MAX_REQUEST_SIZE", base.max_request_size))),
            read_timeout=_env_number(env, "KEYCELL_HTTP_READ_TIMEOUT", base.read_timeout)
            or base.read_timeout,
        )


def identity_of(token: str | None, remote_addr: str) -> str:
    """Who is asking, without keeping the token: a digest of it, or the address."""
    if token:
        return "t:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    return "a:" + remote_addr


class RateLimits:
    """The global and per-identity buckets of one process. Thread-safe."""

    def __init__(self, config: AdmissionConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._global = (
            TokenBucket(config.global_rate, config.global_rate * config.burst_seconds, clock=clock)
            if config.global_rate > 0
            else None
        )
        self._identities: OrderedDict[str, TokenBucket] = OrderedDict()

    def _identity_bucket(self, identity: str) -> TokenBucket:
        bucket = self._identities.get(identity)
        if bucket is None:
            rate = self.config.per_identity_rate
            bucket = TokenBucket(rate, max(1.0, rate * self.config.burst_seconds), clock=self.clock)
            self._identities[identity] = bucket
            while len(self._identities) > self.config.max_identities:
                self._identities.popitem(last=False)
        else:
            self._identities.move_to_end(identity)
        return bucket

    def check(self, priority: Priority, identity: str) -> RateLimited | None:
        """None to admit, or the error to answer (not raised: the caller shapes it)."""
        if priority == Priority.REVOKE:
            return None
        with self._lock:
            if self.config.per_identity_rate > 0:
                wait = self._identity_bucket(identity).take()
                if wait > 0:
                    return RateLimited(
                        "rate limit exceeded for this client; slow down and retry after the "
                        "Retry-After header's seconds",
                        retry_after=wait,
                    )
            if self._global is not None:
                floor = min(_FLOOR[priority] * self._global.capacity, self._global.capacity - 1)
                wait = self._global.take(floor=max(0.0, floor))
                if wait > 0:
                    what = "new issuance is" if priority == Priority.ISSUE else "requests are"
                    return RateLimited(
                        f"the cell is under heavy load and {what} being shed first; retry after the "
                        "Retry-After header's seconds (renewals and revocations are still served)",
                        retry_after=wait,
                    )
        return None


class AdmissionGate:
    """Bounded in-flight requests with a bounded priority queue, for one asyncio loop.

    A request finding a free slot and nobody waiting is admitted at once (the common
    case: no cost on the hot path). Once the window is full, requests wait in priority
    order, not arrival order. When more than `max_queue` wait, the least important,
    newest waiter is shed (`enter()` answers False): the caller answers 429.
    """

    def __init__(self, max_inflight: int, max_queue: int) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.inflight = 0
        self.shed = 0
        self._waiting: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._seq = itertools.count()
        self._scheduled = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self, priority: Priority) -> bool:
        if not self._waiting and not self._scheduled and self.inflight < self.max_inflight:
            self.inflight += 1
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        heapq.heappush(self._waiting, (int(priority), next(self._seq), future))
        if len(self._waiting) > self.max_queue:
            self._shed_one()
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._dispatch)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                self.leave()
            raise

    def _shed_one(self) -> None:
        worst = max(self._waiting, key=lambda item: (item[0], item[1]))
        self._waiting.remove(worst)
        heapq.heapify(self._waiting)
        self.shed += 1
        if not worst[2].done():
            worst[2].set_result(False)

    def _dispatch(self) -> None:
        self._scheduled = False
        while self._waiting and self.inflight < self.max_inflight:
            _, _, future = heapq.heappop(self._waiting)
            if future.done():
                continue
            self.inflight += 1
            future.set_result(True)

    def leave(self) -> None:
        self.inflight -= 1
        if self._waiting and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

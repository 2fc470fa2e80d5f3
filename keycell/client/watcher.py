"""LifetimeWatcher: keeps a token or lease alive by renewing it at a random point of
a window of its TTL (default 50-80%), so a fleet issued credentials at the same
instant renews them spread out, not at the same second.

`RenewalPlan` is the scheduling logic; `LifetimeWatcher` (a thread, with `Client`)
and `AsyncLifetimeWatcher` (a task, with `AsyncClient`) only wait and call it.
The watcher stops when the credential is revoked (renewal answers 403, or the
lease is gone: 400/404), when it is not renewable any more or reached its max
TTL, when it expired while the server was refusing (429/503: retried with
decorrelated jitter honouring Retry-After, never past expiry), or on `stop()`.
Callbacks: `on_renew(credential)`, `on_error(error, retry_in)`, `on_stop(reason, error)`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keycell.client.errors import InvalidRequest, KeycellError, NotFound, PermissionDenied
from keycell.client.model import Credential
from keycell.client.policy import RenewalWindow, RetryPolicy

REVOKED = "revoked"
EXPIRED = "expired"
NOT_RENEWABLE = "not-renewable"
MAX_TTL = "max-ttl"
STOPPED = "stopped"
ERROR = "error"

OnRenew = Callable[[Credential], None]
OnError = Callable[[KeycellError, float], None]
OnStop = Callable[[str, KeycellError | None], None]


@dataclass
class Stop:
    reason: str
    error: KeycellError | None = None


@dataclass
class RenewalPlan:
    """When to renew next, decided from what happened. Pure, clock injected."""

    credential: Credential
    window: RenewalWindow = field(default_factory=RenewalWindow)
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(base=0.5, cap=30.0))
    clock: Callable[[], float] = time.time
    min_ttl: float = 1.0  # a renewal granting less than this means the max TTL is reached
    _previous_backoff: float = 0.0

    def first(self) -> float | Stop:
        if not self.credential.renewable:
            return Stop(NOT_RENEWABLE)
        return self._next_for(self.credential)

    def _next_for(self, credential: Credential) -> float:
        at = credential.obtained_at + self.window.delay(credential.ttl)
        return max(0.0, at - self.clock())

    def renewed(self, credential: Credential) -> float | Stop:
        self.credential = credential
        self._previous_backoff = 0.0
        if not credential.renewable:
            return Stop(NOT_RENEWABLE)
        if credential.ttl < self.min_ttl:
            return Stop(MAX_TTL)
        return self._next_for(credential)

    def failed(self, error: KeycellError) -> float | Stop:
        if isinstance(error, PermissionDenied | NotFound):
            return Stop(REVOKED, error)
        if isinstance(error, InvalidRequest):  # "lease not found or lease is not renewable"
            return Stop(REVOKED if "not found" in str(error).lower() else NOT_RENEWABLE, error)
        remaining = self.credential.remaining(self.clock())
        if remaining <= 0:
            return Stop(EXPIRED, error)
        if not self.retry.retryable(error):
            return Stop(ERROR, error)
        self._previous_backoff = self.retry.delay(self._previous_backoff, error)
        # Never sleep past the expiry: one last try just before it.
        return min(self._previous_backoff, max(0.0, remaining - 0.05))


class _Callbacks:
    def __init__(self, on_renew: OnRenew | None, on_error: OnError | None, on_stop: OnStop | None) -> None:
        self.on_renew = on_renew
        self.on_error = on_error
        self.on_stop = on_stop
        self.stop_reason: str | None = None
        self.renewals = 0

    def renew(self, credential: Credential) -> None:
        self.renewals += 1
        if self.on_renew:
            self.on_renew(credential)

    def error(self, error: KeycellError, delay: float) -> None:
        if self.on_error:
            self.on_error(error, delay)

    def stop(self, stop: Stop) -> None:
        self.stop_reason = stop.reason
        if self.on_stop:
            self.on_stop(stop.reason, stop.error)


class _WatcherBase:
    """What both watchers are made of: the client, the renewal plan, the callbacks."""

    def __init__(
        self,
        client: object,
        credential: Credential,
        *,
        window: RenewalWindow | None = None,
        retry: RetryPolicy | None = None,
        increment: int | None = None,
        on_renew: OnRenew | None = None,
        on_error: OnError | None = None,
        on_stop: OnStop | None = None,
    ) -> None:
        self.client = client
        self.plan = RenewalPlan(
            credential, window or RenewalWindow(), retry or RetryPolicy(base=0.5, cap=30.0)
        )
        self.increment = increment
        self.callbacks = _Callbacks(on_renew, on_error, on_stop)


class LifetimeWatcher(_WatcherBase):
    """Renew `credential` through a blocking `Client` in a daemon thread."""

    def __init__(self, client: object, credential: Credential, **options: Any) -> None:
        super().__init__(client, credential, **options)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def credential(self) -> Credential:
        return self.plan.credential

    @property
    def stop_reason(self) -> str | None:
        return self.callbacks.stop_reason

    @property
    def renewals(self) -> int:
        return self.callbacks.renewals

    def start(self) -> LifetimeWatcher:
        self._thread = threading.Thread(target=self._run, name="keycell-lifetime-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def revoked(self, subject: str) -> None:
        """The revocation stream named `subject`: stop now if it is this credential."""
        if subject in self.credential.subjects and self.callbacks.stop_reason is None:
            self._revoked = True
            self._stop.set()

    _revoked = False

    def _run(self) -> None:
        step = self.plan.first()
        while not isinstance(step, Stop):
            if self._stop.wait(step):
                break
            try:
                renewed = self.client.renew(self.plan.credential, self.increment, retry=False)  # type: ignore[attr-defined]
            except KeycellError as error:
                step = self.plan.failed(error)
                if not isinstance(step, Stop):
                    self.callbacks.error(error, step)
                continue
            step = self.plan.renewed(renewed)
            self.callbacks.renew(renewed)
        if not isinstance(step, Stop):
            step = Stop(REVOKED if self._revoked else STOPPED)
        self.callbacks.stop(step)


class AsyncLifetimeWatcher(_WatcherBase):
    """Renew `credential` through an `AsyncClient` in an asyncio task."""

    def __init__(self, client: object, credential: Credential, **options: Any) -> None:
        super().__init__(client, credential, **options)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._revoked = False

    @property
    def credential(self) -> Credential:
        return self.plan.credential

    @property
    def stop_reason(self) -> str | None:
        return self.callbacks.stop_reason

    def start(self) -> AsyncLifetimeWatcher:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def stop(self) -> None:
        self._stop.set()

    def revoked(self, subject: str) -> None:
        if subject in self.credential.subjects:
            self._revoked = True
            self._stop.set()

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        step = self.plan.first()
        while not isinstance(step, Stop):
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=step)
                break
            except TimeoutError:
                pass
            try:
                renewed = await self.client.renew(self.plan.credential, self.increment, retry=False)  # type: ignore[attr-defined]
            except KeycellError as error:
                step = self.plan.failed(error)
                if not isinstance(step, Stop):
                    self.callbacks.error(error, step)
                continue
            step = self.plan.renewed(renewed)
            self.callbacks.renew(renewed)
        if not isinstance(step, Stop):
            step = Stop(REVOKED if self._revoked else STOPPED)
        self.callbacks.stop(step)

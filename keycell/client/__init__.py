"""Keycell's Python client: one model, blocking (`Client`) and asyncio (`AsyncClient`).

- token auth, or JWT-SVID login (`role=` and `jwt_source=`, a callable that returns a
  fresh JWT: the SPIFFE Workload API, or a projected file);
- KV v2, transit, token and lease renewal and revocation;
- retries with decorrelated jitter honouring `Retry-After`, a client-side token
  bucket (`RateLimiter`), bounded attempts;
- `LifetimeWatcher` / `AsyncLifetimeWatcher`: renewal at a random point of 50-80% of
  the TTL, stopping on revocation;
- `WrappedSecretCache`: unwrap once, reuse until expiry, across restarts;
- `RevocationSubscription`: the server's revocation stream; a revoked credential is
  dropped at once.
Errors are `KeycellError` subclasses that say what to do (errors.py).
"""

from keycell.client.cache import WrappedSecretCache, wrapping_key
from keycell.client.client import AsyncClient, Client
from keycell.client.errors import (
    ConnectionFailed,
    CredentialRevoked,
    InvalidRequest,
    KeycellError,
    NotFound,
    PermissionDenied,
    RateLimited,
    Sealed,
    ServerError,
    Unavailable,
)
from keycell.client.events import RevocationSubscription
from keycell.client.model import Credential
from keycell.client.policy import RateLimiter, RenewalWindow, RetryPolicy, decorrelated_jitter
from keycell.client.watcher import AsyncLifetimeWatcher, LifetimeWatcher, RenewalPlan
from keycell.control_plane.ratelimit import TokenBucket

__all__ = [
    "AsyncClient",
    "AsyncLifetimeWatcher",
    "Client",
    "ConnectionFailed",
    "Credential",
    "CredentialRevoked",
    "InvalidRequest",
    "KeycellError",
    "LifetimeWatcher",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RateLimiter",
    "RenewalPlan",
    "RenewalWindow",
    "RetryPolicy",
    "RevocationSubscription",
    "Sealed",
    "ServerError",
    "TokenBucket",
    "Unavailable",
    "WrappedSecretCache",
    "decorrelated_jitter",
    "wrapping_key",
]

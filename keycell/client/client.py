"""`Client` (blocking) and `AsyncClient` (asyncio): the same operations (model.py),
the same retry and rate-limit policy (policy.py), two ways of waiting."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from keycell.client.errors import CredentialRevoked, KeycellError
from keycell.client.model import Call, Credential, Operations, decode
from keycell.client.policy import RateLimiter, RetryPolicy
from keycell.client.transport import Transport

T = TypeVar("T")

JwtSource = Callable[[], str]  # returns a fresh JWT-SVID (the SPIFFE Workload API, or a file)


class _Base(Operations):
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        role: str | None = None,
        jwt_source: JwtSource | None = None,
        jwt_mount: str = "jwt",
        retry: RetryPolicy | None = None,
        rate_limiter: RateLimiter | None = None,
        timeout: float = 30.0,
        verify: bool | str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # verify: a CA bundle, True, False, or None for $VAULT_CACERT (transport.tls_context).
        self.transport = Transport(self.url, timeout=timeout, verify=verify)
        self.retry = retry or RetryPolicy()
        self.rate_limiter = rate_limiter
        self.role = role
        self.jwt_source = jwt_source
        self.jwt_mount = jwt_mount
        self.credential: Credential | None = None
        self._token = token
        self._revoked: set[str] = set()
        self._lock = threading.Lock()
        self.requests_sent = 0  # every HTTP request, retries included
        self.logins = 0  # authentication requests (auth/*/login) sent

    # --- the credential ---------------------------------------------------------------

    @property
    def token(self) -> str | None:
        return self._token

    @token.setter
    def token(self, value: str | None) -> None:
        self._token = value
        self.credential = None

    def use_credential(self, credential: Credential) -> None:
        """Authenticate with `credential` (a token) from now on."""
        if any(s in self._revoked for s in credential.subjects):
            raise CredentialRevoked(["this credential was revoked"])
        self._token = credential.id
        self.credential = credential

    def revoked(self, subject: str) -> bool:
        """Called with each revocation heard (the revocation stream): drop the
        credential at once if it is the one named. True when it was."""
        with self._lock:
            self._revoked.add(subject)
            if self.credential is not None and subject in self.credential.subjects:
                self.credential = None
                self._token = None
                return True
        return False

    def _headers(self, call: Call[Any]) -> dict[str, str]:
        headers = dict(call.headers)
        token = call.token if call.token is not None else (self._token if call.authenticated else None)
        if call.authenticated and token is None and call.token is None:
            raise CredentialRevoked(["the client holds no token (it was revoked or never set): log in"])
        if token:
            headers["X-Vault-Token"] = token
        return headers

    def _count(self, call: Call[Any]) -> None:
        self.requests_sent += 1
        if call.path.endswith("/login"):
            self.logins += 1


class Client(_Base):
    """The blocking client. Thread-safe: each thread keeps its own connection."""

    def run(self, call: Call[T], *, retry: bool = True) -> T:
        previous = 0.0
        attempts = self.retry.attempts if retry else 1
        for attempt in range(1, attempts + 1):
            if self.rate_limiter is not None:
                self.rate_limiter.acquire()
            headers = self._headers(call)
            self._count(call)
            try:
                response = self.transport.send(call.method, call.path, headers, call.body)
                return decode(call, response)  # type: ignore[no-any-return]
            except KeycellError as error:
                if attempt == attempts or not self.retry.retryable(error):
                    raise
                previous = self.retry.delay(previous, error)
                time.sleep(previous)
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.run(Call(method, path, lambda b: b or {}, body))

    def login(self, *, wrap_ttl: str | None = None) -> Credential:
        """JWT-SVID login with `role` and a JWT from `jwt_source`; the token is used from now on."""
        if self.jwt_source is None or self.role is None:
            raise ValueError("login needs role= and jwt_source=")
        credential = self.run(self.call_login_jwt(self.role, self.jwt_source(), mount=self.jwt_mount))
        self.use_credential(credential)
        return credential  # type: ignore[no-any-return]

    def login_wrapped(self, wrap_ttl: str = "300s") -> dict[str, Any]:
        """JWT login answered wrapped: the wrap_info (unwrap it, or hand it to a cache)."""
        if self.jwt_source is None or self.role is None:
            raise ValueError("login needs role= and jwt_source=")
        return self.run(
            self.call_login_jwt(self.role, self.jwt_source(), mount=self.jwt_mount, wrap_ttl=wrap_ttl)
        )

    def create_token(self, **options: Any) -> Any:
        return self.run(self.call_create_token(**options))

    def unwrap(self, wrapping_token: str) -> dict[str, Any]:
        return self.run(self.call_unwrap(wrapping_token), retry=False)  # unwrapping is once only

    def lookup_self(self) -> dict[str, Any]:
        return self.run(self.call_lookup_self())

    def renew(
        self, credential: Credential | None = None, increment: int | None = None, *, retry: bool = True
    ) -> Credential:
        held = credential or self.credential
        if held is None:
            raise CredentialRevoked(["no credential to renew"])
        renewed = self.run(self.call_renew(held, increment), retry=retry)
        if held is self.credential:
            self.credential = renewed
        return renewed

    def revoke(self, credential: Credential | None = None) -> None:
        held = credential or self.credential
        if held is None:
            return
        self.run(self.call_revoke(held))

    def kv_read(self, path: str, *, mount: str = "secret", version: int | None = None) -> dict[str, Any]:
        return self.run(self.call_kv_read(path, mount=mount, version=version))

    def kv_write(
        self, path: str, data: dict[str, Any], *, mount: str = "secret", cas: int | None = None
    ) -> dict[str, Any]:
        return self.run(self.call_kv_write(path, data, mount=mount, cas=cas))

    def encrypt(self, key: str, plaintext: bytes, *, mount: str = "transit") -> str:
        return self.run(self.call_encrypt(key, plaintext, mount=mount))

    def decrypt(self, key: str, ciphertext: str, *, mount: str = "transit") -> bytes:
        return self.run(self.call_decrypt(key, ciphertext, mount=mount))

    def close(self) -> None:
        self.transport.close()


class AsyncClient(_Base):
    """The asyncio client: the same operations; requests run in worker threads
    (asyncio.to_thread) so the event loop never blocks; waits are asyncio sleeps."""

    async def run(self, call: Call[T], *, retry: bool = True) -> T:
        previous = 0.0
        attempts = self.retry.attempts if retry else 1
        for attempt in range(1, attempts + 1):
            if self.rate_limiter is not None:
                await self.rate_limiter.acquire_async()
            headers = self._headers(call)
            self._count(call)
            try:
                response = await asyncio.to_thread(
                    self.transport.send, call.method, call.path, headers, call.body
                )
                return decode(call, response)  # type: ignore[no-any-return]
            except KeycellError as error:
                if attempt == attempts or not self.retry.retryable(error):
                    raise
                previous = self.retry.delay(previous, error)
                await asyncio.sleep(previous)
        raise AssertionError("unreachable")

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.run(Call(method, path, lambda b: b or {}, body))

    async def login(self) -> Credential:
        if self.jwt_source is None or self.role is None:
            raise ValueError("login needs role= and jwt_source=")
        jwt = await asyncio.to_thread(self.jwt_source)
        credential: Credential = await self.run(self.call_login_jwt(self.role, jwt, mount=self.jwt_mount))
        self.use_credential(credential)
        return credential

    async def create_token(self, **options: Any) -> Any:
        return await self.run(self.call_create_token(**options))

    async def unwrap(self, wrapping_token: str) -> dict[str, Any]:
        return await self.run(self.call_unwrap(wrapping_token), retry=False)

    async def lookup_self(self) -> dict[str, Any]:
        return await self.run(self.call_lookup_self())

    async def renew(
        self, credential: Credential | None = None, increment: int | None = None, *, retry: bool = True
    ) -> Credential:
        held = credential or self.credential
        if held is None:
            raise CredentialRevoked(["no credential to renew"])
        renewed = await self.run(self.call_renew(held, increment), retry=retry)
        if held is self.credential:
            self.credential = renewed
        return renewed

    async def revoke(self, credential: Credential | None = None) -> None:
        held = credential or self.credential
        if held is not None:
            await self.run(self.call_revoke(held))

    async def kv_read(
        self, path: str, *, mount: str = "secret", version: int | None = None
    ) -> dict[str, Any]:
        return await self.run(self.call_kv_read(path, mount=mount, version=version))

    async def kv_write(
        self, path: str, data: dict[str, Any], *, mount: str = "secret", cas: int | None = None
    ) -> dict[str, Any]:
        return await self.run(self.call_kv_write(path, data, mount=mount, cas=cas))

    async def encrypt(self, key: str, plaintext: bytes, *, mount: str = "transit") -> str:
        return await self.run(self.call_encrypt(key, plaintext, mount=mount))

    async def decrypt(self, key: str, ciphertext: str, *, mount: str = "transit") -> bytes:
        return await self.run(self.call_decrypt(key, ciphertext, mount=mount))

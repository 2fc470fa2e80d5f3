"""The request/response model both clients share: what each operation sends and how
its answer is read. No I/O here: `Client` and `AsyncClient` only move bytes."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from keycell.client.errors import KeycellError, error_for

T = TypeVar("T")


@dataclass(frozen=True)
class Credential:
    """A token or a lease the client holds and may renew. `ttl` is seconds from
    `obtained_at` (time.time()); `id` is the token itself for a token (never logged)
    or the lease id for a lease."""

    kind: str  # "token" or "lease"
    id: str = field(repr=False)
    ttl: float
    renewable: bool
    accessor: str = ""
    lease_id: str = ""
    policies: tuple[str, ...] = ()
    obtained_at: float = field(default_factory=time.time)

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.ttl

    def remaining(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)

    @property
    def subjects(self) -> tuple[str, ...]:
        """The names it has in the revocation set."""
        names = []
        if self.accessor:
            names.append(f"token:{self.accessor}")
        if self.lease_id:
            names.append(f"lease:{self.lease_id}")
        if self.kind == "lease" and not self.lease_id:
            names.append(f"lease:{self.id}")
        return tuple(names)


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API call: what to send, and how to read a successful answer."""

    method: str
    path: str  # below /v1/
    parse: Callable[[dict[str, Any] | None], T]
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # overrides the client's token (unwrap takes the wrapping token)
    authenticated: bool = True


def retry_after(headers: dict[str, str]) -> float | None:
    text = headers.get("retry-after")
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        return None


def decode(call: Call[Any], response: Response) -> Any:
    """The parsed result, or the error for the status."""
    payload: dict[str, Any] | None = None
    if response.body:
        try:
            loaded = json.loads(response.body)
        except ValueError:
            loaded = None
        payload = loaded if isinstance(loaded, dict) else None
    if 200 <= response.status < 300:
        return call.parse(payload)
    errors = [str(e) for e in (payload or {}).get("errors") or []]
    raise error_for(response.status, errors, retry_after=retry_after(response.headers), path=call.path)


def auth_credential(body: dict[str, Any] | None) -> Credential:
    auth = (body or {}).get("auth")
    if not isinstance(auth, dict) or not auth.get("client_token"):
        raise KeycellError(["the answer carries no auth block"], path="")
    return Credential(
        kind="token",
        id=str(auth["client_token"]),
        ttl=float(auth.get("lease_duration") or 0),
        renewable=bool(auth.get("renewable")),
        accessor=str(auth.get("accessor") or ""),
        lease_id=str(auth.get("lease_id") or ""),
        policies=tuple(auth.get("policies") or ()),
    )


def _data(body: dict[str, Any] | None) -> dict[str, Any]:
    data = (body or {}).get("data")
    return data if isinstance(data, dict) else {}


def _none(body: dict[str, Any] | None) -> None:
    return None


def _body(body: dict[str, Any] | None) -> dict[str, Any]:
    return body or {}


def _wrap_info(body: dict[str, Any] | None) -> dict[str, Any]:
    info = (body or {}).get("wrap_info")
    if not isinstance(info, dict) or not info.get("token"):
        raise KeycellError(["the answer is not wrapped (no wrap_info)"])
    return info


def _p(path: str) -> str:
    return quote(path.strip("/"), safe="/")


class Operations:
    """The API operations as `Call`s. Both clients inherit these and add `_run`."""

    @staticmethod
    def call_login_jwt(role: str, jwt: str, *, mount: str = "jwt", wrap_ttl: str | None = None) -> Call[Any]:
        headers = {"X-Vault-Wrap-TTL": wrap_ttl} if wrap_ttl else {}
        parse: Callable[[dict[str, Any] | None], Any] = _wrap_info if wrap_ttl else auth_credential
        return Call(
            "POST", f"auth/{_p(mount)}/login", parse, {"role": role, "jwt": jwt}, headers, authenticated=False
        )

    @staticmethod
    def call_create_token(
        *,
        policies: list[str] | None = None,
        ttl: str | None = None,
        wrap_ttl: str | None = None,
        **extra: Any,
    ) -> Call[Any]:
        body: dict[str, Any] = dict(extra)
        if policies is not None:
            body["policies"] = policies
        if ttl is not None:
            body["ttl"] = ttl
        headers = {"X-Vault-Wrap-TTL": wrap_ttl} if wrap_ttl else {}
        return Call("POST", "auth/token/create", _wrap_info if wrap_ttl else auth_credential, body, headers)

    @staticmethod
    def call_unwrap(wrapping_token: str) -> Call[dict[str, Any]]:
        return Call("POST", "sys/wrapping/unwrap", _body, None, token=wrapping_token, authenticated=False)

    @staticmethod
    def call_lookup_self() -> Call[dict[str, Any]]:
        return Call("GET", "auth/token/lookup-self", _data)

    @staticmethod
    def call_renew(credential: Credential, increment: int | None = None) -> Call[Credential]:
        body: dict[str, Any] = {} if increment is None else {"increment": increment}
        if credential.kind == "token":

            def parse_token(answer: dict[str, Any] | None) -> Credential:
                renewed = auth_credential(answer)
                return Credential(
                    "token",
                    credential.id,
                    renewed.ttl,
                    renewed.renewable,
                    renewed.accessor or credential.accessor,
                    credential.lease_id,
                    renewed.policies or credential.policies,
                )

            return Call("POST", "auth/token/renew-self", parse_token, body, token=credential.id)

        def parse_lease(answer: dict[str, Any] | None) -> Credential:
            answer = answer or {}
            return Credential(
                "lease",
                credential.id,
                float(answer.get("lease_duration") or 0),
                bool(answer.get("renewable")),
                credential.accessor,
                credential.lease_id,
                credential.policies,
            )

        return Call("POST", "sys/leases/renew", parse_lease, {"lease_id": credential.id, **body})

    @staticmethod
    def call_revoke(credential: Credential) -> Call[None]:
        if credential.kind == "token":
            return Call("POST", "auth/token/revoke-self", _none, {}, token=credential.id)
        return Call("POST", "sys/leases/revoke", _none, {"lease_id": credential.id})

    @staticmethod
    def call_kv_read(path: str, *, mount: str = "secret", version: int | None = None) -> Call[dict[str, Any]]:
        suffix = f"?version={int(version)}" if version is not None else ""
        return Call("GET", f"{_p(mount)}/data/{_p(path)}{suffix}", _data)

    @staticmethod
    def call_kv_write(
        path: str, data: dict[str, Any], *, mount: str = "secret", cas: int | None = None
    ) -> Call[dict[str, Any]]:
        body: dict[str, Any] = {"data": data}
        if cas is not None:
            body["options"] = {"cas": cas}
        return Call("POST", f"{_p(mount)}/data/{_p(path)}", _data, body)

    @staticmethod
    def call_encrypt(key: str, plaintext: bytes, *, mount: str = "transit") -> Call[str]:
        body = {"plaintext": base64.b64encode(plaintext).decode()}
        return Call("POST", f"{_p(mount)}/encrypt/{_p(key)}", lambda b: str(_data(b)["ciphertext"]), body)

    @staticmethod
    def call_decrypt(key: str, ciphertext: str, *, mount: str = "transit") -> Call[bytes]:
        return Call(
            "POST",
            f"{_p(mount)}/decrypt/{_p(key)}",
            lambda b: base64.b64decode(_data(b)["plaintext"]),
            {"ciphertext": ciphertext},
        )

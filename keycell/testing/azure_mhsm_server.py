"""A local Azure Managed HSM: the Key Vault Keys REST API over HTTPS, on 127.0.0.1.

It exists so the real azure-keyvault-keys SDK (`KeyClient`, `CryptographyClient`)
can be tested over real sockets without an Azure subscription. It plays the HSM: key
material is generated in the server process with pyca/cryptography and never leaves
it; only public keys are ever returned.

The subset served is what the SDK sends for these operations (api-version 7.x and
2025-07-01), with the documented JSON shapes, base64url fields, status codes and
error bodies `{"error": {"code", "message"}}`:

    POST  /keys/{name}/create                   create a key, or a new version of it
    GET   /keys                                 list keys (paged)
    GET   /keys/{name}[/]                       the newest version
    GET   /keys/{name}/versions                 list versions (paged, nextLink)
    GET   /keys/{name}/{version}                one version
    PATCH /keys/{name}[/{version}]              attributes (enabled, exp, nbf), tags, key_ops
    POST  /keys/{name}/{version}/encrypt        A128GCM/A192GCM/A256GCM with oct-HSM keys
    POST  /keys/{name}/{version}/decrypt
    POST  /keys/{name}/{version}/sign           ES256/ES384/ES512, RS256/384/512, PS256/384/512
    POST  /keys/{name}/{version}/verify

Authentication follows Key Vault's challenge protocol: any request without a valid
`Authorization: Bearer <token>` gets 401 with a `WWW-Authenticate: Bearer
authorization="https://login.microsoftonline.com/<tenant>",
resource="https://managedhsm.azure.net"` challenge. TLS only: the certificate is
issued at start by a throwaway CA whose PEM (`ca_path`) clients use as their CA bundle.
Clients must pass `verify_challenge_resource=False`: 127.0.0.1 is not a subdomain of
managedhsm.azure.net.

Where the documentation is silent the choices are marked "emulator choice" below.

Run by hand with `python -m keycell.testing.azure_mhsm_server --cert-dir DIR`; it
prints `READY <port>` once it listens.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from azure.core.credentials import AccessToken
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keycell.testing.local_tls import write_certificates
from keycell.testing.processes import ManagedServer, ServerProcess, announce_ready

TENANT_ID = "00000000-0000-4000-8000-00000000c311"  # a made-up tenant
RESOURCE = "https://managedhsm.azure.net"
DEFAULT_TOKEN = "test-token"  # noqa: S105 - a test stand-in, accepted only by this emulator
# What the installed SDK may send; older 7.x versions share the same shapes.
API_VERSIONS = frozenset({"7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"})
SERVICE_VERSION = "1.9.1445.1"  # reported in x-ms-keyvault-service-version, as the service does
PAGE_SIZE = 25  # the documented default and maximum of `maxresults`
_KEY_NAME = re.compile(r"[0-9a-zA-Z-]{1,127}")
_VERSION_ID = re.compile(r"[0-9a-f]{32}")
_GCM_IV_BYTES = 12
_GCM_TAG_BYTES = 16


class StubTokenCredential:
    """A `TokenCredential` for tests: always the same bearer token, never a real one.
    Records the scopes and tenants it was asked for, so tests can check the challenge."""

    def __init__(self, token: str = DEFAULT_TOKEN) -> None:
        self.token = token
        self.requests: list[tuple[tuple[str, ...], str | None]] = []
        self._lock = threading.Lock()

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        with self._lock:
            self.requests.append((scopes, tenant_id))
        return AccessToken(self.token, int(time.time()) + 3600)


# --- the HSM's state ------------------------------------------------------------------------


class ApiError(Exception):
    """An error reply: status, Key Vault error code, message, optional inner code."""

    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.inner = status, code, message, inner

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(value: object, field_name: str) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, "BadParameter", f"Property '{field_name}' must be a base64url string.")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError):
        raise ApiError(400, "BadParameter", f"Property '{field_name}' is not valid base64url.") from None


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


_CURVES: dict[str, tuple[ec.EllipticCurve, str, hashes.HashAlgorithm]] = {
    "P-256": (ec.SECP256R1(), "ES256", hashes.SHA256()),
    "P-384": (ec.SECP384R1(), "ES384", hashes.SHA384()),
    "P-521": (ec.SECP521R1(), "ES512", hashes.SHA512()),
}
_RSA_HASHES: dict[str, hashes.HashAlgorithm] = {
    "256": hashes.SHA256(),
    "384": hashes.SHA384(),
    "512": hashes.SHA512(),
}
_DEFAULT_OPS = {
    "oct-HSM": ["encrypt", "decrypt", "wrapKey", "unwrapKey"],
    "EC-HSM": ["sign", "verify"],
    "RSA-HSM": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
}


@dataclass
class _Version:
    id: str
    kty: str
    secret: Any  # AES key bytes or a private key object: it never leaves this process
    key_ops: list[str]
    curve: str | None
    created: int
    updated: int
    enabled: bool = True
    nbf: int | None = None
    exp: int | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "enabled": self.enabled,
            "created": self.created,
            "updated": self.updated,
            "recoveryLevel": "CustomizedRecoverable+Purgeable",
            "recoverableDays": 90,
            "exportable": False,
        }
        if self.nbf is not None:
            attrs["nbf"] = self.nbf
        if self.exp is not None:
            attrs["exp"] = self.exp
        return attrs

    def jwk(self, kid: str) -> dict[str, Any]:
        jwk: dict[str, Any] = {"kid": kid, "kty": self.kty, "key_ops": list(self.key_ops)}
        if self.kty == "EC-HSM":
            numbers = self.secret.public_key().public_numbers()
            size = (self.secret.curve.key_size + 7) // 8
            jwk |= {"crv": self.curve, "x": _b64(numbers.x.to_bytes(size, "big"))}
            jwk["y"] = _b64(numbers.y.to_bytes(size, "big"))
        elif self.kty == "RSA-HSM":
            numbers = self.secret.public_key().public_numbers()
            jwk |= {"n": _b64(_int_bytes(numbers.n)), "e": _b64(_int_bytes(numbers.e))}
        return jwk  # oct-HSM: no "k", the material is not exportable


@dataclass
class _Key:
    name: str
    versions: list[_Version] = field(default_factory=list)  # creation order; the last is current

    def version(self, version_id: str) -> _Version:
        if not version_id:
            return self.versions[-1]
        for v in self.versions:
            if v.id == version_id:
                return v
        raise _not_found(self.name, version_id)


def _not_found(name: str, version: str = "") -> ApiError:
    ident = f"{name}/{version}" if version else name
    return ApiError(
        404,
        "KeyNotFound",
        f"A key with (name/id) {ident} was not found in this key vault. If you recently deleted this "
        "key you may be able to recover it using the correct recovery command.",
    )


class ManagedHsm:
    """The keys of one emulated Managed HSM, safe to use from many handler threads."""

    def __init__(self) -> None:
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()

    def _key(self, name: str) -> _Key:
        key = self._keys.get(name)
        if key is None:
            raise _not_found(name)
        return key

    def create(self, name: str, body: dict[str, Any]) -> tuple[_Key, _Version]:
        kty = body.get("kty")
        if kty not in _DEFAULT_OPS:
            # Emulator choice: a Managed HSM holds HSM-protected keys only.
            raise ApiError(
                400, "BadParameter", f"Key type '{kty}' is not supported; use oct-HSM, EC-HSM or RSA-HSM."
            )
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ApiError(400, "BadParameter", "Property 'attributes' must be an object.")
        if attributes.get("exportable") and not body.get("release_policy"):
            raise ApiError(400, "BadParameter", "An exportable key requires a release policy.")
        curve = None
        if kty == "oct-HSM":
            size = body.get("key_size") or 256
            if size not in (128, 192, 256):
                raise ApiError(400, "BadParameter", "oct-HSM keys are 128, 192 or 256 bits.")
            secret: Any = AESGCM.generate_key(bit_length=size)
        elif kty == "EC-HSM":
            curve = body.get("crv") or "P-256"
            if curve not in _CURVES:
                raise ApiError(400, "BadParameter", f"Curve '{curve}' is not supported.")
            secret = ec.generate_private_key(_CURVES[curve][0])
        else:
            size = body.get("key_size") or 2048
            exponent = body.get("public_exponent") or 65537
            if size not in (2048, 3072, 4096) or exponent not in (3, 65537):
                raise ApiError(
                    400, "BadParameter", "RSA-HSM keys are 2048, 3072 or 4096 bits, exponent 65537."
                )
            secret = rsa.generate_private_key(public_exponent=exponent, key_size=size)
        key_ops = body.get("key_ops") or list(_DEFAULT_OPS[kty])
        tags = _tags(body.get("tags"))
        now = int(time.time())
        version = _Version(uuid.uuid4().hex, kty, secret, list(key_ops), curve, now, now, tags=tags)
        _apply_attributes(version, attributes)
        with self._lock:
            key = self._keys.setdefault(name, _Key(name))
            key.versions.append(version)
            return key, version

    def get(self, name: str, version_id: str) -> tuple[_Key, _Version]:
        with self._lock:
            key = self._key(name)
            return key, key.version(version_id)

    def versions(self, name: str) -> list[_Version]:
        # Emulator choice: the versions of a key that does not exist are an empty list.
        with self._lock:
            key = self._keys.get(name)
            return list(key.versions) if key else []

    def names(self) -> list[tuple[str, _Version]]:
        with self._lock:
            return [(k.name, k.versions[-1]) for k in sorted(self._keys.values(), key=lambda k: k.name)]

    def update(self, name: str, version_id: str, body: dict[str, Any]) -> tuple[_Key, _Version]:
        attributes = body.get("attributes") or {}
        if not isinstance(attributes, dict):
            raise ApiError(400, "BadParameter", "Property 'attributes' must be an object.")
        tags = _tags(body.get("tags")) if body.get("tags") is not None else None
        with self._lock:
            key = self._key(name)
            version = key.version(version_id)
            _apply_attributes(version, attributes)
            if tags is not None:
                version.tags = tags  # tags are replaced as a whole, as the service does
            if body.get("key_ops"):
                version.key_ops = list(body["key_ops"])
            version.updated = int(time.time())
            return key, version

    def usable(self, name: str, version_id: str, operation: str) -> _Version:
        with self._lock:
            version = self._key(name).version(version_id)
            enabled, key_ops = version.enabled, version.key_ops
        if not enabled:
            raise ApiError(
                403, "Forbidden", f"Operation {operation} is not allowed on a disabled key.", "KeyDisabled"
            )
        now = time.time()
        if (version.nbf is not None and now < version.nbf) or (version.exp is not None and now > version.exp):
            raise ApiError(
                403, "Forbidden", f"Operation {operation} is not allowed on an expired key.", "KeyExpired"
            )
        if operation not in key_ops:
            raise ApiError(403, "Forbidden", f"Operation {operation} is not permitted on this key.")
        return version


def _tags(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ApiError(400, "BadParameter", "Property 'tags' must map strings to strings.")
    if len(value) > 15:
        raise ApiError(400, "BadParameter", "A key has at most 15 tags.")
    return dict(value)


def _apply_attributes(version: _Version, attributes: dict[str, Any]) -> None:
    if "enabled" in attributes and attributes["enabled"] is not None:
        version.enabled = bool(attributes["enabled"])
    for name in ("nbf", "exp"):
        if name in attributes:
            setattr(version, name, attributes[name])


# --- cryptographic operations ----------------------------------------------------------------


def _encrypt(version: _Version, body: dict[str, Any]) -> dict[str, Any]:
    alg = body.get("alg")
    _aes_gcm_bits(version, alg)
    if body.get("iv"):
        raise ApiError(400, "BadParameter", f"An iv must not be supplied with {alg}: the HSM generates it.")
    plaintext = _unb64(body.get("value"), "value")
    aad = _unb64(body["aad"], "aad") if body.get("aad") else None
    iv = os.urandom(_GCM_IV_BYTES)
    sealed = AESGCM(version.secret).encrypt(iv, plaintext, aad)
    result = {"value": _b64(sealed[:-_GCM_TAG_BYTES]), "iv": _b64(iv), "tag": _b64(sealed[-_GCM_TAG_BYTES:])}
    if aad:
        result["aad"] = _b64(aad)
    return result


def _decrypt(version: _Version, body: dict[str, Any]) -> dict[str, Any]:
    alg = body.get("alg")
    _aes_gcm_bits(version, alg)
    ciphertext = _unb64(body.get("value"), "value")
    iv = _unb64(body.get("iv"), "iv")
    tag = _unb64(body.get("tag"), "tag")
    aad = _unb64(body["aad"], "aad") if body.get("aad") else None
    if len(iv) != _GCM_IV_BYTES or len(tag) != _GCM_TAG_BYTES:
        raise ApiError(400, "BadParameter", f"{alg} takes a 12-byte iv and a 16-byte tag.")
    try:
        plaintext = AESGCM(version.secret).decrypt(iv, ciphertext + tag, aad)
    except InvalidTag:
        # Emulator choice (not documented): a failed tag check is a bad parameter, 400.
        raise ApiError(
            400, "BadParameter", "Decryption failed: the authentication tag does not match."
        ) from None
    return {"value": _b64(plaintext)}


def _aes_gcm_bits(version: _Version, alg: object) -> int:
    match = re.fullmatch(r"A(128|192|256)GCM", alg) if isinstance(alg, str) else None
    if version.kty != "oct-HSM" or match is None:
        raise ApiError(400, "BadParameter", f"Algorithm '{alg}' is not supported for a {version.kty} key.")
    bits = int(match.group(1))
    if bits != len(version.secret) * 8:
        raise ApiError(400, "BadParameter", f"Algorithm '{alg}' does not match the key size.")
    return bits


def _signature_scheme(version: _Version, alg: object) -> tuple[str, hashes.HashAlgorithm]:
    """("ec" | "pkcs1" | "pss", hash) for a JWA signature algorithm valid for the key."""
    if not isinstance(alg, str):
        raise ApiError(400, "BadParameter", "Property 'alg' is required.")
    if version.kty == "EC-HSM":
        assert version.curve is not None
        _, expected, digest = _CURVES[version.curve]
        if alg == expected:
            return "ec", digest
    elif version.kty == "RSA-HSM" and alg[:2] in ("RS", "PS") and alg[2:] in _RSA_HASHES:
        return ("pkcs1" if alg.startswith("RS") else "pss"), _RSA_HASHES[alg[2:]]
    raise ApiError(400, "BadParameter", f"Algorithm '{alg}' is not supported for a {version.kty} key.")


def _checked_digest(body: dict[str, Any], field_name: str, digest: hashes.HashAlgorithm) -> bytes:
    value = _unb64(body.get(field_name), field_name)
    if len(value) != digest.digest_size:
        raise ApiError(
            400, "BadParameter", f"The digest must be {digest.digest_size} bytes for this algorithm."
        )
    return value


def _sign(version: _Version, body: dict[str, Any]) -> dict[str, Any]:
    scheme, digest = _signature_scheme(version, body.get("alg"))
    value = _checked_digest(body, "value", digest)
    prehashed = utils.Prehashed(digest)
    if scheme == "ec":
        r, s = utils.decode_dss_signature(version.secret.sign(value, ec.ECDSA(prehashed)))
        size = (version.secret.curve.key_size + 7) // 8
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")  # JWA: raw R || S
    elif scheme == "pkcs1":
        signature = version.secret.sign(value, padding.PKCS1v15(), prehashed)
    else:
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.DIGEST_LENGTH)
        signature = version.secret.sign(value, pss, prehashed)
    return {"value": _b64(signature)}


def _verify(version: _Version, body: dict[str, Any]) -> dict[str, Any]:
    scheme, digest = _signature_scheme(version, body.get("alg"))
    value = _checked_digest(body, "digest", digest)
    signature = _unb64(body.get("value"), "value")
    public = version.secret.public_key()
    prehashed = utils.Prehashed(digest)
    try:
        if scheme == "ec":
            size = (version.secret.curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                return {"value": False}
            r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            public.verify(utils.encode_dss_signature(r, s), value, ec.ECDSA(prehashed))
        elif scheme == "pkcs1":
            public.verify(signature, value, padding.PKCS1v15(), prehashed)
        else:
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO)
            public.verify(signature, value, pss, prehashed)
    except (InvalidSignature, ValueError):
        return {"value": False}
    return {"value": True}


_OPERATIONS = {"encrypt": _encrypt, "decrypt": _decrypt, "sign": _sign, "verify": _verify}


# --- HTTP ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests session expects
    server_version = "KeycellManagedHsmEmulator"
    timeout = 60  # an idle keep-alive connection frees its thread after a minute
    server: _HsmHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests run thousands of requests

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""  # always drained: keep-alive stays in step
        try:
            if not self._authorized():
                self._challenge()
                return
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            api_version = query.get("api-version")
            if api_version is None:
                raise ApiError(400, "BadParameter", "The 'api-version' query parameter is missing.")
            if api_version not in API_VERSIONS:
                raise ApiError(
                    400, "BadParameter", f"The specified version ({api_version}) is not recognized."
                )
            body = self._json(raw) if method in ("POST", "PATCH", "PUT") else {}
            status, reply = self._route(method, url.path, query, body)
            self._reply(status, reply)
        except ApiError as err:
            self._reply(err.status, err.body())
        except Exception:  # a bug here must still answer, never hang the client
            self._reply(500, {"error": {"code": "InternalServerError", "message": "The emulator failed."}})

    def _authorized(self) -> bool:
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() == self.server.token

    def _challenge(self) -> None:
        challenge = (
            f'Bearer authorization="https://login.microsoftonline.com/{TENANT_ID}", resource="{RESOURCE}"'
        )
        body = {
            "error": {
                "code": "Unauthorized",
                "message": "AKV10000: Request is missing a Bearer or PoP token.",
            }
        }
        self._reply(401, body, {"WWW-Authenticate": challenge})

    @staticmethod
    def _json(raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise ApiError(400, "BadParameter", "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadParameter", "The request body must be a JSON object.")
        return body

    def _base(self) -> str:
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        return f"https://{host}"

    def _kid(self, name: str, version: _Version) -> str:
        return f"{self._base()}/keys/{name}/{version.id}"

    def _bundle(self, name: str, version: _Version) -> dict[str, Any]:
        bundle: dict[str, Any] = {
            "key": version.jwk(self._kid(name, version)),
            "attributes": version.attributes(),
        }
        if version.tags:
            bundle["tags"] = dict(version.tags)
        return bundle

    def _item(self, name: str, version: _Version, kid: str) -> dict[str, Any]:
        item: dict[str, Any] = {"kid": kid, "attributes": version.attributes()}
        if version.tags:
            item["tags"] = dict(version.tags)
        return item

    def _route(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        parts = path.split("/")[1:]  # "/keys/a/b" -> ["keys", "a", "b"]; a trailing "/" gives ""
        hsm = self.server.hsm
        if not parts or parts[0] != "keys":
            raise ApiError(404, "NotFound", f"The path {path} is not served by this emulator.")
        if len(parts) == 1 and method == "GET":
            items = [self._item(n, v, f"{self._base()}/keys/{n}") for n, v in hsm.names()]
            return 200, self._page(items, query, path)
        name = parts[1] if len(parts) > 1 else ""
        if not _KEY_NAME.fullmatch(name):
            raise ApiError(400, "BadParameter", "A key name is 1-127 letters, digits and dashes.")
        rest = parts[2:]
        if rest == ["create"] and method == "POST":
            _, version = hsm.create(name, body)
            return 200, self._bundle(name, version)
        if rest == ["versions"] and method == "GET":
            items = [self._item(name, v, self._kid(name, v)) for v in hsm.versions(name)]
            return 200, self._page(items, query, path)
        if len(rest) <= 1 and method in ("GET", "PATCH"):
            version_id = rest[0] if rest else ""
            if version_id and not _VERSION_ID.fullmatch(version_id):
                raise _not_found(name, version_id)
            if method == "GET":
                _, version = hsm.get(name, version_id)
            else:
                _, version = hsm.update(name, version_id, body)
            return 200, self._bundle(name, version)
        if len(rest) == 2 and rest[1] in _OPERATIONS and method == "POST":
            operation = rest[1]
            version = hsm.usable(name, rest[0], operation)
            result = _OPERATIONS[operation](version, body)
            if operation != "verify":
                result = {"kid": self._kid(name, version), **result}
            return 200, result
        raise ApiError(
            405 if rest else 404, "BadParameter", f"{method} {path} is not supported by this emulator."
        )

    def _page(self, items: list[dict[str, Any]], query: dict[str, str], path: str) -> dict[str, Any]:
        try:
            size = int(query.get("maxresults") or PAGE_SIZE)
            token = query.get("$skiptoken")
            start = (
                json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["offset"]
                if token
                else 0
            )
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, "BadParameter", "Invalid maxresults or $skiptoken.") from None
        if not 1 <= size <= PAGE_SIZE:
            raise ApiError(400, "BadParameter", f"maxresults must be between 1 and {PAGE_SIZE}.")
        end = start + size
        page: dict[str, Any] = {"value": items[start:end], "nextLink": None}
        if end < len(items):
            skip = _b64(json.dumps({"offset": end}).encode())
            page["nextLink"] = (
                f"{self._base()}{path}?api-version={query['api-version']}&$skiptoken={skip}&maxresults={size}"
            )
        return page

    def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        self.send_header("x-ms-keyvault-service-version", SERVICE_VERSION)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


class _HsmHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, context: ssl.SSLContext, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context = context
        self.token = token
        self.hsm = ManagedHsm()

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and
        # the client's delayed ACK add 40 ms to every keep-alive reply.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The TLS handshake runs in the connection's own thread (on its first read), so a
        # slow or plaintext client never stalls the accept loop.
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed handshakes (plain HTTP, unknown CA) and dropped connections are expected


def serve(cert_dir: Path, token: str = DEFAULT_TOKEN) -> _HsmHttpServer:
    """Bind an HTTPS Managed HSM on 127.0.0.1 (a free port); the caller runs serve_forever."""
    _, cert_path, key_path = write_certificates(cert_dir, "Keycell Managed HSM emulator CA")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    return _HsmHttpServer(context, token)


class AzureManagedHsmServer(ManagedServer):
    """The emulator in its own process (it plays the HSM: keys live only there).

    `with AzureManagedHsmServer() as hsm:` then point the SDK at `hsm.vault_url`, with
    `connection_verify=hsm.ca_path`, `verify_challenge_resource=False` and a
    `StubTokenCredential(hsm.token)`.
    """

    def __init__(self, *, token: str = DEFAULT_TOKEN, startup_timeout: float = 30.0) -> None:
        self.token = token
        self._dir = Path(tempfile.mkdtemp(prefix="keycell-mhsm-"))
        self.process = ServerProcess(
            "keycell.testing.azure_mhsm_server",
            ["--cert-dir", str(self._dir)],
            what="the Managed HSM emulator",
            env={"KEYCELL_MHSM_TOKEN": self.token},  # not on the command line
            startup_timeout=startup_timeout,
        )

    @property
    def vault_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> str:
        return str(self._dir / "ca.pem")

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--cert-dir", type=Path, required=True, help="where to write ca.pem and the server cert"
    )
    args = parser.parse_args(argv)
    server = serve(args.cert_dir, os.environ.get("KEYCELL_MHSM_TOKEN", DEFAULT_TOKEN))
    announce_ready(server.server_address[1])
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

"""A local Kubernetes API that answers TokenReviews, over HTTPS on 127.0.0.1.

It exists so Keycell's Kubernetes auth method can be tested against the real wire API
(`POST /apis/authentication.k8s.io/v1/tokenreviews`, the documented request and
response objects, `Status` objects for 401 and 403, 201 Created for a review) without
a cluster. It plays the cluster's service account issuer: it holds an RSA key, mints
service account JWTs (`service_account_token`, bound tokens with the "kubernetes.io"
claim, or legacy secret tokens with `legacy=True`), and reviews them as the API server
does: signature, expiry, issuer, audiences, and whether the service account still
exists (`delete_service_account` makes its tokens fail review, as a recreated account
does).

The caller of a review must present a bearer token of a service account allowed to
create TokenReviews (`reviewers`, the `system:auth-delegator` binding); any other
token gets 403, a bad one 401.

    with KubernetesApi(folder) as k8s:
        k8s.url, k8s.ca_pem, k8s.service_account_token("default", "app")
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from keycell.testing.local_tls import write_certificates

ISSUER = "https://kubernetes.default.svc.cluster.local"
DEFAULT_AUDIENCE = "https://kubernetes.default.svc"
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class KubernetesApi:
    def __init__(
        self,
        folder: Path,
        *,
        reviewers: Iterable[tuple[str, str]] = (("kube-system", "keycell-reviewer"),),
    ) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_path, cert_path, key_path = write_certificates(folder, "Keycell Kubernetes API stand-in CA")
        self.ca_pem = ca_path.read_text()
        self.reviewers = set(reviewers)
        self.uids: dict[tuple[str, str], str] = {}
        self.reviews = 0
        self._lock = threading.Lock()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_path, key_path)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="k8s-api", daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- the issuer ----------------------------------------------------------------

    def service_account_token(
        self,
        namespace: str,
        name: str,
        *,
        audiences: tuple[str, ...] = (DEFAULT_AUDIENCE,),
        ttl: int = 600,
        legacy: bool = False,
        signing_key: rsa.RSAPrivateKey | None = None,
    ) -> str:
        """A service account JWT as the cluster mints it (the account is created if new);
        `signing_key` forges one with another key."""
        with self._lock:
            uid = self.uids.setdefault((namespace, name), str(uuid.uuid4()))
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISSUER, "sub": f"system:serviceaccount:{namespace}:{name}"}
        if legacy:
            claims.update(
                {
                    "iss": "kubernetes/serviceaccount",
                    "kubernetes.io/serviceaccount/namespace": namespace,
                    "kubernetes.io/serviceaccount/service-account.name": name,
                    "kubernetes.io/serviceaccount/service-account.uid": uid,
                    "kubernetes.io/serviceaccount/secret.name": f"{name}-token",
                }
            )
        else:
            claims.update(
                {
                    "aud": list(audiences),
                    "iat": now,
                    "nbf": now,
                    "exp": now + ttl,
                    "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
                }
            )
        return jwt.encode(claims, signing_key or self.key, algorithm="RS256", headers={"kid": "stand-in"})

    def delete_service_account(self, namespace: str, name: str) -> None:
        with self._lock:
            self.uids.pop((namespace, name), None)

    # --- the API server ------------------------------------------------------------

    def review(self, token: str, audiences: list[str] | None) -> dict[str, Any]:
        """A TokenReview's `status` for `token`, as the API server computes it."""
        wanted = audiences or [DEFAULT_AUDIENCE]
        try:
            claims = jwt.decode(
                token,
                self.key.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False, "require": []},
            )
        except jwt.PyJWTError:
            return {
                "user": {},
                "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]",
            }
        if claims.get("iss") not in (ISSUER, "kubernetes/serviceaccount"):
            return {"user": {}, "error": "invalid bearer token"}
        nested = claims.get("kubernetes.io") or {}
        if nested:
            namespace, name = nested["namespace"], nested["serviceaccount"]["name"]
            uid = nested["serviceaccount"]["uid"]
            token_audiences = claims.get("aud") or []
        else:
            namespace = claims["kubernetes.io/serviceaccount/namespace"]
            name = claims["kubernetes.io/serviceaccount/service-account.name"]
            uid = claims["kubernetes.io/serviceaccount/service-account.uid"]
            token_audiences = [DEFAULT_AUDIENCE]
        with self._lock:
            current = self.uids.get((namespace, name))
        if current != uid:
            return {"user": {}, "error": f'service account "{namespace}/{name}" has been deleted'}
        granted = [a for a in wanted if a in token_audiences]
        if not granted:
            return {"user": {}, "error": "token audiences do not match the requested audiences"}
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{namespace}:{name}",
                "uid": uid,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{namespace}",
                    "system:authenticated",
                ],
            },
            "audiences": granted,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(length, 1024 * 1024))
                if self.path != REVIEW_PATH:
                    self._send(
                        404, _status(404, "NotFound", "the server could not find the requested resource")
                    )
                    return
                bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                caller = api.review(bearer, None) if bearer else {"user": {}}
                if caller.get("authenticated") is not True:
                    self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                    return
                who = caller["user"]["username"].split(":")
                if (who[2], who[3]) not in api.reviewers:
                    message = (
                        f'tokenreviews.authentication.k8s.io is forbidden: User "{caller["user"]["username"]}" '
                        'cannot create resource "tokenreviews" in API group "authentication.k8s.io" at the '
                        "cluster scope"
                    )
                    self._send(403, _status(403, "Forbidden", message))
                    return
                try:
                    review = json.loads(raw)
                    token = review["spec"]["token"]
                    # The API server takes the type from the URL when the body leaves it out
                    # (Vault's plug-in sends no apiVersion or kind); a wrong one is refused.
                    assert review.get("apiVersion", "authentication.k8s.io/v1") == "authentication.k8s.io/v1"
                    assert review.get("kind", "TokenReview") == "TokenReview" and isinstance(token, str)
                except (ValueError, KeyError, TypeError, AssertionError):
                    self._send(400, _status(400, "BadRequest", "the body is not a TokenReview"))
                    return
                with api._lock:
                    api.reviews += 1
                spec = review["spec"]
                status = api.review(token, spec.get("audiences"))
                self._send(
                    201,
                    {
                        "kind": "TokenReview",
                        "apiVersion": "authentication.k8s.io/v1",
                        "metadata": {"creationTimestamp": None},
                        "spec": spec,
                        "status": status,
                    },
                )

        return Handler

"""The Kubernetes auth method (Vault's `auth/kubernetes`): a pod trades its service
account token for a Keycell token.

Keycell does not verify the service account JWT itself: it asks the cluster, with a
TokenReview (`POST {kubernetes_host}/apis/authentication.k8s.io/v1/tokenreviews`,
the `authentication.k8s.io/v1` API, over HTTPS checked against `kubernetes_ca_cert`),
authenticated by `token_reviewer_jwt` (a service account allowed to create
TokenReviews, `system:auth-delegator`) or, without one, by the pod's own JWT. So a
token the cluster has revoked (its pod deleted, its service account recreated) stops
logging in at once, as the cluster says.

Endpoints (routes in `routes.py`; a mount is enabled with `sys/auth/kubernetes`):

- `write_config(data)` POST auth/<mount>/config: kubernetes_host (https URL),
  kubernetes_ca_cert (PEM), token_reviewer_jwt; issuer / disable_iss_validation /
  disable_local_ca_jwt are accepted (the review is the cluster's, so they change
  nothing); pem_keys (local verification) is refused.
- `read_config()` (the reviewer JWT is never shown, as in Vault).
- `write_role` / `read_role` / `delete_role` / `list_roles`: bound_service_account_names
  and bound_service_account_namespaces (both required; "*" matches any), audience
  (the review asks for it and the cluster must confirm it), and the token settings.
- `login(role, jwt)` POST auth/<mount>/login.

Login: the role's bounds are checked against the name and namespace the JWT claims
(unverified, to refuse early without a call), then the TokenReview must say
`authenticated: true` for `system:serviceaccount:<namespace>:<name>` with the same
name and namespace. Refusals are 403 and never echo the JWT; an unreachable cluster is
503. The token carries Vault's metadata (role, service_account_name, _namespace, _uid).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt

from keycell.control_plane.auth.roles import checked_role_name, is_role_name, names_under, refuse_unknown
from keycell.control_plane.auth.token.settings import (
    TOKEN_FIELDS,
    issue_login_token,
    parse_token_settings,
    token_settings_json,
)
from keycell.control_plane.auth.token.store import TokenEntry, TokenStore
from keycell.control_plane.errors import InvalidRequest, NotFound, PermissionDenied, Unavailable
from keycell.control_plane.ledger import Key, Kind, Ledger
from keycell.control_plane.storage import delete_current, get_json, put_json_current

log = logging.getLogger(__name__)
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
REVIEW_TIMEOUT_S = 5.0
MAX_JWT_CHARS = 16 * 1024
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?|\*")
_CONFIG_FIELDS = (
    "kubernetes_host",
    "kubernetes_ca_cert",
    "token_reviewer_jwt",
    "pem_keys",
    "issuer",
    "disable_iss_validation",
    "disable_local_ca_jwt",
)
_ROLE_FIELDS = (
    "bound_service_account_names",
    "bound_service_account_namespaces",
    "audience",
    "alias_name_source",
    "token_bound_cidrs",
    *TOKEN_FIELDS,
)


def _names(value: object, field: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not items or len(items) > 256:
        raise InvalidRequest(f'{field} is required: a list of names, or "*"')
    out = []
    for item in items:
        if not isinstance(item, str) or not _K8S_NAME.fullmatch(item.strip()) or len(item) > 253:
            raise InvalidRequest(f"{field} holds Kubernetes names (lowercase, digits, '-', '.') or \"*\"")
        out.append(item.strip())
    return out


def _matches(value: str, bound: list[str]) -> bool:
    return "*" in bound or value in bound


def _claimed_account(token: str) -> tuple[str, str]:
    """The (namespace, name) a service account JWT claims, unverified: legacy secret
    tokens name them at the top level, bound (projected) tokens under "kubernetes.io"."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise PermissionDenied("the jwt is not a service account token") from None
    nested = claims.get("kubernetes.io")
    if isinstance(nested, dict):
        namespace = nested.get("namespace")
        account = nested.get("serviceaccount")
        name = account.get("name") if isinstance(account, dict) else None
    else:
        namespace = claims.get("kubernetes.io/serviceaccount/namespace")
        name = claims.get("kubernetes.io/serviceaccount/service-account.name")
    if not isinstance(namespace, str) or not isinstance(name, str) or not namespace or not name:
        raise PermissionDenied("the jwt names no service account")
    return namespace, name


class KubernetesAuth:
    def __init__(
        self,
        ledger: Ledger,
        tokens: TokenStore,
        *,
        mount: str = "kubernetes",
        clock: Callable[[], float] = time.time,
        lease_ttls: tuple[int, int] = (0, 0),
    ) -> None:
        """`lease_ttls`: the mount's tuned (default_lease_ttl, max_lease_ttl), which shape
        every login's token (settings.issue_login_token)."""
        self.ledger = ledger
        self.tokens = tokens
        self.mount = mount
        self.clock = clock
        self.login_path = f"auth/{mount}/login"
        self.lease_ttls = lease_ttls
        # Every item of this mount lives under "kubernetes/<mount>/" (mounts.py deletes
        # that prefix when the mount is disabled).
        self._base = f"kubernetes/{mount}/"
        self._config_key = Key(Kind.AUTH_ROLE, self._base + "config")
        self._roles = self._base + "role/"

    # --- config ------------------------------------------------------------------------

    def write_config(self, data: Mapping[str, Any]) -> None:
        if not isinstance(data, Mapping):
            raise InvalidRequest("the config is a JSON object")
        refuse_unknown(data, _CONFIG_FIELDS, "config")
        if data.get("pem_keys"):
            raise InvalidRequest("pem_keys is not supported: Keycell asks the cluster (TokenReview)")
        host = data.get("kubernetes_host")
        if not isinstance(host, str) or len(host) > 2048:
            raise InvalidRequest("kubernetes_host is required (https://HOST[:PORT])")
        parts = urlsplit(host.rstrip("/"))
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise InvalidRequest("kubernetes_host must be an https URL (https://HOST[:PORT])")
        ca = data.get("kubernetes_ca_cert") or ""
        if not isinstance(ca, str) or len(ca) > 64 * 1024:
            raise InvalidRequest("kubernetes_ca_cert is a PEM certificate bundle")
        if ca:
            try:
                ssl.create_default_context(cadata=ca)
            except (ssl.SSLError, ValueError):
                raise InvalidRequest("kubernetes_ca_cert is not a PEM certificate bundle") from None
        reviewer = data.get("token_reviewer_jwt") or ""
        if not isinstance(reviewer, str) or len(reviewer) > MAX_JWT_CHARS:
            raise InvalidRequest("token_reviewer_jwt is a JWT")
        put_json_current(
            self.ledger,
            self._config_key,
            {"kubernetes_host": host.rstrip("/"), "kubernetes_ca_cert": ca, "token_reviewer_jwt": reviewer},
        )

    def read_config(self) -> dict[str, Any]:
        config = self._config()
        return {
            "kubernetes_host": config["kubernetes_host"],
            "kubernetes_ca_cert": config["kubernetes_ca_cert"],
            "pem_keys": [],
            "issuer": "",
            "disable_iss_validation": True,
            "disable_local_ca_jwt": True,
            "token_reviewer_jwt_set": bool(config["token_reviewer_jwt"]),
        }

    def _config(self) -> dict[str, Any]:
        found = get_json(self.ledger, self._config_key)
        if found is None:
            raise NotFound("the Kubernetes auth method is not configured")
        return found[0]

    # --- roles -------------------------------------------------------------------------

    def write_role(self, name: str, data: Mapping[str, Any]) -> None:
        role_name = checked_role_name(name)
        if not isinstance(data, Mapping):
            raise InvalidRequest("the role is a JSON object")
        refuse_unknown(data, _ROLE_FIELDS)
        if data.get("token_bound_cidrs"):
            raise InvalidRequest("token_bound_cidrs is not supported by Keycell")
        if data.get("alias_name_source") not in (None, "", "serviceaccount_uid"):
            raise InvalidRequest('alias_name_source must be "serviceaccount_uid"')
        found = get_json(self.ledger, self._role_key(role_name))
        role = dict(found[0]) if found else {}
        for field in ("bound_service_account_names", "bound_service_account_namespaces"):
            if field in data or field not in role:
                role[field] = _names(data.get(field), field)
        if "audience" in data:
            audience = data["audience"] or ""
            if not isinstance(audience, str) or len(audience) > 512:
                raise InvalidRequest("audience is a string")
            role["audience"] = audience
        role.setdefault("audience", "")
        parse_token_settings(data, role)
        put_json_current(self.ledger, self._role_key(role_name), role)

    def read_role(self, name: str) -> dict[str, Any]:
        role = self._role(checked_role_name(name))
        # As Vault's plug-in answers: the audience only when bound; namespace selectors are
        # not supported (a role write naming one is refused as an unknown field), so empty.
        return {
            "bound_service_account_names": list(role["bound_service_account_names"]),
            "bound_service_account_namespaces": list(role["bound_service_account_namespaces"]),
            "bound_service_account_namespace_selector": "",
            **({"audience": role["audience"]} if role["audience"] else {}),
            "alias_name_source": "serviceaccount_uid",
            **token_settings_json(role, aliases="when-set"),
        }

    def delete_role(self, name: str) -> None:
        delete_current(self.ledger, self._role_key(checked_role_name(name)))

    def list_roles(self) -> list[str]:
        return names_under(self.ledger, Kind.AUTH_ROLE, self._roles)

    def _role_key(self, name: str) -> Key:
        return Key(Kind.AUTH_ROLE, self._roles + name)

    def _role(self, role_name: str) -> dict[str, Any]:
        found = get_json(self.ledger, self._role_key(role_name))
        if found is None:
            raise NotFound(f"role {role_name!r} could not be found")
        return found[0]

    # --- login -------------------------------------------------------------------------

    def login(self, role: object, token: object) -> tuple[str, TokenEntry, dict[str, Any]]:
        if not isinstance(role, str) or not role:
            raise InvalidRequest("missing role")
        if not isinstance(token, str) or not token:
            raise InvalidRequest("missing jwt")
        if len(token) > MAX_JWT_CHARS:
            raise PermissionDenied("the jwt is too long")
        if not is_role_name(role):
            raise PermissionDenied(f'invalid role name "{role[:64]}"')
        found = get_json(self.ledger, self._role_key(role))
        if found is None:
            raise PermissionDenied(f'invalid role name "{role}"')
        settings = found[0]
        namespace, name = _claimed_account(token)
        if not _matches(name, settings["bound_service_account_names"]):
            raise PermissionDenied("service account name not authorized")
        if not _matches(namespace, settings["bound_service_account_namespaces"]):
            raise PermissionDenied("namespace not authorized")
        user = self._review(token, settings["audience"])
        if user.get("username") != f"system:serviceaccount:{namespace}:{name}":
            raise PermissionDenied("the token review names another service account than the jwt")
        uid = str(user.get("uid") or "")
        token_text, entry = issue_login_token(
            self.tokens,
            settings,
            path=self.login_path,
            display_name=f"{self.mount}-{namespace}-{name}"[:200],
            meta={
                "role": role,
                "service_account_name": name,
                "service_account_namespace": namespace,
                "service_account_uid": uid,
                "service_account_secret_name": "",
            },
            lease_ttls=self.lease_ttls,
        )
        return token_text, entry, self.tokens.auth_data(token_text, entry)

    def _review(self, token: str, audience: str) -> dict[str, Any]:
        """The cluster's TokenReview of `token`: its `status.user` when authenticated
        (and, with an audience, confirmed for it); PermissionDenied otherwise."""
        config = self._config()
        spec: dict[str, Any] = {"token": token}
        if audience:
            spec["audiences"] = [audience]
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
        request = urllib.request.Request(  # noqa: S310  # the URL is https, checked at config
            config["kubernetes_host"] + REVIEW_PATH,
            data=body.encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                "Authorization": "Bearer " + (config["token_reviewer_jwt"] or token),
            },
        )
        context = ssl.create_default_context(cadata=config["kubernetes_ca_cert"] or None)
        try:
            with urllib.request.urlopen(request, timeout=REVIEW_TIMEOUT_S, context=context) as answer:  # noqa: S310
                review = json.loads(answer.read(1024 * 1024))
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise PermissionDenied(
                    "the token review was refused by the cluster (is the reviewer allowed to create TokenReviews?)"
                ) from None
            raise Unavailable(f"the Kubernetes API answered the token review with {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            log.warning("token review at %s failed: %s", config["kubernetes_host"], reason)
            raise Unavailable(
                f"the Kubernetes API could not be reached for the token review ({type(reason).__name__})"
            ) from None
        status = review.get("status") if isinstance(review, dict) else None
        if not isinstance(status, dict) or status.get("authenticated") is not True:
            raise PermissionDenied("the cluster did not authenticate the service account token")
        if audience and audience not in (status.get("audiences") or []):
            raise PermissionDenied("the cluster did not confirm the role's audience for the token")
        user = status.get("user")
        if not isinstance(user, dict):
            raise PermissionDenied("the cluster did not authenticate the service account token")
        return user

"""The JWT auth method (Vault's `auth/jwt`): a workload trades a signed JWT for a token.

The operator configures the keys that may sign (PEM public keys and/or a JWKS given
inline: Keycell fetches nothing, so `jwks_url` and OIDC discovery are refused) and an
optional `bound_issuer`, then roles that say which JWTs a role accepts and what token
they get. Endpoints served:

- `write_config(data)`       POST auth/jwt/config -> None (204). Fields:
                             jwt_validation_pubkeys (PEM list), jwks (a JWKS object),
                             bound_issuer, jwt_supported_algs, default_role.
- `read_config()`            GET auth/jwt/config -> Vault's config data.
- `write_role(name, data)`   POST auth/jwt/role/:name -> None (creates, or updates the
                             fields given). role_type "jwt", bound_audiences, user_claim
                             (default "sub"), bound_subject, bound_claims (exact match;
                             a list means any of), token_policies, token_ttl,
                             token_max_ttl, token_period, token_explicit_max_ttl,
                             token_no_default_policy, token_num_uses, the leeways.
- `read_role(name)`          GET auth/jwt/role/:name -> the role's data.
- `delete_role(name)`        DELETE auth/jwt/role/:name -> None.
- `list_roles()`             LIST auth/jwt/role -> names (the response's "keys").
- `login(role, jwt)`         POST auth/jwt/login -> (token, TokenEntry, auth block).

Login checks, each failing with PermissionDenied that names the check and never
echoes the JWT: the role exists; the algorithm is an allowed asymmetric one (RS*,
PS*, ES*, EdDSA; never "none" or HMAC); the signature verifies with a configured key
(the JWKS key named by `kid` when there is one); `exp` is present and not past (plus
the role's expiration leeway, default 150 s), `nbf` not ahead (not-before leeway,
default 150 s), `iat` not in the future (clock-skew leeway, default 60 s); `iss`
equals bound_issuer when set; `aud` holds one of bound_audiences (and a JWT with an
audience needs a role with bound audiences, as Vault insists); `sub` equals
bound_subject when set; every bound claim matches; the user claim is present. The
token is an orphan created at "auth/jwt/login" with display name "jwt-<user claim>"
and metadata {"role": role}.

JWT-SVIDs (issue 6): with `spiffe_trust_domain: true` in the config, a JWT whose `kid`
is one of the cell's own JWT-SVID keys is checked as a JWT-SVID (svid.validate_jwt_svid:
header, signature, trust domain, audience against the role's bound_audiences, expiry,
revocation of its SPIFFE ID or of the SVID itself), and a role's `bound_spiffe_ids`
(patterns where `*` matches within one path segment) must match its `sub`. Every bound
check of the role (bound_audiences, bound_subject, bound_claims, user_claim) applies to
an SVID as to any JWT; since any workload of the trust domain can hold an SVID for the
audience it picks, a role that names neither bound_spiffe_ids nor bound_subject refuses
SVIDs unless it sets `allow_any_spiffe_id: true`. The token
carries {"spiffe_id": ...} in its metadata and is recorded against the SPIFFE ID and
the SVID, so revoking either revokes the tokens they logged in (identity.revoke).

Storage: the config at `Kind.CONFIG` "auth/jwt/config", roles at `Kind.AUTH_ROLE`
"jwt/<name>", both through the barrier.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from keycell.control_plane.auth.roles import checked_role_name, is_role_name, names_under, refuse_unknown
from keycell.control_plane.auth.token.settings import (
    TOKEN_FIELDS,
    issue_login_token,
    parse_token_settings,
    token_settings_json,
)
from keycell.control_plane.auth.token.store import TokenEntry, TokenStore, parse_duration
from keycell.control_plane.errors import InvalidRequest, NotFound, PermissionDenied
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger
from keycell.control_plane.storage import delete_current, get_json, put_json_if

CONFIG_KEY = Key(Kind.CONFIG, "auth/jwt/config")
ROLE_PREFIX = "jwt/"
LOGIN_PATH = "auth/jwt/login"
SUPPORTED_ALGS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
# Vault's defaults, in seconds.
DEFAULT_EXPIRATION_LEEWAY = 150
DEFAULT_NOT_BEFORE_LEEWAY = 150
DEFAULT_CLOCK_SKEW_LEEWAY = 60
MAX_JWT_CHARS = 16 * 1024
MAX_KEYS = 64
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
# Fields Vault's JWT/OIDC method has that Keycell cannot honour: accepted when empty
# (clients such as hvac send some by default), refused otherwise.
_UNSUPPORTED_CONFIG = (
    "oidc_discovery_url",
    "oidc_discovery_ca_pem",
    "oidc_client_id",
    "oidc_client_secret",
    "oidc_response_mode",
    "oidc_response_types",
    "jwks_url",
    "jwks_ca_pem",
    "jwks_pairs",
    "provider_config",
    "namespace_in_state",
)
_IGNORED_ROLE = ("allowed_redirect_uris", "oidc_scopes", "verbose_oidc_logging", "max_age")
_UNSUPPORTED_ROLE = (
    "claim_mappings",
    "groups_claim",
    "bound_cidrs",
    "token_bound_cidrs",
    "user_claim_json_pointer",
)
_ROLE_FIELDS = (
    "role_type",
    "bound_audiences",
    "user_claim",
    "bound_subject",
    "bound_claims",
    "bound_claims_type",
    "expiration_leeway",
    "not_before_leeway",
    "clock_skew_leeway",
    "bound_spiffe_ids",
    "allow_any_spiffe_id",
    *TOKEN_FIELDS,
)


def _empty(value: object) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {} or value == 0


def _string_list(value: object, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise InvalidRequest(f"{name} must be a list of strings or a comma-separated string")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidRequest(f"{name} must hold strings")
        if item.strip():
            out.append(item.strip())
    return out


def _string(value: object, name: str, *, limit: int = 1024) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidRequest(f"{name} must be a string of at most {limit} characters")
    return value


def _leeway(value: object, name: str) -> int:
    """Vault's leeways: seconds, 0 for the default, -1 to turn the allowance off."""
    if value in (-1, "-1"):
        return -1
    return parse_duration(value if value is not None else 0, name)


def _load_pem(pem: str) -> object:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        raise InvalidRequest("jwt_validation_pubkeys: an entry is not a PEM-encoded public key") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise InvalidRequest("jwt_validation_pubkeys: RSA keys must be at least 2048 bits")
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise InvalidRequest("jwt_validation_pubkeys: only RSA, EC and Ed25519 public keys can verify JWTs")
    return key


def _jwks(value: object) -> dict[str, Any] | None:
    if value is None or value == {}:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("keys"), list) or not value["keys"]:
        raise InvalidRequest('jwks must be a JWKS object: {"keys": [...]}')
    if len(value["keys"]) > MAX_KEYS:
        raise InvalidRequest(f"jwks holds at most {MAX_KEYS} keys")
    for jwk in value["keys"]:
        if not isinstance(jwk, Mapping):
            raise InvalidRequest("jwks: every key is a JWK object")
        if jwk.get("kty") not in ("RSA", "EC", "OKP"):
            raise InvalidRequest("jwks: only RSA, EC and OKP (Ed25519) public keys can verify JWTs")
        if "d" in jwk or "p" in jwk:
            raise InvalidRequest("jwks: a key holds private material; give public keys only")
        try:
            jwt.PyJWK.from_dict(dict(jwk))
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise InvalidRequest("jwks: a key is not a valid public JWK") from None
    return {"keys": [dict(k) for k in value["keys"]]}


def _claim(claims: Mapping[str, Any], name: str) -> object:
    """A claim by name, or by JSON pointer ("/a/b") into nested claims."""
    if not name.startswith("/"):
        return claims.get(name)
    current: object = claims
    for part in name[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def _spiffe_match(pattern: str, spiffe_id: str) -> bool:
    """`*` matches any characters within one path segment; everything else literally."""
    regex = "[^/]*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, spiffe_id) is not None


def _scalar_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value)
    return None


class JwtAuth:
    """Vault's JWT auth method over the cell's ledger (see the module docstring)."""

    def __init__(self, ledger: Ledger, tokens: TokenStore, *, clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.tokens = tokens
        self.clock = clock
        # The cell's workload identity service (control_plane.identity.Identity), set by
        # CellServices: the keys that sign JWT-SVIDs, and where logins are recorded.
        self.spiffe: Any = None

    # --- config ------------------------------------------------------------------------

    def write_config(self, data: Mapping[str, Any]) -> None:
        """POST auth/jwt/config."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("the config is a JSON object")
        for name in _UNSUPPORTED_CONFIG:
            if not _empty(data.get(name)):
                raise InvalidRequest(
                    f"{name} is not supported by Keycell, which fetches no keys: "
                    "give jwt_validation_pubkeys or jwks instead"
                )
        known = {
            "jwt_validation_pubkeys",
            "jwks",
            "bound_issuer",
            "jwt_supported_algs",
            "default_role",
            "spiffe_trust_domain",
        }
        refuse_unknown(data, known | set(_UNSUPPORTED_CONFIG), "config")
        pems = _string_list(data.get("jwt_validation_pubkeys"), "jwt_validation_pubkeys")
        if len(pems) > MAX_KEYS:
            raise InvalidRequest(f"jwt_validation_pubkeys holds at most {MAX_KEYS} keys")
        for pem in pems:
            _load_pem(pem)
        jwks = _jwks(data.get("jwks"))
        spiffe = data.get("spiffe_trust_domain", False)
        if not isinstance(spiffe, bool):
            raise InvalidRequest("spiffe_trust_domain must be a boolean")
        if spiffe and self.spiffe is None:
            raise InvalidRequest("this cell has no SPIFFE trust domain")
        if not pems and jwks is None and not spiffe:
            raise InvalidRequest("give the keys that sign JWTs: jwt_validation_pubkeys and/or jwks")
        algs = _string_list(data.get("jwt_supported_algs"), "jwt_supported_algs")
        bad = [a for a in algs if a not in SUPPORTED_ALGS]
        if bad:
            raise InvalidRequest(
                f"jwt_supported_algs: unsupported algorithm(s) {', '.join(bad)[:100]}; "
                f"use {', '.join(SUPPORTED_ALGS)}"
            )
        default_role = _string(data.get("default_role"), "default_role", limit=128)
        if default_role:
            checked_role_name(default_role)
        record = {
            "jwt_validation_pubkeys": pems,
            "jwks": jwks,
            "bound_issuer": _string(data.get("bound_issuer"), "bound_issuer"),
            "jwt_supported_algs": algs,
            "default_role": default_role,
            "spiffe_trust_domain": spiffe,
        }
        self._put(CONFIG_KEY, record)

    def read_config(self) -> dict[str, Any]:
        """GET auth/jwt/config."""
        config = self._config()
        if config is None:
            raise NotFound("the JWT auth method is not configured")
        return {
            "bound_issuer": config["bound_issuer"],
            "default_role": config["default_role"],
            "jwks": config["jwks"],
            "jwks_ca_pem": "",
            "jwks_url": "",
            "jwt_supported_algs": list(config["jwt_supported_algs"]),
            "jwt_validation_pubkeys": list(config["jwt_validation_pubkeys"]),
            "namespace_in_state": False,
            "oidc_client_id": "",
            "oidc_discovery_ca_pem": "",
            "oidc_discovery_url": "",
            "oidc_response_mode": "",
            "oidc_response_types": [],
            "provider_config": {},
            "spiffe_trust_domain": bool(config.get("spiffe_trust_domain", False)),
        }

    def _config(self) -> dict[str, Any] | None:
        found = get_json(self.ledger, CONFIG_KEY)
        return None if found is None else found[0]

    # --- roles -------------------------------------------------------------------------

    def write_role(self, name: str, data: Mapping[str, Any]) -> None:
        """POST auth/jwt/role/:name: create the role, or update the fields given."""
        role_name = checked_role_name(name)
        if not isinstance(data, Mapping):
            raise InvalidRequest("the role is a JSON object")
        for field in _UNSUPPORTED_ROLE:
            if not _empty(data.get(field)):
                raise InvalidRequest(f"{field} is not supported by Keycell's JWT auth method")
        refuse_unknown(data, (*_ROLE_FIELDS, *_UNSUPPORTED_ROLE, *_IGNORED_ROLE))
        current = self._role(role_name) or {}
        role = dict(current)

        def has(*names: str) -> bool:
            return any(n in data for n in names)

        if has("role_type"):
            role_type = data["role_type"] or "jwt"
            if role_type != "jwt":
                raise InvalidRequest('role_type must be "jwt" (Keycell has no OIDC browser flow)')
        role["role_type"] = "jwt"
        if has("bound_audiences"):
            role["bound_audiences"] = _string_list(data["bound_audiences"], "bound_audiences")
        if has("user_claim"):
            role["user_claim"] = _string(data["user_claim"], "user_claim", limit=256) or "sub"
        if has("bound_subject"):
            role["bound_subject"] = _string(data["bound_subject"], "bound_subject")
        if has("bound_claims"):
            role["bound_claims"] = self._bound_claims(data["bound_claims"])
        if has("bound_claims_type") and data["bound_claims_type"] not in (None, "", "string"):
            raise InvalidRequest('bound_claims_type must be "string" (exact match); globs are not supported')
        parse_token_settings(data, role)
        for field in ("expiration_leeway", "not_before_leeway", "clock_skew_leeway"):
            if has(field):
                role[field] = _leeway(data[field], field)
        if has("bound_spiffe_ids"):
            patterns = _string_list(data["bound_spiffe_ids"], "bound_spiffe_ids")
            for pattern in patterns:
                if not pattern.startswith("spiffe://") or len(pattern) > 2048:
                    raise InvalidRequest(
                        "bound_spiffe_ids are SPIFFE ID patterns: spiffe://TD/path, '*' in a segment"
                    )
            role["bound_spiffe_ids"] = patterns
        if has("allow_any_spiffe_id"):
            if not isinstance(data["allow_any_spiffe_id"], bool):
                raise InvalidRequest("allow_any_spiffe_id must be a boolean")
            role["allow_any_spiffe_id"] = data["allow_any_spiffe_id"]
        defaults: dict[str, Any] = {
            "bound_audiences": [],
            "user_claim": "sub",
            "bound_subject": "",
            "bound_claims": {},
            "expiration_leeway": 0,
            "not_before_leeway": 0,
            "clock_skew_leeway": 0,
            "bound_spiffe_ids": [],
            "allow_any_spiffe_id": False,
        }
        for field, value in defaults.items():
            role.setdefault(field, value)
        if role["bound_spiffe_ids"] and not role["bound_audiences"]:
            raise InvalidRequest(
                "a role with bound_spiffe_ids needs bound_audiences: a JWT-SVID's aud is required"
            )
        if not (
            role["bound_audiences"]
            or role["bound_subject"]
            or role["bound_claims"]
            or role["bound_spiffe_ids"]
        ):
            raise InvalidRequest(
                "must have at least one bound constraint when creating/updating a role "
                "(bound_audiences, bound_subject or bound_claims)"
            )
        self._put(self._role_key(role_name), role)

    @staticmethod
    def _bound_claims(value: object) -> dict[str, list[str]]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise InvalidRequest("bound_claims must be an object of claim name to value(s)")
        claims: dict[str, list[str]] = {}
        for name, expected in value.items():
            if not isinstance(name, str) or not name or len(name) > 256:
                raise InvalidRequest("bound_claims: claim names are non-empty strings")
            options = expected if isinstance(expected, list) else [expected]
            texts = [_scalar_text(o) for o in options]
            if not texts or any(t is None for t in texts):
                raise InvalidRequest(
                    f"bound_claims: {name!r} must be a string, number, boolean or list of them"
                )
            claims[name] = [t for t in texts if t is not None]
        return claims

    def read_role(self, name: str) -> dict[str, Any]:
        """GET auth/jwt/role/:name."""
        role_name = checked_role_name(name)
        role = self._role(role_name)
        if role is None:
            raise NotFound(f"role {role_name!r} could not be found")
        return {
            "role_type": "jwt",
            "bound_audiences": list(role["bound_audiences"]),
            "user_claim": role["user_claim"],
            "bound_subject": role["bound_subject"],
            "bound_claims": {k: (v[0] if len(v) == 1 else list(v)) for k, v in role["bound_claims"].items()}
            or None,
            "bound_claims_type": "string",
            "claim_mappings": None,
            "groups_claim": "",
            **token_settings_json(role),
            "bound_cidrs": [],
            "expiration_leeway": role["expiration_leeway"],
            "not_before_leeway": role["not_before_leeway"],
            "clock_skew_leeway": role["clock_skew_leeway"],
            "allowed_redirect_uris": [],
            "oidc_scopes": [],
            "verbose_oidc_logging": False,
            "max_age": 0,
            "user_claim_json_pointer": False,
            "bound_spiffe_ids": list(role.get("bound_spiffe_ids", [])),
            "allow_any_spiffe_id": bool(role.get("allow_any_spiffe_id", False)),
        }

    def delete_role(self, name: str) -> None:
        """DELETE auth/jwt/role/:name (deleting an absent role is not an error, as in Vault)."""
        delete_current(self.ledger, self._role_key(checked_role_name(name)))

    def list_roles(self) -> list[str]:
        """LIST auth/jwt/role -> the role names, sorted."""
        return names_under(self.ledger, Kind.AUTH_ROLE, ROLE_PREFIX)

    @staticmethod
    def _role_key(name: str) -> Key:
        return Key(Kind.AUTH_ROLE, ROLE_PREFIX + name)

    def _role(self, name: str) -> dict[str, Any] | None:
        found = get_json(self.ledger, self._role_key(name))
        return None if found is None else found[0]

    def _put(self, key: Key, record: dict[str, Any]) -> None:
        for _ in range(8):
            item = self.ledger.get(key, consistent=True)
            try:
                put_json_if(self.ledger, key, record, 0 if item is None else item.version)
                return
            except ConflictError:
                continue  # the last writer wins, as in Vault
        raise InvalidRequest("written concurrently by others; retry")

    # --- login -------------------------------------------------------------------------

    def login(self, role: str, jwt_text: str) -> tuple[str, TokenEntry, dict[str, Any]]:
        """POST auth/jwt/login {role, jwt} -> (token, entry, Vault's `auth` block)."""
        config = self._config()
        if config is None:
            raise PermissionDenied("the JWT auth method is not configured")
        role_name = role or config.get("default_role") or ""
        if not role_name:
            raise PermissionDenied("missing role")
        if not is_role_name(role_name):
            raise PermissionDenied("role could not be found")
        settings = self._role(role_name)
        if settings is None:
            raise PermissionDenied(f'role "{role_name}" could not be found')
        svid = self._jwt_svid(config, settings, jwt_text)
        if svid is not None:
            return self._login_svid(role_name, settings, svid)
        if settings.get("bound_spiffe_ids"):
            raise PermissionDenied("this role accepts JWT-SVIDs of the cell's trust domain only")
        claims = self._verified_claims(config, jwt_text)
        self._check_times(settings, claims)
        issuer = config.get("bound_issuer")
        if issuer and claims.get("iss") != issuer:
            raise PermissionDenied("the JWT's issuer (iss) does not match the configured bound_issuer")
        self._check_bounds(settings, claims)
        user = self._user(settings, claims)
        token, entry = self._issue(settings, f"jwt-{user[:200]}", {"role": role_name})
        return token, entry, self.tokens.auth_data(token, entry)

    @staticmethod
    def _user(role: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        user = _scalar_text(_claim(claims, role["user_claim"]))
        if not user:
            raise PermissionDenied(f'claim "{role["user_claim"][:100]}" not found in token')
        return user

    def _issue(self, settings: Mapping[str, Any], display_name: str, meta: dict[str, str]) -> Any:
        """The login's token, shaped by the role's token settings."""
        return issue_login_token(self.tokens, settings, path=LOGIN_PATH, display_name=display_name, meta=meta)

    def _jwt_svid(self, config: Mapping[str, Any], role: Mapping[str, Any], jwt_text: object) -> Any:
        """The checked JWT-SVID when `jwt_text` is one of this trust domain's (its kid names
        a JWT-SVID key), None when it is some other JWT."""
        if not config.get("spiffe_trust_domain") or self.spiffe is None or not isinstance(jwt_text, str):
            return None
        try:
            kid = jwt.get_unverified_header(jwt_text).get("kid")
        except (jwt.PyJWTError, ValueError, TypeError):
            return None
        state = self.spiffe.ca.authorities()
        if not isinstance(kid, str) or kid not in state.jwt_keys():
            return None
        from keycell.control_plane.svid import JwtSvidError  # the identity core imports this module's peers

        audiences = role["bound_audiences"]
        if not audiences:
            raise PermissionDenied("a JWT-SVID needs a role with bound_audiences")
        last = "the JWT-SVID's audience (aud) does not match the role's bound_audiences"
        for audience in audiences:
            try:
                return self.spiffe.validate_jwt(jwt_text, audience)
            except JwtSvidError as exc:
                last = str(exc)
                if "audience" not in last:
                    break
        raise PermissionDenied(last)

    def _login_svid(
        self, role_name: str, settings: Mapping[str, Any], svid: Any
    ) -> tuple[str, TokenEntry, dict[str, Any]]:
        # Any workload of the trust domain can hold an SVID for an audience it picks, so
        # a role must say which SPIFFE IDs it takes, or say that it takes them all.
        patterns = settings.get("bound_spiffe_ids") or []
        if not (patterns or settings["bound_subject"] or settings.get("allow_any_spiffe_id")):
            raise PermissionDenied(
                "this role names no bound_spiffe_ids or bound_subject, so it refuses JWT-SVIDs; "
                "set allow_any_spiffe_id on the role to accept any SPIFFE ID of the trust domain"
            )
        if patterns and not any(_spiffe_match(p, svid.spiffe_id) for p in patterns):
            raise PermissionDenied("the JWT-SVID's SPIFFE ID does not match the role's bound_spiffe_ids")
        # The SVID's own checks (svid.validate_jwt_svid) replace the times, the issuer and
        # the signature; every bound check of the role applies as to any JWT.
        self._check_bounds(settings, svid.claims)
        user = self._user(settings, svid.claims)
        token, entry = self._issue(
            settings, f"jwt-{user[:200]}", {"role": role_name, "spiffe_id": svid.spiffe_id}
        )
        self.spiffe.record_login(svid, entry)
        return token, entry, self.tokens.auth_data(token, entry)

    def _verified_claims(self, config: Mapping[str, Any], jwt_text: object) -> dict[str, Any]:
        if not isinstance(jwt_text, str) or not jwt_text:
            raise PermissionDenied("missing jwt")
        if len(jwt_text) > MAX_JWT_CHARS:
            raise PermissionDenied(f"the JWT is longer than {MAX_JWT_CHARS} characters")
        try:
            header = jwt.get_unverified_header(jwt_text)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise PermissionDenied("the JWT is malformed (expected header.payload.signature)") from None
        alg = header.get("alg")
        allowed = config.get("jwt_supported_algs") or list(SUPPORTED_ALGS)
        if not isinstance(alg, str) or alg not in allowed:
            shown = (
                f" {alg}" if isinstance(alg, str) and alg in jwt.algorithms.get_default_algorithms() else ""
            )
            raise PermissionDenied(f"the JWT's signing algorithm{shown} is not allowed")
        kid = header.get("kid")
        for key in self._candidate_keys(config, alg, kid if isinstance(kid, str) else None):
            try:
                claims = jwt.decode(
                    jwt_text,
                    key=key,  # type: ignore[arg-type]
                    algorithms=[alg],
                    options={
                        "verify_signature": True,
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": False,
                        "verify_iss": False,
                    },
                )
            except jwt.InvalidSignatureError:
                continue
            except (jwt.PyJWTError, ValueError, TypeError):
                # Wrong key type for this algorithm, or an undecodable payload.
                continue
            if not isinstance(claims, dict):
                raise PermissionDenied("the JWT's payload is not a JSON object")
            return claims
        raise PermissionDenied("the JWT's signature did not verify with any configured key")

    @staticmethod
    def _candidate_keys(config: Mapping[str, Any], alg: str, kid: str | None) -> list[object]:
        wanted = _KEY_TYPES[alg[:2]]
        keys: list[object] = []
        jwks = config.get("jwks")
        if jwks:
            for jwk in jwks["keys"]:
                if kid is not None and jwk.get("kid") not in (None, kid):
                    continue
                if jwk.get("alg") not in (None, alg):
                    continue
                try:
                    keys.append(jwt.PyJWK.from_dict(jwk).key)
                except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                    continue
        for pem in config.get("jwt_validation_pubkeys", []):
            keys.append(serialization.load_pem_public_key(pem.encode()))
        return [k for k in keys if isinstance(k, wanted)]

    def _check_times(self, role: Mapping[str, Any], claims: Mapping[str, Any]) -> None:
        now = self.clock()
        exp_leeway = role["expiration_leeway"] or DEFAULT_EXPIRATION_LEEWAY
        nbf_leeway = role["not_before_leeway"] or DEFAULT_NOT_BEFORE_LEEWAY
        skew = role["clock_skew_leeway"] or DEFAULT_CLOCK_SKEW_LEEWAY
        exp_leeway, nbf_leeway, skew = (max(0, v) for v in (exp_leeway, nbf_leeway, skew))

        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise PermissionDenied("the JWT has no expiry (exp claim)")
        if now > exp + exp_leeway:
            raise PermissionDenied("the JWT has expired (exp)")
        nbf = claims.get("nbf")
        if nbf is not None:
            if isinstance(nbf, bool) or not isinstance(nbf, int | float):
                raise PermissionDenied("the JWT's nbf claim is not a time")
            if now + nbf_leeway < nbf:
                raise PermissionDenied("the JWT is not valid yet (nbf)")
        iat = claims.get("iat")
        if iat is not None:
            if isinstance(iat, bool) or not isinstance(iat, int | float):
                raise PermissionDenied("the JWT's iat claim is not a time")
            if iat > now + skew:
                raise PermissionDenied("the JWT was issued in the future (iat)")

    @staticmethod
    def _check_bounds(role: Mapping[str, Any], claims: Mapping[str, Any]) -> None:
        """The role's bound checks: audience, subject and bound claims."""
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        bound_audiences = role["bound_audiences"]
        if bound_audiences:
            if not any(isinstance(a, str) and a in bound_audiences for a in audiences):
                raise PermissionDenied("the JWT's audience (aud) does not match the role's bound_audiences")
        elif aud is not None:
            raise PermissionDenied("audience claim found in JWT but no audiences bound to the role")

        if role["bound_subject"] and claims.get("sub") != role["bound_subject"]:
            raise PermissionDenied("the JWT's subject (sub) does not match the role's bound_subject")

        for name, expected in role["bound_claims"].items():
            actual = _claim(claims, name)
            if actual is None:
                raise PermissionDenied(f'claim "{name[:100]}" is missing from the JWT')
            values = actual if isinstance(actual, list) else [actual]
            if not any(_scalar_text(v) in expected for v in values):
                raise PermissionDenied(f'claim "{name[:100]}" does not match an associated bound claim')

"""The JWT auth method over a real cell (sqlite and DynamoDB-on-moto ledgers).

Keys are generated here; JWTs are signed with pyjwt. Every refusal is checked to say
what failed without echoing the JWT.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from keycell.control_plane.auth.jwt.backend import JwtAuth
from keycell.control_plane.auth.token.store import TokenStore
from keycell.control_plane.errors import InvalidRequest, NotFound, PermissionDenied
from keycell.control_plane.revocations import RevocationSet
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock

ISSUER = "https://issuer.example.org"
AUDIENCE = "keycell"


@pytest.fixture(scope="module")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def public_pem(signing_key: ec.EllipticCurvePrivateKey) -> str:
    return (
        signing_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture
def tokens(cell: Cell, clock: ManualClock) -> TokenStore:
    return TokenStore(cell.barrier, RevocationSet(cell.barrier, "test-cell", clock=clock), clock=clock)


@pytest.fixture
def auth(cell: Cell, tokens: TokenStore, clock: ManualClock, public_pem: str) -> JwtAuth:
    method = JwtAuth(cell.barrier, tokens, clock=clock)
    method.write_config({"jwt_validation_pubkeys": [public_pem], "bound_issuer": ISSUER})
    method.write_role(
        "payments",
        {
            "role_type": "jwt",
            "bound_audiences": [AUDIENCE],
            "user_claim": "sub",
            "bound_claims": {"team": "payments"},
            "token_policies": ["payments-read"],
            "token_ttl": "1h",
            "token_max_ttl": "2h",
        },
    )
    return method


def claims(clock: ManualClock, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "spiffe://example.org/payments/api",
        "team": "payments",
        "iat": int(clock()),
        "nbf": int(clock()),
        "exp": int(clock()) + 300,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def sign(key: Any, body: dict[str, Any], alg: str = "ES256", **headers: Any) -> str:
    return jwt.encode(body, key, algorithm=alg, headers=headers or None)


def refused(auth: JwtAuth, role: str, token: str, match: str) -> None:
    with pytest.raises(PermissionDenied, match=match) as caught:
        auth.login(role, token)
    message = str(caught.value)
    for part in token.split("."):
        assert not part or part not in message


def test_login_with_a_valid_es256_jwt_returns_a_working_token(
    auth: JwtAuth, tokens: TokenStore, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    token, entry, block = auth.login("payments", sign(signing_key, claims(clock)))
    assert tokens.lookup(token).accessor == entry.accessor
    assert entry.path == "auth/jwt/login" and entry.orphan
    assert entry.display_name == "jwt-spiffe://example.org/payments/api"
    assert entry.meta == {"role": "payments"}
    assert entry.policies == ["default", "payments-read"]
    assert block["client_token"] == token and block["accessor"] == entry.accessor
    assert block["policies"] == block["token_policies"] == ["default", "payments-read"]
    assert block["metadata"] == {"role": "payments"} and block["lease_duration"] == 3600
    assert block["renewable"] is True and block["orphan"] is True and block["token_type"] == "service"
    assert block["entity_id"] == ""


def test_a_login_token_renews_only_up_to_the_roles_max_ttl(
    auth: JwtAuth, tokens: TokenStore, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    token, _, _ = auth.login("payments", sign(signing_key, claims(clock)))
    clock.now += 3000
    assert tokens.renew(token, "10h").ttl(clock()) == 7200 - 3000


def test_an_expired_jwt_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    stale = claims(clock, iat=int(clock()) - 7200, nbf=int(clock()) - 7200, exp=int(clock()) - 3600)
    refused(auth, "payments", sign(signing_key, stale), "expired")


def test_a_jwt_without_expiry_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    refused(auth, "payments", sign(signing_key, claims(clock, exp=None)), "expiry")


def test_a_jwt_not_valid_yet_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    later = claims(clock, nbf=int(clock()) + 3600, exp=int(clock()) + 7200)
    refused(auth, "payments", sign(signing_key, later), "not valid yet")


def test_a_wrong_audience_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    refused(auth, "payments", sign(signing_key, claims(clock, aud=["someone-else"])), "audience")


def test_a_wrong_issuer_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    refused(auth, "payments", sign(signing_key, claims(clock, iss="https://evil.example")), "issuer")


def test_a_bad_signature_is_refused(auth: JwtAuth, clock: ManualClock) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    refused(auth, "payments", sign(impostor, claims(clock)), "signature")


def test_a_tampered_payload_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    header, _, signature = sign(signing_key, claims(clock)).split(".")
    forged = jwt.utils.base64url_encode(json.dumps(claims(clock, team="payments", sub="root")).encode())
    refused(auth, "payments", f"{header}.{forged.decode()}.{signature}", "signature")


def test_unsigned_and_hmac_jwts_are_refused(auth: JwtAuth, clock: ManualClock) -> None:
    unsigned = jwt.encode(claims(clock), None, algorithm="none")  # type: ignore[arg-type]
    refused(auth, "payments", unsigned, "algorithm")
    refused(auth, "payments", jwt.encode(claims(clock), "x" * 32, algorithm="HS256"), "algorithm")


def test_an_unknown_role_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    refused(auth, "nobody", sign(signing_key, claims(clock)), "could not be found")


def test_a_missing_bound_claim_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    refused(auth, "payments", sign(signing_key, claims(clock, team=None)), 'claim "team" is missing')


def test_a_mismatched_bound_claim_is_refused(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    refused(auth, "payments", sign(signing_key, claims(clock, team="billing")), 'claim "team" does not match')


def test_malformed_jwts_are_refused(auth: JwtAuth) -> None:
    refused(auth, "payments", "not-a-jwt", "malformed")


def test_a_bound_subject_must_match(
    auth: JwtAuth, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    auth.write_role("api", {"bound_subject": "spiffe://example.org/api", "bound_audiences": AUDIENCE})
    refused(auth, "api", sign(signing_key, claims(clock)), "subject")
    token, _, _ = auth.login("api", sign(signing_key, claims(clock, sub="spiffe://example.org/api")))
    assert token.startswith("kc.")


def test_jwks_keys_are_chosen_by_kid(cell: Cell, tokens: TokenStore, clock: ManualClock) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    method = JwtAuth(cell.barrier, tokens, clock=clock)
    method.write_config({"jwks": {"keys": [{**jwk, "kid": "k1", "use": "sig"}]}})
    method.write_role("ci", {"bound_audiences": [AUDIENCE], "user_claim": "sub"})
    _, entry, _ = method.login("ci", sign(rsa_key, claims(clock), "RS256", kid="k1"))
    assert entry.display_name == "jwt-spiffe://example.org/payments/api"
    with pytest.raises(PermissionDenied, match="signature"):
        method.login("ci", sign(rsa_key, claims(clock), "RS256", kid="k2"))


def test_roles_round_trip_list_and_delete(auth: JwtAuth) -> None:
    role = auth.read_role("payments")
    assert role["bound_audiences"] == [AUDIENCE] and role["bound_claims"] == {"team": "payments"}
    assert role["token_policies"] == ["payments-read"] and role["token_ttl"] == 3600
    assert role["token_max_ttl"] == 7200 and role["user_claim"] == "sub" and role["role_type"] == "jwt"
    auth.write_role("payments", {"token_ttl": 60})  # an update keeps the other fields
    assert auth.read_role("payments")["bound_claims"] == {"team": "payments"}
    assert auth.list_roles() == ["payments"]
    auth.delete_role("payments")
    assert auth.list_roles() == []
    with pytest.raises(NotFound):
        auth.read_role("payments")


def test_a_role_needs_a_bound_constraint(auth: JwtAuth) -> None:
    with pytest.raises(InvalidRequest, match="bound constraint"):
        auth.write_role("open", {"user_claim": "sub", "token_policies": ["admin"]})


def test_config_refuses_what_keycell_cannot_honour(auth: JwtAuth) -> None:
    with pytest.raises(InvalidRequest, match="fetches no keys"):
        auth.write_config({"jwks_url": "https://issuer.example.org/keys"})
    with pytest.raises(InvalidRequest, match="PEM"):
        auth.write_config({"jwt_validation_pubkeys": ["not a key"]})
    assert auth.read_config()["bound_issuer"] == ISSUER  # unchanged


def test_a_roles_revocation_bound_is_kept_shown_and_carried_by_its_logins_tokens(
    auth: JwtAuth, tokens: TokenStore, clock: ManualClock, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    assert "max_revocation_staleness" not in auth.read_role("payments")
    auth.write_role("payments", {"max_revocation_staleness": 1, "on_stale": "local-only"})
    role = auth.read_role("payments")
    assert role["max_revocation_staleness"] == 1.0 and role["on_stale"] == "local-only"
    assert role["bound_claims"] == {"team": "payments"}, "an update keeps the fields not given"
    token, _, _ = auth.login("payments", sign(signing_key, claims(clock)))
    assert tokens.lookup(token).stale_bound == {"max_revocation_staleness": 1.0, "on_stale": "local-only"}
    with pytest.raises(InvalidRequest, match="on_stale must be one of"):
        auth.write_role("payments", {"on_stale": "sometimes"})
    assert auth.read_role("payments")["on_stale"] == "local-only", "a refused write changes nothing"
    auth.write_role("payments", {"max_revocation_staleness": None})
    assert "max_revocation_staleness" not in auth.read_role("payments")

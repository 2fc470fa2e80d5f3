"""JWT-SVID login applies every bound check of its JWT role (issue 20, item 1).

A workload of the trust domain chooses its own SPIFFE ID (whatever its registration
entry says) and its own audience, so an SVID alone proves only "some workload of this
trust domain". A role's bound_claims, user_claim and bound_subject apply to it as they
apply to any JWT, and a role that names neither bound_spiffe_ids nor bound_subject
refuses SVIDs unless it sets `allow_any_spiffe_id`.

SVIDs are signed here with the trust domain's real JWT key (through the key backend),
so a test can give one a claim the cell's issuer never adds.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.control_plane.auth.jwt.backend import JwtAuth
from keycell.control_plane.auth.token.store import TokenStore
from keycell.control_plane.errors import InvalidRequest, PermissionDenied
from keycell.control_plane.identity import Identity
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.svid import IdentityCA, b64url
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock

TD = "example.org"
AUD = "keycell"
WORKLOAD = f"spiffe://{TD}/workload/api"


@pytest.fixture
def identity(cell: Cell, clock: ManualClock) -> Identity:
    ca = IdentityCA(cell.barrier, SoftwareKeyBackend(), trust_domain=TD, clock=clock)
    return Identity(cell.barrier, ca, RevocationSet(cell.barrier, "test", clock=clock), clock=clock)


@pytest.fixture
def auth(cell: Cell, clock: ManualClock, identity: Identity) -> JwtAuth:
    tokens = TokenStore(cell.barrier, identity.revocations, clock=clock)
    method = JwtAuth(cell.barrier, tokens, clock=clock)
    method.spiffe = identity
    method.write_config({"spiffe_trust_domain": True})
    return method


def svid(identity: Identity, clock: ManualClock, **extra: Any) -> str:
    """A JWT-SVID for WORKLOAD signed by the trust domain's active JWT key, with `extra` claims."""
    authority = identity.ca.authorities().active
    header = {"alg": "ES256", "kid": authority.jwt_kid, "typ": "JWT"}
    now = int(clock())
    claims = {"sub": WORKLOAD, "aud": [AUD], "exp": now + 300, "iat": now, **extra}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(identity.ca.keys.sign(authority.jwt_key, signing_input.encode()).value)
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_an_svid_without_the_roles_bound_claim_is_refused(
    auth: JwtAuth, identity: Identity, clock: ManualClock
) -> None:
    auth.write_role(
        "ops",
        {
            "bound_audiences": [AUD],
            "bound_spiffe_ids": [f"spiffe://{TD}/workload/*"],
            "bound_claims": {"grp": "ops"},
        },
    )
    with pytest.raises(PermissionDenied, match='claim "grp" is missing'):
        auth.login("ops", svid(identity, clock))
    with pytest.raises(PermissionDenied, match='claim "grp" does not match'):
        auth.login("ops", svid(identity, clock, grp="dev"))
    _, entry, _ = auth.login("ops", svid(identity, clock, grp="ops"))
    assert entry.meta["spiffe_id"] == WORKLOAD


def test_a_role_bound_only_by_claims_refuses_svids(
    auth: JwtAuth, identity: Identity, clock: ManualClock
) -> None:
    # The attack of the issue: a role meant for an outside IdP's "ops" group.
    auth.write_role(
        "ops", {"bound_audiences": [AUD], "bound_claims": {"grp": "ops"}, "token_policies": ["ops"]}
    )
    with pytest.raises(PermissionDenied, match="allow_any_spiffe_id"):
        auth.login("ops", svid(identity, clock, grp="ops"))


def test_a_role_bound_only_by_audience_refuses_svids_unless_it_says_so(
    auth: JwtAuth, identity: Identity, clock: ManualClock
) -> None:
    auth.write_role("any", {"bound_audiences": [AUD]})
    with pytest.raises(PermissionDenied, match="allow_any_spiffe_id"):
        auth.login("any", svid(identity, clock))
    auth.write_role("any", {"allow_any_spiffe_id": True})
    assert auth.read_role("any")["allow_any_spiffe_id"] is True
    _, entry, _ = auth.login("any", svid(identity, clock))
    assert entry.meta["spiffe_id"] == WORKLOAD


def test_allow_any_spiffe_id_is_a_boolean(auth: JwtAuth) -> None:
    with pytest.raises(InvalidRequest, match="allow_any_spiffe_id must be a boolean"):
        auth.write_role("any", {"bound_audiences": [AUD], "allow_any_spiffe_id": "yes please"})


def test_an_svid_needs_the_roles_user_claim(auth: JwtAuth, identity: Identity, clock: ManualClock) -> None:
    auth.write_role(
        "mail", {"bound_audiences": [AUD], "bound_spiffe_ids": [f"spiffe://{TD}/*/*"], "user_claim": "email"}
    )
    with pytest.raises(PermissionDenied, match='claim "email" not found'):
        auth.login("mail", svid(identity, clock))
    _, entry, _ = auth.login("mail", svid(identity, clock, email="api@example.org"))
    assert entry.display_name == "jwt-api@example.org"


def test_an_svid_must_match_the_roles_bound_subject(
    auth: JwtAuth, identity: Identity, clock: ManualClock
) -> None:
    auth.write_role("web", {"bound_audiences": [AUD], "bound_subject": f"spiffe://{TD}/web"})
    with pytest.raises(PermissionDenied, match="bound_subject"):
        auth.login("web", svid(identity, clock))
    auth.write_role("api", {"bound_audiences": [AUD], "bound_subject": WORKLOAD})
    _, entry, _ = auth.login("api", svid(identity, clock))
    assert entry.display_name == f"jwt-{WORKLOAD}"

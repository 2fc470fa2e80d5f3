"""JWT-SVID login: a workload fetches a JWT-SVID from the agent (spiffe library) and trades
it for a Keycell token at auth/jwt/login (hvac); revoking the SPIFFE ID or the SVID makes
the regional API and the agent refuse it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import hvac
import jwt
import pytest
from hvac.exceptions import Forbidden
from spiffe import WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import SpiffeId
from spiffe.workloadapi.errors import FetchJwtSvidError, ValidateJwtSvidError

from tests.identity.conftest import ROOT, TRUST_DOMAIN, WORKLOAD_ID, Deployment, this_process_selectors

AUDIENCE = "keycell"
ROLE = "workloads"


@pytest.fixture(scope="module")
def vault(deployment: Deployment) -> hvac.Client:
    client = hvac.Client(url=deployment.url, token=ROOT)
    client.sys.create_or_update_policy(
        "payments-read", 'path "secret/data/payments/*" { capabilities = ["read"] }'
    )
    client.write("auth/jwt/config", spiffe_trust_domain=True)
    client.write(
        f"auth/jwt/role/{ROLE}",
        role_type="jwt",
        bound_audiences=[AUDIENCE],
        bound_spiffe_ids=[f"spiffe://{TRUST_DOMAIN}/workload/*"],
        token_policies=["payments-read"],
        token_ttl="1h",
    )
    return client


@pytest.fixture
def workload(deployment: Deployment) -> Iterator[WorkloadApiClient]:
    client = WorkloadApiClient(socket_path=deployment.socket, default_timeout=15)
    yield client
    client.close()


def login(deployment: Deployment, svid: str, role: str = ROLE) -> dict:
    anonymous = hvac.Client(url=deployment.url)
    return anonymous.auth.jwt.jwt_login(role=role, jwt=svid)["auth"]


def test_a_jwt_svid_logs_in_and_the_token_is_bound_to_the_spiffe_id(
    deployment: Deployment, vault: hvac.Client, workload: WorkloadApiClient
) -> None:
    svid = workload.fetch_jwt_svid(audience={AUDIENCE})
    auth = login(deployment, svid.token)
    assert "payments-read" in auth["policies"]
    assert auth["metadata"]["spiffe_id"] == WORKLOAD_ID
    me = hvac.Client(url=deployment.url, token=auth["client_token"]).auth.token.lookup_self()["data"]
    assert me["meta"]["spiffe_id"] == WORKLOAD_ID
    assert me["display_name"] == f"jwt-{WORKLOAD_ID}"


def test_a_role_whose_spiffe_id_pattern_does_not_match_refuses(
    deployment: Deployment, vault: hvac.Client, workload: WorkloadApiClient
) -> None:
    vault.write(
        "auth/jwt/role/billing",
        bound_audiences=[AUDIENCE],
        bound_spiffe_ids=[f"spiffe://{TRUST_DOMAIN}/billing/*"],
        token_policies=["default"],
    )
    svid = workload.fetch_jwt_svid(audience={AUDIENCE})
    with pytest.raises(Forbidden, match="bound_spiffe_ids"):
        login(deployment, svid.token, role="billing")


def test_a_jwt_svid_for_another_audience_is_refused(
    deployment: Deployment, vault: hvac.Client, workload: WorkloadApiClient
) -> None:
    svid = workload.fetch_jwt_svid(audience={"someone-else"})
    with pytest.raises(Forbidden, match="audience"):
        login(deployment, svid.token)


def test_revoking_one_svid_refuses_it_and_the_tokens_it_logged_in(
    deployment: Deployment, vault: hvac.Client, workload: WorkloadApiClient
) -> None:
    svid = workload.fetch_jwt_svid(audience={AUDIENCE, "revocable-svid"})
    auth = login(deployment, svid.token)
    jti = jwt.decode(svid.token, options={"verify_signature": False})["jti"]
    vault.write("identity/revoke", svid=jti)
    with pytest.raises(Forbidden, match="revoked"):
        login(deployment, svid.token)
    with pytest.raises(Forbidden):
        hvac.Client(url=deployment.url, token=auth["client_token"]).auth.token.lookup_self()
    # The agent hears of it at its next sync and refuses to validate it.
    deadline = time.monotonic() + 10
    while True:
        try:
            workload.validate_jwt_svid(svid.token, AUDIENCE)
        except ValidateJwtSvidError:
            break
        assert time.monotonic() < deadline, "the agent kept validating a revoked SVID"
        time.sleep(0.2)


def test_revoking_a_spiffe_id_refuses_it_at_the_api_and_at_the_agent(
    deployment: Deployment, vault: hvac.Client, workload: WorkloadApiClient
) -> None:
    doomed = f"spiffe://{TRUST_DOMAIN}/workload/doomed"
    deployment.admin.request(
        "POST",
        "identity/entries",
        {"spiffe_id": doomed, "parent_id": deployment.agent_id, "selectors": this_process_selectors()},
    )
    deadline = time.monotonic() + 10
    while True:  # the agent picks the new entry up at its next sync
        try:
            svid = workload.fetch_jwt_svid(audience={AUDIENCE}, subject=SpiffeId(doomed))
            break
        except FetchJwtSvidError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    auth = login(deployment, svid.token)
    vault.write("identity/revoke", spiffe_id=doomed)

    with pytest.raises(Forbidden, match="revoked"):
        login(deployment, svid.token)
    with pytest.raises(Forbidden):
        hvac.Client(url=deployment.url, token=auth["client_token"]).auth.token.lookup_self()
    deadline = time.monotonic() + 10
    while True:
        try:
            workload.fetch_jwt_svid(audience={AUDIENCE}, subject=SpiffeId(doomed))
        except FetchJwtSvidError as exc:
            assert "PERMISSION_DENIED" in str(exc)
            break
        assert time.monotonic() < deadline, "the agent kept issuing for a revoked SPIFFE ID"
        time.sleep(0.2)
    with pytest.raises(ValidateJwtSvidError):
        workload.validate_jwt_svid(svid.token, AUDIENCE)
    # The other identity on the same node is untouched.
    assert str(workload.fetch_jwt_svid(audience={AUDIENCE}).spiffe_id) == WORKLOAD_ID

"""CA rotation seen through the Workload API: a prepared authority's key is published
ahead of use, activation signs new SVIDs with it, tainting the old authority makes the
agent re-issue every SVID the old one signed at once, and revoking it drops its key
from the bundle so its JWT-SVIDs no longer validate."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from spiffe import WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import TrustDomain
from spiffe.workloadapi.errors import ValidateJwtSvidError

from keycell.agent.agent import Agent, renewal_time
from keycell.testing.clock import ManualClock
from tests.identity.conftest import TRUST_DOMAIN, Deployment, this_process_selectors

LONG_LIVED = f"spiffe://{TRUST_DOMAIN}/workload/long-lived"


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def jwt_kids(client: WorkloadApiClient) -> set[str]:
    bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert bundle is not None
    return set(bundle.jwt_authorities)


def test_tainting_an_authority_reissues_what_it_signed_and_revoking_it_drops_its_key(
    deployment: Deployment,
) -> None:
    admin = deployment.admin
    admin.request(
        "POST",
        "identity/entries",
        {
            "spiffe_id": LONG_LIVED,
            "parent_id": deployment.agent_id,
            "selectors": this_process_selectors(),
            "x509_svid_ttl": 3600,  # no renewal by age during the test: only the taint can replace it
        },
    )
    client = WorkloadApiClient(socket_path=deployment.socket, default_timeout=15)
    try:

        def long_lived() -> object | None:
            return next((s for s in client.fetch_x509_svids() if str(s.spiffe_id) == LONG_LIVED), None)

        eventually(lambda: long_lived() is not None, "the agent to issue the new entry's SVID")
        first = long_lived()
        assert "intermediate a1" in first.cert_chain[1].subject.rfc4514_string()  # type: ignore[attr-defined]
        old_jwt = client.fetch_jwt_svid(audience={"rotation"}, subject=first.spiffe_id)  # type: ignore[attr-defined]
        kids_before = jwt_kids(client)

        streamed: list[tuple[int, str]] = []
        updated = threading.Event()

        def on_update(context: object) -> None:
            for svid in context.x509_svids:  # type: ignore[attr-defined]
                if str(svid.spiffe_id) == LONG_LIVED:
                    item = (svid.leaf.serial_number, svid.cert_chain[1].subject.rfc4514_string())
                    if item not in streamed:
                        streamed.append(item)
                    if "intermediate a2" in item[1]:
                        updated.set()

        handler = client.stream_x509_contexts(on_update, lambda e: None, retry_connect=False)
        try:
            admin.request("POST", "identity/authorities", {"action": "prepare"})
            eventually(
                lambda: len(jwt_kids(client)) == len(kids_before) + 1, "the prepared key in the bundle"
            )
            admin.request("POST", "identity/authorities", {"action": "activate"})
            admin.request("POST", "identity/authorities", {"action": "taint", "authority": "a1"})
            assert updated.wait(15), f"no re-issued SVID after the taint; streamed {streamed}"
        finally:
            handler.cancel()
        assert streamed[0][0] == first.leaf.serial_number  # type: ignore[attr-defined]
        assert any("intermediate a2" in issuer for _, issuer in streamed)

        # The old authority's JWT-SVID still validates until the authority is revoked.
        client.validate_jwt_svid(old_jwt.token, "rotation")
        admin.request("POST", "identity/authorities", {"action": "revoke", "authority": "a1"})
        eventually(lambda: len(jwt_kids(client)) == len(kids_before), "a1's key to leave the bundle")
        try:
            client.validate_jwt_svid(old_jwt.token, "rotation")
            raise AssertionError("a JWT-SVID of a revoked authority validated")
        except ValidateJwtSvidError:
            pass
        states = admin.request("GET", "identity/authorities")["data"]["authorities"]
        assert [(a["id"], a["state"]) for a in states] == [("a1", "revoked"), ("a2", "active")]
    finally:
        client.close()


def test_renewal_happens_at_half_life_within_ten_percent() -> None:
    rng = random.Random(1)
    times = [renewal_time(1000.0, 1000.0 + 3600, rng) for _ in range(2000)]
    assert all(1000 + 1620 <= t <= 1000 + 1980 for t in times)  # 1800 s +/- 10%
    assert max(times) - min(times) > 300  # and it is spread, not a fixed point


def test_the_agent_renews_its_own_token_at_half_life(deployment: Deployment) -> None:
    joined = deployment.admin.request("POST", "identity/join-token", {})["data"]
    clock = ManualClock()
    agent = Agent(deployment.url, {"method": "join_token", "token": joined["token"]}, clock=clock)
    agent.attest()
    first_token = agent.client.token
    due = agent._token_renew_at
    clock.advance(due - clock() + 1)
    agent._keep_token()
    assert agent.client.token == first_token  # renewed, not replaced
    assert agent._token_renew_at > due
    agent.client.close()


def test_the_bundle_is_a_spiffe_jwks_served_without_a_token(deployment: Deployment) -> None:
    import requests

    reply = requests.get(f"{deployment.url}/v1/identity/bundle", timeout=15)
    assert reply.status_code == 200
    bundle = reply.json()
    assert isinstance(bundle["spiffe_sequence"], int) and bundle["spiffe_sequence"] >= 1
    assert bundle["spiffe_refresh_hint"] > 0
    uses = {key["use"] for key in bundle["keys"]}
    assert uses == {"x509-svid", "jwt-svid"}
    for key in bundle["keys"]:
        assert "d" not in key  # public material only
        if key["use"] == "x509-svid":
            assert len(key["x5c"]) == 1
        else:
            assert key["kid"] and key["alg"] == "ES256"

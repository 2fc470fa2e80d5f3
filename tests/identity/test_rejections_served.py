"""The rejection matrix as a caller meets it: through the agent's ValidateJWTSVID (the
gRPC status and its message) and through auth/jwt/login (403 and its message), for the
forgeries a client can make without the trust domain's keys. (Forgeries that need the
keys, such as a foreign trust domain signed by a real authority, are in
test_rejections.py.)"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable

import grpc
import hvac
import pytest
import requests
from hvac.exceptions import Forbidden
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from keycell.control_plane.svid import b64url, b64url_decode
from tests.identity.conftest import ROOT, Deployment

AUDIENCE = "keycell"


def _parts(token: str) -> tuple[dict, dict, str]:
    head, payload, signature = token.split(".")
    return json.loads(b64url_decode(head)), json.loads(b64url_decode(payload)), signature


def _join(header: dict, claims: dict, signature: str) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}.{signature}"


def alg_none(token: str, jwks: dict) -> str:
    header, claims, _ = _parts(token)
    return _join({**header, "alg": "none"}, claims, "")


def hs256_with_the_public_key(token: str, jwks: dict) -> str:
    header, claims, _ = _parts(token)
    head = b64url(json.dumps({**header, "alg": "HS256"}).encode())
    body = b64url(json.dumps(claims).encode())
    key = json.dumps(jwks["keys"][0]).encode()  # what an attacker has: the published key
    return f"{head}.{body}.{b64url(hmac.new(key, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"


def unknown_kid(token: str, jwks: dict) -> str:
    header, claims, signature = _parts(token)
    return _join({**header, "kid": "not-a-key"}, claims, signature)


def tampered_signature(token: str, jwks: dict) -> str:
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{signature[:-6]}{'AAAAAA' if signature[-6:] != 'AAAAAA' else 'BBBBBB'}"


def tampered_subject(token: str, jwks: dict) -> str:
    head, _, signature = token.split(".")
    _, claims, _ = _parts(token)
    return f"{head}.{b64url(json.dumps({**claims, 'sub': claims['sub'] + '-admin'}).encode())}.{signature}"


def extra_header_field(token: str, jwks: dict) -> str:
    header, claims, signature = _parts(token)
    return _join({**header, "jku": "https://attacker.example/jwks"}, claims, signature)


CASES: dict[str, tuple[Callable[[str, dict], str], str]] = {
    "alg none": (alg_none, 'alg "none"'),
    "HS256 with the public key": (hs256_with_the_public_key, "symmetric"),
    "unknown kid": (unknown_kid, "kid names no key"),
    "tampered signature": (tampered_signature, "signature does not verify"),
    "tampered subject": (tampered_subject, "signature does not verify"),
    "extra header field": (extra_header_field, "unexpected field"),
}


@pytest.fixture(scope="module")
def genuine(deployment: Deployment) -> tuple[str, dict]:
    client = WorkloadApiClient(socket_path=deployment.socket, default_timeout=15)
    token = client.fetch_jwt_svid(audience={AUDIENCE}).token
    client.close()
    vault = hvac.Client(url=deployment.url, token=ROOT)
    vault.write("auth/jwt/config", spiffe_trust_domain=True)
    vault.write(
        "auth/jwt/role/served", bound_audiences=[AUDIENCE], bound_spiffe_ids=["spiffe://example.org/*/*"]
    )
    bundle = requests.get(f"{deployment.url}/v1/identity/bundle", timeout=15).json()
    jwks = {"keys": [k for k in bundle["keys"] if k["use"] == "jwt-svid"]}
    return token, jwks


@pytest.mark.parametrize("case", list(CASES))
def test_the_agent_refuses_a_forged_jwt_svid_with_a_clear_error(
    case: str, deployment: Deployment, genuine: tuple[str, dict]
) -> None:
    forge, message = CASES[case]
    token = forge(*genuine)
    channel = grpc.insecure_channel(deployment.socket.replace("unix://", "unix:"))
    with channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience=AUDIENCE, svid=token),
                metadata=[("workload.spiffe.io", "true")],
                timeout=15,
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert token not in raised.value.details()


@pytest.mark.parametrize("case", list(CASES))
def test_the_regional_api_refuses_a_forged_jwt_svid_at_login(
    case: str, deployment: Deployment, genuine: tuple[str, dict]
) -> None:
    forge, message = CASES[case]
    token = forge(*genuine)
    with pytest.raises(Forbidden) as raised:
        hvac.Client(url=deployment.url).auth.jwt.jwt_login(role="served", jwt=token)
    if case != "unknown kid":  # a kid the trust domain does not know is not a JWT-SVID to it at all
        assert message in str(raised.value)
    assert token not in str(raised.value)


def test_the_genuine_token_is_accepted_by_both(deployment: Deployment, genuine: tuple[str, dict]) -> None:
    token, _ = genuine
    client = WorkloadApiClient(socket_path=deployment.socket, default_timeout=15)
    assert client.validate_jwt_svid(token, AUDIENCE)
    client.close()
    assert hvac.Client(url=deployment.url).auth.jwt.jwt_login(role="served", jwt=token)["auth"][
        "client_token"
    ]

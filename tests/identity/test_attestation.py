"""Node attestation (join token, AWS instance identity document, Kubernetes projected
service-account token), registration entries, and what an agent may have signed.

The evidence is made here: an RSA certificate standing in for AWS's instance identity
signer, and a service-account signing key published as the cluster's JWKS."""

from __future__ import annotations

import base64
import datetime
import json
import time

import boto3
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from keycell.adapters.identity.aws_ec2 import Ec2InstanceTags
from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.control_plane.errors import InvalidRequest, NotFound, PermissionDenied
from keycell.control_plane.identity import Identity, server_id
from keycell.control_plane.ledger import Kind, iter_prefix
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.svid import IdentityCA
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock

TD = "example.org"


@pytest.fixture
def identity(cell: Cell, clock: ManualClock) -> Identity:
    ca = IdentityCA(cell.barrier, SoftwareKeyBackend(), trust_domain=TD, clock=clock)
    return Identity(cell.barrier, ca, RevocationSet(cell.barrier, "test", clock=clock), clock=clock)


# --- join tokens ------------------------------------------------------------------------------


def test_a_join_token_attests_once(identity: Identity) -> None:
    token, agent_id = identity.create_join_token()
    agent = identity.attest({"method": "join_token", "token": token})
    assert agent.agent_id == agent_id
    assert agent_id.startswith(f"spiffe://{TD}/keycell/agent/join_token/")
    with pytest.raises(PermissionDenied, match="already used"):
        identity.attest({"method": "join_token", "token": token})


def test_an_expired_or_unknown_join_token_is_refused(identity: Identity, clock: ManualClock) -> None:
    token, _ = identity.create_join_token(ttl=60)
    clock.advance(61)
    with pytest.raises(PermissionDenied, match="unknown, expired"):
        identity.attest({"method": "join_token", "token": token})
    with pytest.raises(PermissionDenied):
        identity.attest({"method": "join_token", "token": "made-up"})


def test_the_join_token_is_not_stored_in_the_clear(cell: Cell, identity: Identity) -> None:
    token, _ = identity.create_join_token()
    paths = [i.key.path for i in iter_prefix(cell.barrier, Kind.IDENTITY_ENTRY, "join-token/")]
    assert paths and all(token not in p for p in paths)


# --- AWS instance identity documents ----------------------------------------------------------


def _signer() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test instance identity signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


def _iid(key: rsa.RSAPrivateKey, **extra: object) -> dict[str, str]:
    document = json.dumps(
        {
            "accountId": "123456789012",
            "region": "eu-west-1",
            "instanceId": "i-0abc123",
            "availabilityZone": "eu-west-1a",
            "instanceType": "t3.micro",
            "imageId": "ami-0123",
            **extra,
        }
    )
    signature = key.sign(document.encode(), padding.PKCS1v15(), hashes.SHA256())
    return {"method": "aws_iid", "document": document, "signature": base64.b64encode(signature).decode()}


def test_an_aws_instance_identity_document_attests_with_selectors(identity: Identity) -> None:
    key, cert = _signer()
    identity.write_config({"aws_iid": {"cert_pem": cert}})
    agent = identity.attest(_iid(key))
    assert agent.agent_id == f"spiffe://{TD}/keycell/agent/aws_iid/123456789012/eu-west-1/i-0abc123"
    assert {
        "aws_iid:account:123456789012",
        "aws_iid:region:eu-west-1",
        "aws_iid:instance_id:i-0abc123",
    } <= set(agent.selectors)
    assert not any(s.startswith("aws_iid:tag:") for s in agent.selectors)  # no tag reader configured


def test_instance_tags_are_read_from_ec2(identity: Identity, aws_endpoint: str) -> None:
    ec2 = boto3.client("ec2", region_name="eu-west-1", endpoint_url=aws_endpoint)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    instance = ec2.run_instances(
        ImageId=image,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "role", "Value": "web"}]}],
    )["Instances"][0]["InstanceId"]
    key, cert = _signer()
    identity.write_config({"aws_iid": {"cert_pem": cert}})
    identity.instance_tags = Ec2InstanceTags(endpoint_url=aws_endpoint)
    agent = identity.attest(_iid(key, instanceId=instance))
    assert "aws_iid:tag:role:web" in agent.selectors
    assert f"aws_iid:instance_id:{instance}" in agent.selectors


def test_an_instance_identity_document_signed_by_another_key_is_refused(identity: Identity) -> None:
    _, cert = _signer()
    impostor, _ = _signer()
    identity.write_config({"aws_iid": {"cert_pem": cert}})
    with pytest.raises(PermissionDenied, match="signature does not verify"):
        identity.attest(_iid(impostor))


def test_an_edited_instance_identity_document_is_refused(identity: Identity) -> None:
    key, cert = _signer()
    identity.write_config({"aws_iid": {"cert_pem": cert}})
    evidence = _iid(key)
    evidence["document"] = evidence["document"].replace("123456789012", "999999999999")
    with pytest.raises(PermissionDenied, match="signature does not verify"):
        identity.attest(evidence)


def test_aws_attestation_without_configuration_is_refused(identity: Identity) -> None:
    key, _ = _signer()
    with pytest.raises(PermissionDenied, match="not configured"):
        identity.attest(_iid(key))


# --- Kubernetes projected service-account tokens ----------------------------------------------


def _cluster() -> tuple[ec.EllipticCurvePrivateKey, dict[str, object]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "sa-signer-1"
    return key, {"keys": [jwk]}


def _psat(key: ec.EllipticCurvePrivateKey, *, audience: str = "keycell", exp_in: int = 600) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://kubernetes.default.svc",
        "aud": [audience],
        "sub": "system:serviceaccount:spire:agent",
        "exp": now + exp_in,
        "iat": now,
        "kubernetes.io": {
            "namespace": "spire",
            "serviceaccount": {"name": "agent", "uid": "sa-uid"},
            "pod": {"name": "agent-7f9c", "uid": "pod-uid"},
            "node": {"name": "node-a", "uid": "0f6e6a3c-node-a"},
        },
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "sa-signer-1"})


def test_a_projected_service_account_token_attests_with_selectors(identity: Identity) -> None:
    key, jwks = _cluster()
    identity.write_config({"k8s_psat": {"clusters": {"prod": {"jwks": jwks, "audience": "keycell"}}}})
    agent = identity.attest({"method": "k8s_psat", "cluster": "prod", "token": _psat(key)})
    assert agent.agent_id == f"spiffe://{TD}/keycell/agent/k8s_psat/prod/0f6e6a3c-node-a"
    assert {"k8s_psat:agent_ns:spire", "k8s_psat:agent_sa:agent", "k8s_psat:cluster:prod"} <= set(
        agent.selectors
    )


@pytest.mark.parametrize(
    ("token_args", "message"),
    [({"audience": "someone-else"}, "audience"), ({"exp_in": -600}, "expired")],
)
def test_a_bad_service_account_token_is_refused(identity: Identity, token_args: dict, message: str) -> None:
    key, jwks = _cluster()
    identity.write_config({"k8s_psat": {"clusters": {"prod": {"jwks": jwks, "audience": "keycell"}}}})
    with pytest.raises(PermissionDenied, match=message):
        identity.attest({"method": "k8s_psat", "cluster": "prod", "token": _psat(key, **token_args)})


def test_a_service_account_token_from_another_signer_is_refused(identity: Identity) -> None:
    _, jwks = _cluster()
    other, _ = _cluster()
    identity.write_config({"k8s_psat": {"clusters": {"prod": {"jwks": jwks}}}})
    with pytest.raises(PermissionDenied, match="signature"):
        identity.attest({"method": "k8s_psat", "cluster": "prod", "token": _psat(other)})


# --- entries and what an agent may have signed ----------------------------------------------------


def test_node_alias_entries_give_an_agent_the_workloads_under_the_alias(identity: Identity) -> None:
    key, cert = _signer()
    identity.write_config({"aws_iid": {"cert_pem": cert}})
    agent = identity.attest(_iid(key))
    alias = f"spiffe://{TD}/node/eu-web"
    identity.create_entry(
        {"spiffe_id": alias, "parent_id": server_id(TD), "selectors": ["aws_iid:region:eu-west-1"]}
    )
    web = identity.create_entry(
        {"spiffe_id": f"spiffe://{TD}/web", "parent_id": alias, "selectors": ["unix:uid:0"]}
    )
    other_alias = identity.create_entry(
        {
            "spiffe_id": f"spiffe://{TD}/node/us",
            "parent_id": server_id(TD),
            "selectors": ["aws_iid:region:us-east-1"],
        }
    )
    identity.create_entry(
        {
            "spiffe_id": f"spiffe://{TD}/us-web",
            "parent_id": other_alias.spiffe_id,
            "selectors": ["unix:uid:0"],
        }
    )
    assert [e.id for e in identity.entries_for(agent)] == [web.id]


def test_an_agent_cannot_have_an_svid_signed_for_an_entry_it_does_not_serve(identity: Identity) -> None:
    token_a, agent_a = identity.create_join_token()
    token_b, _ = identity.create_join_token()
    a = identity.attest({"method": "join_token", "token": token_a})
    b = identity.attest({"method": "join_token", "token": token_b})
    entry = identity.create_entry(
        {"spiffe_id": f"spiffe://{TD}/db", "parent_id": agent_a, "selectors": ["unix:uid:0"]}
    )
    assert identity.sign_jwt(a, entry.id, ["x"])["spiffe_id"] == f"spiffe://{TD}/db"
    with pytest.raises(PermissionDenied, match="not authorized"):
        identity.sign_jwt(b, entry.id, ["x"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"spiffe_id": "http://example.org/x", "parent_id": f"spiffe://{TD}/p", "selectors": ["a:b"]},
            "spiffe_id",
        ),
        (
            {"spiffe_id": "spiffe://other.org/x", "parent_id": f"spiffe://{TD}/p", "selectors": ["a:b"]},
            "trust domain",
        ),
        (
            {"spiffe_id": f"spiffe://{TD}/x/../y", "parent_id": f"spiffe://{TD}/p", "selectors": ["a:b"]},
            "segments",
        ),
        ({"spiffe_id": f"spiffe://{TD}/x", "parent_id": f"spiffe://{TD}/p", "selectors": []}, "selectors"),
        (
            {"spiffe_id": f"spiffe://{TD}/x", "parent_id": f"spiffe://{TD}/p", "selectors": ["nocolon"]},
            "type:value",
        ),
        (
            {
                "spiffe_id": f"spiffe://{TD}/x",
                "parent_id": f"spiffe://{TD}/p",
                "selectors": ["a:b"],
                "x509_svid_ttl": -1,
            },
            "x509_svid_ttl",
        ),
        (
            {
                "spiffe_id": f"spiffe://{TD}/x",
                "parent_id": f"spiffe://{TD}/p",
                "selectors": ["a:b"],
                "colour": 1,
            },
            "unknown",
        ),
    ],
)
def test_a_bad_entry_is_refused_and_nothing_is_written(identity: Identity, data: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        identity.create_entry(data)
    assert identity.list_entries() == []


def test_entries_are_created_read_listed_and_deleted(identity: Identity) -> None:
    entry = identity.create_entry(
        {
            "spiffe_id": f"spiffe://{TD}/x",
            "parent_id": f"spiffe://{TD}/p",
            "selectors": ["unix:uid:1", "unix:gid:2"],
            "admin": True,
        }
    )
    assert identity.get_entry(entry.id) == entry
    assert entry.jwt_svid_ttl == 300 and entry.admin
    with pytest.raises(InvalidRequest, match="identical entry"):
        identity.create_entry(
            {
                "spiffe_id": f"spiffe://{TD}/x",
                "parent_id": f"spiffe://{TD}/p",
                "selectors": ["unix:gid:2", "unix:uid:1"],
            }
        )
    identity.delete_entry(entry.id)
    with pytest.raises(NotFound):
        identity.get_entry(entry.id)
    assert identity.list_entries() == []

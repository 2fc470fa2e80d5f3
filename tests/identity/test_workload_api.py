"""The SPIFFE Workload API of a real `keycell agent`, driven by the `spiffe` library
(PyPI, unmodified) over the agent's unix socket."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from spiffe import JwtSource, WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.spiffe_id.spiffe_id import TrustDomain
from spiffe.svid.jwt_svid import JwtSvid
from spiffe.workloadapi.errors import FetchJwtSvidError, ValidateJwtSvidError

from tests.identity.conftest import TRUST_DOMAIN, WORKLOAD_ID, X509_TTL, Deployment


@pytest.fixture
def client(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> WorkloadApiClient:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", deployment.socket)
    workload = WorkloadApiClient(default_timeout=15)  # the socket comes from SPIFFE_ENDPOINT_SOCKET
    yield workload
    workload.close()


def test_fetches_an_x509_svid_that_chains_to_the_bundle(client: WorkloadApiClient) -> None:
    context = client.fetch_x509_context()
    svid = context.default_svid
    assert str(svid.spiffe_id) == WORKLOAD_ID
    assert len(svid.cert_chain) == 2  # leaf + the cell's intermediate
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert bundle is not None and bundle.x509_authorities
    root = next(iter(bundle.x509_authorities))
    svid.cert_chain[1].verify_directly_issued_by(root)
    svid.cert_chain[0].verify_directly_issued_by(svid.cert_chain[1])


def test_fetches_x509_bundles(client: WorkloadApiClient) -> None:
    bundles = client.fetch_x509_bundles()
    assert bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN)) is not None


def test_fetches_a_jwt_svid_and_the_agent_validates_it(client: WorkloadApiClient) -> None:
    svid = client.fetch_jwt_svid(audience={"payments"})
    assert str(svid.spiffe_id) == WORKLOAD_ID
    assert svid.audience == {"payments"}
    checked = client.validate_jwt_svid(svid.token, "payments")
    assert str(checked.spiffe_id) == WORKLOAD_ID


def test_a_jwt_svid_validates_offline_against_the_fetched_jwt_bundle(client: WorkloadApiClient) -> None:
    svid = client.fetch_jwt_svid(audience={"payments"})
    bundles = client.fetch_jwt_bundles()
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert bundle is not None
    parsed = JwtSvid.parse_and_validate(svid.token, bundle, {"payments"})
    assert str(parsed.spiffe_id) == WORKLOAD_ID


def test_validation_refuses_a_wrong_audience(client: WorkloadApiClient) -> None:
    svid = client.fetch_jwt_svid(audience={"payments"})
    with pytest.raises(ValidateJwtSvidError, match="INVALID_ARGUMENT"):
        client.validate_jwt_svid(svid.token, "billing")


def test_x509_source_and_jwt_source_work_over_the_socket(deployment: Deployment) -> None:
    with X509Source(socket_path=deployment.socket, timeout_in_seconds=15) as source:
        assert str(source.get_x509_context().default_svid.spiffe_id) == WORKLOAD_ID
    with JwtSource(socket_path=deployment.socket, timeout_in_seconds=15) as jwt_source:
        assert str(jwt_source.fetch_svid(audience={"a"}).spiffe_id) == WORKLOAD_ID


def test_the_x509_stream_sends_a_new_svid_across_a_rotation(client: WorkloadApiClient) -> None:
    seen: list[int] = []
    failures: list[Exception] = []
    two = threading.Event()

    def on_success(context: object) -> None:
        serial = context.default_svid.leaf.serial_number  # type: ignore[attr-defined]
        if serial not in seen:
            seen.append(serial)
        if len(seen) >= 2:
            two.set()

    handler = client.stream_x509_contexts(on_success, failures.append, retry_connect=False)
    try:
        # The first message arrives at once (full state); the next after the SVID's
        # renewal at about half its lifetime.
        assert two.wait(X509_TTL * 2), f"only {len(seen)} SVID(s) streamed; errors: {failures}"
    finally:
        handler.cancel()
    assert failures == []
    assert len(set(seen)) >= 2


def test_the_jwt_bundle_stream_sends_the_full_bundle_first(client: WorkloadApiClient) -> None:
    got = threading.Event()
    bundles: list[object] = []

    def on_success(bundle_set: object) -> None:
        bundles.append(bundle_set)
        got.set()

    handler = client.stream_jwt_bundles(on_success, lambda e: None, retry_connect=False)
    try:
        assert got.wait(10)
    finally:
        handler.cancel()
    assert bundles[0].get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN)) is not None  # type: ignore[attr-defined]


def _raw_stub(deployment: Deployment) -> tuple[grpc.Channel, workload_pb2_grpc.SpiffeWorkloadAPIStub]:
    channel = grpc.insecure_channel(deployment.socket.replace("unix://", "unix:"))
    return channel, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def test_a_call_without_the_security_header_is_invalid_argument(deployment: Deployment) -> None:
    channel, stub = _raw_stub(deployment)
    with channel:
        with pytest.raises(grpc.RpcError) as raised:
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header" in raised.value.details()
        with pytest.raises(grpc.RpcError) as streamed:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10))
        assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_jwt_svid_needs_an_audience(deployment: Deployment) -> None:
    channel, stub = _raw_stub(deployment)
    with channel:
        with pytest.raises(grpc.RpcError) as raised:
            stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=10
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_caller_with_no_entry_is_permission_denied(deployment: Deployment) -> None:
    # Deleting the entry leaves this process with nothing: the agent drops it at its next sync.
    entries = deployment.admin.request("LIST", "identity/entries")["data"]["entries"]
    entry = next(e for e in entries if e["id"] == deployment.entry_id)
    deployment.admin.request("DELETE", f"identity/entries/{entry['id']}")
    try:
        workload = WorkloadApiClient(socket_path=deployment.socket, default_timeout=10)
        deadline = time.monotonic() + 10
        while True:
            try:
                workload.fetch_jwt_svid(audience={"a"})
            except FetchJwtSvidError as exc:
                assert "PERMISSION_DENIED" in str(exc)
                break
            assert time.monotonic() < deadline, "the agent kept serving a deleted entry"
            time.sleep(0.2)
        workload.close()
    finally:
        fresh = deployment.admin.request(
            "POST",
            "identity/entries",
            {k: entry[k] for k in ("spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl")},
        )["data"]
        deployment.entry_id = fresh["id"]

"""The Managed HSM emulator as a wire-API peer, and what is specific to the azure_mhsm
adapter: its state lives in the HSM (tags), so every backend instance sees the same."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import EncryptionAlgorithm
from cryptography.hazmat.primitives.asymmetric import utils
from keys_backend_azure_mhsm import new_backend, session_server

from keycell.adapters.keys.azure_mhsm import AzureManagedHsmKeyBackend
from keycell.control_plane.keys import (
    BackendUnavailableError,
    KeyDisabledError,
    KeyExistsError,
    KeySpec,
    VersionState,
)
from keycell.testing.azure_mhsm_server import RESOURCE, TENANT_ID, AzureManagedHsmServer, StubTokenCredential

DATA_KEY = bytes(range(32))
AAD = b"ledger:secret-version:secret/app/db#1"


@pytest.fixture
def hsm(request: pytest.FixtureRequest) -> AzureManagedHsmServer:
    return session_server(request)


@pytest.fixture
def backend(hsm: AzureManagedHsmServer) -> Iterator[AzureManagedHsmKeyBackend]:
    opened = new_backend(hsm)
    yield opened
    opened.close()


@pytest.fixture
def other_backend(hsm: AzureManagedHsmServer) -> Iterator[AzureManagedHsmKeyBackend]:
    opened = new_backend(hsm)
    yield opened
    opened.close()


@pytest.fixture
def sdk(hsm: AzureManagedHsmServer) -> Iterator[KeyClient]:
    client = KeyClient(
        hsm.vault_url, StubTokenCredential(), connection_verify=hsm.ca_path, verify_challenge_resource=False
    )
    yield client
    client.close()


@pytest.fixture
def name() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def call(
    hsm: AzureManagedHsmServer,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = "test-token",
    query: str = "api-version=7.5",
    host: str = "127.0.0.1",
) -> tuple[int, http.client.HTTPMessage, Any]:
    """One raw HTTPS request, trusting only the emulator's CA."""
    context = ssl.create_default_context(cafile=hsm.ca_path)
    conn = http.client.HTTPSConnection(host, hsm.port, context=context, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(
            method, f"{path}?{query}" if query else path, json.dumps(body) if body else None, headers
        )
        response = conn.getresponse()
        raw = response.read()
        return response.status, response.headers, json.loads(raw) if raw else None
    finally:
        conn.close()


# --- the wire API -------------------------------------------------------------------------------


def test_unauthenticated_request_gets_the_bearer_challenge(hsm: AzureManagedHsmServer) -> None:
    status, headers, body = call(hsm, "GET", "/keys/anything", token=None)
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'authorization="https://login.microsoftonline.com/{TENANT_ID}"' in challenge
    assert f'resource="{RESOURCE}"' in challenge
    assert body["error"]["code"] == "Unauthorized"


def test_request_without_a_valid_bearer_token_is_refused_and_changes_nothing(
    hsm: AzureManagedHsmServer, name: str
) -> None:
    create = {"kty": "oct-HSM", "key_size": 256}
    assert call(hsm, "POST", f"/keys/{name}/create", create, token=None)[0] == 401
    assert call(hsm, "POST", f"/keys/{name}/create", create, token="someone-elses-token")[0] == 401
    assert call(hsm, "GET", f"/keys/{name}")[0] == 404


def test_sdk_answers_the_challenge_with_a_token_for_the_hsm_resource(hsm: AzureManagedHsmServer) -> None:
    credential = StubTokenCredential()
    backend = AzureManagedHsmKeyBackend(
        hsm.vault_url, credential, connection_verify=hsm.ca_path, verify_challenge_resource=False
    )
    try:
        assert backend.health().ok
    finally:
        backend.close()
    assert credential.requests[0] == ((f"{RESOURCE}/.default",), TENANT_ID)


def test_plain_http_is_refused(hsm: AzureManagedHsmServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", hsm.port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError, socket.timeout)):
            conn.request(
                "GET", "/keys/anything?api-version=7.5", headers={"Authorization": "Bearer test-token"}
            )
            conn.getresponse()
    finally:
        conn.close()


def test_certificate_is_trusted_through_the_ca_file_for_ip_and_localhost(hsm: AzureManagedHsmServer) -> None:
    for host in ["127.0.0.1", "localhost"]:
        assert call(hsm, "GET", "/keys/anything", host=host)[0] == 404
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(
            socket.create_connection(("127.0.0.1", hsm.port), timeout=10), server_hostname="127.0.0.1"
        )


def test_unknown_key_is_404_with_the_documented_error_body(hsm: AzureManagedHsmServer, name: str) -> None:
    status, headers, body = call(hsm, "GET", f"/keys/{name}")
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")
    assert set(body) == {"error"}
    assert body["error"]["code"] == "KeyNotFound"
    assert name in body["error"]["message"]


def test_request_without_api_version_is_a_bad_parameter(hsm: AzureManagedHsmServer) -> None:
    status, _, body = call(hsm, "GET", "/keys/anything", query="")
    assert (status, body["error"]["code"]) == (400, "BadParameter")


def test_version_listing_pages_with_next_link(hsm: AzureManagedHsmServer, name: str) -> None:
    created = [
        call(hsm, "POST", f"/keys/{name}/create", {"kty": "oct-HSM"})[2]["key"]["kid"] for _ in range(3)
    ]
    status, _, first = call(hsm, "GET", f"/keys/{name}/versions", query="api-version=7.5&maxresults=2")
    assert status == 200 and len(first["value"]) == 2
    next_link = first["nextLink"]
    assert next_link.startswith(f"https://127.0.0.1:{hsm.port}/keys/{name}/versions?")
    path, _, query = next_link.removeprefix(f"https://127.0.0.1:{hsm.port}").partition("?")
    status, _, second = call(hsm, "GET", path, query=query)
    assert status == 200 and len(second["value"]) == 1 and second["nextLink"] is None
    assert [item["kid"] for item in first["value"] + second["value"]] == created


def test_sdk_follows_next_links_through_every_version(sdk: KeyClient, name: str) -> None:
    for _ in range(3):
        sdk.create_oct_key(name, size=256, hardware_protected=True, exportable=False)
    assert len(list(sdk.list_properties_of_key_versions(name, max_page_size=1))) == 3


def test_keys_are_hsm_types_and_never_export_private_material(sdk: KeyClient, name: str) -> None:
    oct_key = sdk.create_oct_key(name, size=256, hardware_protected=True, exportable=False)
    ec_key = sdk.create_ec_key(name + "-ec", curve="P-256", hardware_protected=True, exportable=False)
    assert (oct_key.key_type, ec_key.key_type) == ("oct-HSM", "EC-HSM")
    assert oct_key.properties.exportable is False
    assert getattr(oct_key.key, "k", None) is None and getattr(ec_key.key, "d", None) is None


def test_disabled_key_version_refuses_operations_with_403(hsm: AzureManagedHsmServer, name: str) -> None:
    kid = call(hsm, "POST", f"/keys/{name}/create", {"kty": "oct-HSM"})[2]["key"]["kid"]
    version = kid.rsplit("/", 1)[1]
    call(hsm, "PATCH", f"/keys/{name}/{version}", {"attributes": {"enabled": False}})
    status, _, body = call(
        hsm, "POST", f"/keys/{name}/{version}/encrypt", {"alg": "A256GCM", "value": "AAEC"}
    )
    assert status == 403
    assert body["error"]["code"] == "Forbidden" and "disabled key" in body["error"]["message"]


def test_gcm_decrypt_with_a_bad_tag_is_a_bad_parameter(hsm: AzureManagedHsmServer, name: str) -> None:
    kid = call(hsm, "POST", f"/keys/{name}/create", {"kty": "oct-HSM"})[2]["key"]["kid"]
    version = kid.rsplit("/", 1)[1]
    sealed = call(hsm, "POST", f"/keys/{name}/{version}/encrypt", {"alg": "A256GCM", "value": "AAEC"})[2]
    assert set(sealed) >= {"kid", "value", "iv", "tag"}
    bad = {"alg": "A256GCM", "value": sealed["value"], "iv": sealed["iv"], "tag": "A" * 22}
    status, _, body = call(hsm, "POST", f"/keys/{name}/{version}/decrypt", bad)
    assert (status, body["error"]["code"]) == (400, "BadParameter")


# --- the adapter's state lives in the HSM -------------------------------------------------------


def test_second_backend_instance_sees_versions_and_their_states(
    backend: AzureManagedHsmKeyBackend, other_backend: AzureManagedHsmKeyBackend, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    old = backend.wrap(name, DATA_KEY, AAD)
    backend.rotate(name)
    backend.rotate(name)
    backend.disable(name, 2)
    backend.schedule_destruction(name, 1, days=7)
    info = other_backend.describe(name)
    assert info.primary_version == 3
    assert [(v.number, v.state) for v in info.versions] == [
        (1, VersionState.DESTRUCTION_SCHEDULED),
        (2, VersionState.DISABLED),
        (3, VersionState.ENABLED),
    ]
    with pytest.raises(KeyDisabledError):
        other_backend.unwrap(name, old, AAD)


def test_second_backend_instance_sees_a_disabled_key(
    backend: AzureManagedHsmKeyBackend, other_backend: AzureManagedHsmKeyBackend, name: str
) -> None:
    backend.create_key(name, KeySpec.EC_P256)
    backend.disable(name)
    assert other_backend.describe(name).enabled is False
    with pytest.raises(KeyDisabledError):
        other_backend.sign(name, b"message")
    other_backend.enable(name)
    backend.verify(name, b"message", backend.sign(name, b"message"))


def test_a_disabled_key_is_refused_by_the_hsm_itself(
    backend: AzureManagedHsmKeyBackend, sdk: KeyClient, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    backend.disable(name)
    version = next(iter(sdk.list_properties_of_key_versions(name))).version
    with pytest.raises(HttpResponseError) as refused:
        sdk.get_cryptography_client(name, key_version=version).encrypt(EncryptionAlgorithm.a256_gcm, b"data")
    assert refused.value.status_code == 403


def test_rotation_of_a_disabled_key_keeps_it_disabled(backend: AzureManagedHsmKeyBackend, name: str) -> None:
    backend.create_key(name, KeySpec.AES_256)
    backend.disable(name)
    info = backend.rotate(name)
    assert info.enabled is False and info.primary_version == 2
    with pytest.raises(KeyDisabledError):
        backend.wrap(name, DATA_KEY, AAD)


def test_concurrent_rotations_from_two_instances_get_distinct_numbers(
    backend: AzureManagedHsmKeyBackend, other_backend: AzureManagedHsmKeyBackend, name: str
) -> None:
    backend.create_key(name, KeySpec.AES_256)
    start = threading.Barrier(4)

    def rotate(instance: AzureManagedHsmKeyBackend) -> None:
        start.wait()
        instance.rotate(name)

    threads = [threading.Thread(target=rotate, args=(b,)) for b in [backend, other_backend] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    info = other_backend.describe(name)
    assert [v.number for v in info.versions] == [1, 2, 3, 4, 5]
    assert backend.unwrap(name, backend.wrap(name, DATA_KEY, AAD), AAD) == DATA_KEY


def test_concurrent_creates_from_two_instances_make_one_key(
    backend: AzureManagedHsmKeyBackend, other_backend: AzureManagedHsmKeyBackend, name: str
) -> None:
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def create(instance: AzureManagedHsmKeyBackend) -> None:
        start.wait()
        try:
            instance.create_key(name, KeySpec.AES_256)
            outcomes.append("created")
        except KeyExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(b,)) for b in [backend, other_backend]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created", "exists"]
    assert [v.number for v in other_backend.describe(name).versions] == [1]


def test_wrapped_blob_carries_iv_ciphertext_and_tag(backend: AzureManagedHsmKeyBackend, name: str) -> None:
    backend.create_key(name, KeySpec.AES_256)
    wrapped = backend.wrap(name, DATA_KEY, AAD)
    assert len(wrapped) == 5 + 12 + len(DATA_KEY) + 16


def test_ec_signature_is_der_not_the_raw_jwa_form(backend: AzureManagedHsmKeyBackend, name: str) -> None:
    backend.create_key(name, KeySpec.EC_P256)
    r, s = utils.decode_dss_signature(backend.sign(name, b"message").value)
    assert r > 0 and s > 0


def test_describe_reports_fips_level_3_hsm_protection(backend: AzureManagedHsmKeyBackend, name: str) -> None:
    info = backend.create_key(name, KeySpec.RSA_3072)
    assert (info.provider, info.fips_level, info.extractable) == ("azure-mhsm", 3, False)


def test_unreachable_hsm_is_backend_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free once closed: nothing listens there
    backend = AzureManagedHsmKeyBackend(
        f"https://127.0.0.1:{port}", StubTokenCredential(), verify_challenge_resource=False, retry_total=0
    )
    try:
        with pytest.raises(BackendUnavailableError):
            backend.describe("any-key")
        assert backend.health().ok is False
    finally:
        backend.close()


def test_plain_http_vault_url_is_backend_unavailable(hsm: AzureManagedHsmServer) -> None:
    backend = AzureManagedHsmKeyBackend(
        f"http://127.0.0.1:{hsm.port}", StubTokenCredential(), verify_challenge_resource=False, retry_total=0
    )
    try:
        with pytest.raises(BackendUnavailableError):
            backend.describe("any-key")
    finally:
        backend.close()

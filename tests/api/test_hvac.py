"""The regional API driven by hvac, the real Vault client, unmodified, over real HTTP
against `keycell server` (uvicorn, two workers) on 127.0.0.1."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from keycell.testing.processes import keycell_server

ROOT = "kc.dev-root-token-for-tests"


@pytest.fixture(scope="module")
def dev_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("dev-server")
    server = keycell_server(folder, dev_root_token=ROOT, workers=2)
    port = server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def root(dev_url: str) -> hvac.Client:
    return hvac.Client(url=dev_url, token=ROOT)


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


# --- init and unseal (a Shamir-sealed server of its own) ------------------------------------


def test_init_unseal_seal_through_hvac(tmp_path: Path) -> None:
    server = keycell_server(tmp_path, workers=2)
    port = server.start()
    try:
        client = hvac.Client(url=f"http://127.0.0.1:{port}")
        assert client.sys.is_initialized() is False
        result = client.sys.initialize(secret_shares=5, secret_threshold=3)
        assert len(result["keys"]) == 5 and result["root_token"]
        with pytest.raises(hvac.exceptions.InvalidRequest):
            client.sys.initialize(secret_shares=5, secret_threshold=3)
        assert client.sys.is_sealed() is True
        status = client.sys.submit_unseal_key(result["keys"][0])
        assert status["progress"] == 1 and status["sealed"] is True
        client.sys.submit_unseal_keys(result["keys_base64"][1:3])
        assert client.sys.is_sealed() is False
        client.token = result["root_token"]
        client.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "s3cret"})
        client.sys.seal()
        assert client.sys.is_sealed() is True
        with pytest.raises(hvac.exceptions.VaultDown):
            client.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
        client.sys.submit_unseal_keys(result["keys"][2:5])
        read = client.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
        assert read["data"]["data"] == {"password": "s3cret"}
        health = client.sys.read_health_status(method="GET")
        assert health["initialized"] is True and health["sealed"] is False
    finally:
        server.stop()


def worker_of(url: str, token: str) -> str:
    """The pid of the worker process that answers a fresh connection."""
    text = hvac.Client(url=url, token=token).adapter.get("/v1/sys/metrics", raise_exception=True).text
    return text.split('pid="', 1)[1].split('"', 1)[0]


def test_workers_of_a_shamir_server_share_unseal_and_seal(tmp_path: Path) -> None:
    server = keycell_server(tmp_path, workers=2)
    url = f"http://127.0.0.1:{server.start()}"
    try:
        init = hvac.Client(url=url).sys.initialize(secret_shares=3, secret_threshold=2)
        for key in init["keys"][:2]:  # each share on a fresh connection: likely different workers
            hvac.Client(url=url).sys.submit_unseal_key(key)
        seen: set[str] = set()
        deadline = time.monotonic() + 20  # the second worker may still be starting
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(worker_of(url, init["root_token"]))
        assert len(seen) == 2, "both workers should answer fresh connections"
        for _ in range(10):
            assert hvac.Client(url=url).sys.is_sealed() is False
        hvac.Client(url=url, token=init["root_token"]).sys.seal()
        for _ in range(10):
            assert hvac.Client(url=url).sys.is_sealed() is True
            with pytest.raises(hvac.exceptions.VaultDown):
                hvac.Client(url=url, token=init["root_token"]).auth.token.lookup_self()
    finally:
        server.stop()


# --- KV v2 -----------------------------------------------------------------------------------


def test_kv_v2_versions_cas_and_lifecycle(root: hvac.Client) -> None:
    kv = root.secrets.kv.v2
    path = unique("payments/db")
    assert kv.create_or_update_secret(path, secret={"password": "one"})["data"]["version"] == 1
    assert kv.create_or_update_secret(path, secret={"password": "two"}, cas=1)["data"]["version"] == 2
    with pytest.raises(hvac.exceptions.InvalidRequest, match="check-and-set"):
        kv.create_or_update_secret(path, secret={"password": "stale"}, cas=1)
    assert kv.read_secret_version(path, version=1, raise_on_deleted_version=True)["data"]["data"] == {
        "password": "one"
    }
    kv.delete_latest_version_of_secret(path)
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_version(path, raise_on_deleted_version=True)
    kv.undelete_secret_versions(path, versions=[2])
    assert kv.read_secret_version(path, raise_on_deleted_version=True)["data"]["data"] == {"password": "two"}
    kv.destroy_secret_versions(path, versions=[1])
    metadata = kv.read_secret_metadata(path)["data"]
    assert metadata["versions"]["1"]["destroyed"] is True and metadata["current_version"] == 2
    assert path.split("/")[0] + "/" in kv.list_secrets("")["data"]["keys"]
    kv.delete_metadata_and_all_versions(path)
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_metadata(path)


def test_kv_patch_and_custom_metadata(root: hvac.Client) -> None:
    kv = root.secrets.kv.v2
    path = unique("patch")
    kv.create_or_update_secret(path, secret={"a": "1", "b": "2"})
    kv.patch(path, secret={"b": "3"})
    assert kv.read_secret_version(path, raise_on_deleted_version=True)["data"]["data"] == {"a": "1", "b": "3"}
    kv.update_metadata(path, max_versions=3, custom_metadata={"owner": "payments"})
    assert kv.read_secret_metadata(path)["data"]["custom_metadata"] == {"owner": "payments"}


# --- tokens and policies ---------------------------------------------------------------------


def test_policy_allows_and_denies(root: hvac.Client, dev_url: str) -> None:
    name = unique("payments-read")
    path = unique("payments")
    root.secrets.kv.v2.create_or_update_secret(f"{path}/db", secret={"password": "x"})
    root.sys.create_or_update_acl_policy(
        name,
        f'path "secret/data/{path}/*" {{ capabilities = ["read"] }}\npath "secret/data/{path}/admin" {{ capabilities = ["deny"] }}',
    )
    assert name in root.sys.list_acl_policies()["data"]["keys"]
    token = root.auth.token.create(policies=[name], ttl="1h")["auth"]["client_token"]
    reader = hvac.Client(url=dev_url, token=token)
    assert reader.secrets.kv.v2.read_secret_version(f"{path}/db", raise_on_deleted_version=True)["data"][
        "data"
    ]
    with pytest.raises(hvac.exceptions.Forbidden):
        reader.secrets.kv.v2.create_or_update_secret(f"{path}/db", secret={"password": "y"})
    with pytest.raises(hvac.exceptions.Forbidden):
        reader.secrets.kv.v2.read_secret_version(f"{path}/admin", raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.Forbidden):
        reader.sys.list_acl_policies()


def test_token_lifecycle(root: hvac.Client, dev_url: str) -> None:
    root.sys.create_or_update_acl_policy(
        "token-creator", 'path "auth/token/create" { capabilities = ["update"] }'
    )
    created = root.auth.token.create(policies=["default", "token-creator"], ttl="1h", renewable=True)["auth"]
    child = hvac.Client(url=dev_url, token=created["client_token"])
    looked = child.auth.token.lookup_self()["data"]
    assert looked["accessor"] == created["accessor"] and looked["ttl"] <= 3600
    assert child.auth.token.renew_self(increment="2h")["auth"]["lease_duration"] > 0
    grandchild_token = child.auth.token.create(policies=["default"], ttl="30m")["auth"]["client_token"]
    orphan = root.auth.token.create_orphan(policies=["default"], ttl="30m")["auth"]["client_token"]
    assert root.auth.token.lookup_accessor(created["accessor"])["data"]["display_name"].startswith("token")
    root.auth.token.revoke(created["client_token"])
    for dead in [created["client_token"], grandchild_token]:
        with pytest.raises(hvac.exceptions.Forbidden):
            hvac.Client(url=dev_url, token=dead).auth.token.lookup_self()
    assert hvac.Client(url=dev_url, token=orphan).auth.token.lookup_self()["data"]["orphan"] is True
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=dev_url, token="kc.not-a-real-token").auth.token.lookup_self()


# --- response wrapping -----------------------------------------------------------------------


def test_wrapped_read_unwraps_once(root: hvac.Client, dev_url: str) -> None:
    path = unique("wrapped")
    root.secrets.kv.v2.create_or_update_secret(path, secret={"api_key": "abc"})
    wrapped = root.read(f"secret/data/{path}", wrap_ttl="60s")
    token = wrapped["wrap_info"]["token"]
    assert "abc" not in str(wrapped)
    assert root.write("sys/wrapping/lookup", token=token)["data"]["creation_path"] == f"secret/data/{path}"
    unwrapped = hvac.Client(url=dev_url).sys.unwrap(token)
    assert unwrapped["data"]["data"] == {"api_key": "abc"}
    with pytest.raises(hvac.exceptions.InvalidRequest):
        hvac.Client(url=dev_url).sys.unwrap(token)
    data_wrap = root.sys.wrap({"note": "hello"}, ttl="30s") if hasattr(root.sys, "wrap") else None
    if data_wrap is not None:
        assert hvac.Client(url=dev_url).sys.unwrap(data_wrap["wrap_info"]["token"])["data"] == {
            "note": "hello"
        }


# --- JWT login, leases, revoke-prefix -----------------------------------------------------------


def test_jwt_login_leases_and_revoke_prefix(root: hvac.Client, dev_url: str) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    root.write("auth/jwt/config", jwt_validation_pubkeys=[pem], bound_issuer="https://issuer.test")
    role = unique("workload")
    root.write(
        f"auth/jwt/role/{role}",
        role_type="jwt",
        bound_audiences=["keycell"],
        user_claim="sub",
        bound_subject="spiffe://example.org/payments",
        token_policies=["default"],
        token_ttl=600,
        token_max_ttl=3600,
    )
    now = int(time.time())
    claims = {
        "iss": "https://issuer.test",
        "aud": "keycell",
        "sub": "spiffe://example.org/payments",
        "iat": now,
        "exp": now + 300,
    }
    jwt_text = jwt.encode(claims, private, algorithm="ES256")
    login = hvac.Client(url=dev_url).auth.jwt.jwt_login(role=role, jwt=jwt_text)
    token, lease_id = login["auth"]["client_token"], login["auth"]["lease_id"]
    assert lease_id.startswith("auth/jwt/login/")
    assert root.sys.read_lease(lease_id)["data"]["id"] == lease_id
    renewed = root.sys.renew_lease(lease_id, increment=1200)
    assert renewed["lease_id"] == lease_id and renewed["lease_duration"] > 0
    workload = hvac.Client(url=dev_url, token=token)
    assert workload.auth.token.lookup_self()["data"]["path"] == "auth/jwt/login"
    root.sys.revoke_prefix("auth/jwt")
    with pytest.raises(hvac.exceptions.Forbidden):
        workload.auth.token.lookup_self()
    with pytest.raises(hvac.exceptions.InvalidRequest):
        root.sys.read_lease(lease_id)
    bad = jwt.encode({**claims, "aud": "someone-else"}, private, algorithm="ES256")
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=dev_url).auth.jwt.jwt_login(role=role, jwt=bad)


def test_lease_revoke_one(root: hvac.Client, dev_url: str) -> None:
    created = root.auth.token.create(policies=["default"], ttl="1h")["auth"]
    lease_id = created.get("lease_id") or ""
    assert lease_id.startswith("auth/token/create/")
    root.sys.revoke_lease(lease_id)
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=dev_url, token=created["client_token"]).auth.token.lookup_self()


# --- transit ------------------------------------------------------------------------------


def test_transit_encrypt_rotate_sign_verify(root: hvac.Client) -> None:
    transit = root.secrets.transit
    name = unique("orders")
    transit.create_key(name)
    plaintext = base64.b64encode(b"card 4111-1111").decode()
    ciphertext = transit.encrypt_data(name, plaintext)["data"]["ciphertext"]
    assert ciphertext.startswith("vault:v1:")
    transit.rotate_key(name)
    assert transit.encrypt_data(name, plaintext)["data"]["ciphertext"].startswith("vault:v2:")
    assert transit.decrypt_data(name, ciphertext)["data"]["plaintext"] == plaintext
    rewrapped = transit.rewrap_data(name, ciphertext)["data"]["ciphertext"]
    assert rewrapped.startswith("vault:v2:")
    transit.update_key_configuration(name, min_decryption_version=2)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        transit.decrypt_data(name, ciphertext)
    batch = transit.encrypt_data(name, batch_input=[{"plaintext": plaintext}, {"plaintext": "!!"}])
    assert "ciphertext" in batch["data"]["batch_results"][0] and "error" in batch["data"]["batch_results"][1]

    signer = unique("signer")
    transit.create_key(signer, key_type="ecdsa-p256")
    message = base64.b64encode(b"release 1.2.3").decode()
    signature = transit.sign_data(signer, hash_input=message)["data"]["signature"]
    assert (
        transit.verify_signed_data(signer, hash_input=message, signature=signature)["data"]["valid"] is True
    )
    other = base64.b64encode(b"release 6.6.6").decode()
    assert transit.verify_signed_data(signer, hash_input=other, signature=signature)["data"]["valid"] is False
    public = transit.read_key(signer)["data"]["keys"]["1"]["public_key"]
    der = base64.b64decode(signature.split(":")[2])
    key = serialization.load_pem_public_key(public.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(der, b"release 1.2.3", ec.ECDSA(hashes.SHA256()))


# --- errors ----------------------------------------------------------------------------------


def test_errors_have_vaults_shape_and_codes(root: hvac.Client, dev_url: str) -> None:
    import urllib.error
    import urllib.request

    def call(
        method: str, path: str, body: bytes | None = None, token: str | None = ROOT
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{dev_url}/v1/{path}", data=body, method=method)
        if token:
            request.add_header("X-Vault-Token", token)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    assert call("GET", "secret/data/none-such")[0] == 404
    status, body = call("POST", "secret/data/x", b"{not json")
    assert status == 400 and b'"errors"' in body
    assert call("GET", "secret/data/x", token=None)[0] == 403
    assert call("DELETE", "sys/seal-status")[0] == 405
    assert call("GET", "no/such/engine")[0] == 404
    status, body = call("POST", "transit/encrypt/k1", b'{"plaintext": "%%%"}')
    assert status == 400 and b"%%%" not in body


def test_the_list_method_survives_a_request_line_split_across_packets(
    root: hvac.Client, dev_url: str
) -> None:
    import socket

    root.secrets.kv.v2.create_or_update_secret(unique("listed/item"), secret={"k": "v"})
    host, port = dev_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"LI")
        time.sleep(0.05)
        sock.sendall(
            b"ST /v1/secret/metadata/ HTTP/1.1\r\nHost: x\r\nX-Vault-Token: " + ROOT.encode() + b"\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or b'"keys"' not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"keys"' in answer

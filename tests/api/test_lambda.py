"""The same Chalice app on its Lambda path: API Gateway proxy events through
`chalice.test.Client`, configured from the environment as a deployed function is."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from chalice.test import Client
from cryptography import x509

from keycell.control_plane.keys import BackendUnavailableError
from keycell.control_plane.ledger import Key, Kind
from keycell.control_plane.storage import get_json
from keycell.functions.api import app as api

JSON = {"content-type": "application/json"}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    monkeypatch.setenv("KEYCELL_LEDGER", f"sqlite://{tmp_path}/cell.db")
    monkeypatch.setenv("KEYCELL_KEY_BACKEND", "software")
    monkeypatch.setenv("KEYCELL_SOFTWARE_KEYS", f"sqlite://{tmp_path}/keys.db")
    monkeypatch.setenv("KEYCELL_SEAL", "hsm")
    api.configure(None)  # build from the environment, as on Lambda
    with Client(api.app) as test_client:
        yield test_client
    api.configure(None)


def call(
    client: Client, method: str, path: str, body: object = None, token: str | None = None
) -> tuple[int, object]:
    headers = dict(JSON)
    if token:
        headers["X-Vault-Token"] = token
    response = client.http.request(
        method, f"/v1/{path}", headers=headers, body=json.dumps(body) if body else b""
    )
    parsed = json.loads(response.body) if response.body and response.body[:1] in b"{[" else response.body
    return response.status_code, parsed


def test_lambda_path_serves_init_kv_and_list(client: Client) -> None:
    status, init = call(client, "PUT", "sys/init", {"secret_shares": 3, "secret_threshold": 2})
    assert status == 200 and init["recovery_keys"] and init["root_token"]  # type: ignore[index]
    token = init["root_token"]  # type: ignore[index]
    assert call(client, "GET", "sys/seal-status")[1]["sealed"] is False  # type: ignore[index]
    status, written = call(client, "POST", "secret/data/team/app/db", {"data": {"password": "x"}}, token)
    assert status == 200 and written["data"]["version"] == 1  # type: ignore[index]
    status, listed = call(client, "GET", "secret/metadata/team?list=true", token=token)
    assert status == 200 and listed["data"]["keys"] == ["app/"]  # type: ignore[index]
    status, read = call(client, "GET", "secret/data/team/app/db", token=token)
    assert read["data"]["data"] == {"password": "x"}  # type: ignore[index]


def test_lambda_path_refuses_without_a_token_and_counts_metrics(client: Client) -> None:
    _, init = call(client, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
    assert call(client, "GET", "secret/data/x")[0] == 403
    status, text = call(client, "GET", "sys/metrics", token=init["root_token"])  # type: ignore[index]
    assert status == 200
    body = text.decode() if isinstance(text, bytes) else str(text)
    assert 'keycell_requests_total{family="kv",method="GET",status="403"' in body
    assert "keycell_request_duration_seconds_bucket" in body


def test_lambda_path_answers_a_bad_body_with_400(client: Client) -> None:
    response = client.http.request("POST", "/v1/sys/init", headers=JSON, body=b"{not json")
    assert response.status_code == 400 and b"errors" in response.body


def test_lambda_path_serves_a_pki_crl_in_der(client: Client) -> None:
    _, init = call(client, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
    token = init["root_token"]  # type: ignore[index]
    assert call(client, "POST", "sys/mounts/pki", {"type": "pki"}, token)[0] == 204
    status, made = call(client, "POST", "pki/root/generate/internal", {"common_name": "Lambda Root"}, token)
    assert status == 200
    ca = x509.load_pem_x509_certificate(made["data"]["certificate"].encode())  # type: ignore[index]
    # without a token, as a CRL distribution point is fetched; curl sends Accept: */*
    response = client.http.request("GET", "/v1/pki/crl", headers={"accept": "*/*"})
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(response.body)
    assert crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    response = client.http.request("GET", "/v1/pki/ca", headers={"accept": "*/*"})
    assert x509.load_der_x509_certificate(response.body) == ca


def backend_key(record: Key, field: str = "backend_key") -> str:
    """The key-backend key an engine's record names (a transit key's, a PKI CA's)."""
    found = get_json(api.router().services.barrier, record)
    assert found is not None, record
    return str(found[0][field])


def test_disabling_a_mount_disables_the_backend_keys_its_engine_held(client: Client) -> None:
    _, init = call(client, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
    token = init["root_token"]  # type: ignore[index]
    for path, kind in (("tx", "transit"), ("ca", "pki")):
        assert call(client, "POST", f"sys/mounts/{path}", {"type": kind}, token)[0] == 204
    assert call(client, "POST", "transit/keys/stays", None, token)[0] == 200  # the built-in mount's
    assert call(client, "POST", "tx/keys/k", None, token)[0] == 200
    assert call(client, "POST", "tx/keys/other", {"type": "ecdsa-p256"}, token)[0] == 200
    assert call(client, "POST", "ca/root/generate/internal", {"common_name": "Gone"}, token)[0] == 200
    services = api.router().services
    named = [
        backend_key(Key(Kind.TRANSIT_KEY, "tx/k")),
        backend_key(Key(Kind.TRANSIT_KEY, "tx/other")),
        backend_key(Key(Kind.CONFIG, "pki/ca/ca"), "key"),
    ]
    kept = backend_key(Key(Kind.TRANSIT_KEY, "transit/stays"))
    assert all(services.key_backend.describe(name).enabled for name in [*named, kept])
    for path in ("tx", "ca"):
        assert call(client, "DELETE", f"sys/mounts/{path}", None, token)[0] == 204
    assert not any(services.key_backend.describe(name).enabled for name in named)
    assert services.key_backend.describe(kept).enabled
    assert call(client, "POST", "transit/encrypt/stays", {"plaintext": "aGk="}, token)[0] == 200


def test_a_key_backend_outage_during_disable_removes_nothing_and_a_retry_finishes(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, init = call(client, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
    token = init["root_token"]  # type: ignore[index]
    assert call(client, "POST", "sys/mounts/tx", {"type": "transit"}, token)[0] == 204
    assert call(client, "POST", "tx/keys/k", None, token)[0] == 200
    services = api.router().services
    name = backend_key(Key(Kind.TRANSIT_KEY, "tx/k"))

    def unreachable(*args: object, **kwargs: object) -> None:
        raise BackendUnavailableError("the HSM does not answer")

    monkeypatch.setattr(services.key_backend, "disable", unreachable)
    assert call(client, "DELETE", "sys/mounts/tx", None, token)[0] == 503
    assert "tx/" in call(client, "GET", "sys/mounts", None, token)[1]["data"]  # type: ignore[index]
    assert call(client, "POST", "tx/encrypt/k", {"plaintext": "aGk="}, token)[0] == 200
    monkeypatch.undo()
    assert call(client, "DELETE", "sys/mounts/tx", None, token)[0] == 204
    assert "tx/" not in call(client, "GET", "sys/mounts", None, token)[1]["data"]  # type: ignore[index]
    assert not services.key_backend.describe(name).enabled

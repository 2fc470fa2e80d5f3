"""The ACL sees the path Vault's ACL sees (issue 20, items 5 and 7), over real HTTP
against `keycell server --dev` on 127.0.0.1.

- A LIST is checked on the path with its trailing slash (Vault adds one to every list
  request), so a policy written for "secret/metadata/team/" grants the LIST it names,
  and sys/capabilities-self agrees with what is enforced.
- A path with an empty segment after percent-decoding ("pub//conf", "pub/%2Fconf") is
  refused with 400 before routing, so no policy rule (`+` included) ever meets one.

Requests go through http.client so that the raw path reaches the server unchanged.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from keycell.client import Client
from keycell.testing.processes import keycell_server

ROOT = "kc.acl-paths-root-token"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = keycell_server(tmp_path_factory.mktemp("acl-paths"), dev_root_token=ROOT, workers=1)
    port = server.start()
    try:
        admin = Client(f"http://127.0.0.1:{port}", token=ROOT)
        for name in ("a", "b"):
            admin.request("POST", f"secret/data/team/{name}", {"data": {"v": name}})
        admin.request("POST", "secret/data/pub/conf", {"data": {"v": "public"}})
        admin.close()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def call(url: str, method: str, path: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One request with `path` sent byte for byte as given (after /v1/)."""
    where = urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname or "", where.port, timeout=15)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, f"/v1/{path}", body=payload, headers={"X-Vault-Token": token})
        reply = connection.getresponse()
        raw = reply.read()
        return reply.status, json.loads(raw) if raw else None
    finally:
        connection.close()


def token_with(url: str, policy: str) -> str:
    name = f"p{abs(hash(policy))}"
    status, _ = call(url, "PUT", f"sys/policies/acl/{name}", ROOT, {"policy": policy})
    assert status == 204
    status, body = call(
        url, "POST", "auth/token/create", ROOT, {"policies": [name], "no_default_policy": False}
    )
    assert status == 200
    return str(body["auth"]["client_token"])


def capabilities(url: str, token: str, path: str) -> list[str]:
    status, body = call(url, "POST", "sys/capabilities-self", token, {"paths": [path]})
    assert status == 200
    return list(body["data"][path])


@pytest.mark.parametrize(
    "rule",
    [
        'path "secret/metadata/team/" { capabilities = ["list"] }',
        'path "secret/metadata/team/*" { capabilities = ["list"] }',
        'path "secret/metadata/team" { capabilities = ["list"] }',
    ],
)
def test_a_list_with_a_trailing_slash_is_allowed_by_a_rule_that_grants_it(url: str, rule: str) -> None:
    token = token_with(url, rule)
    assert "list" in capabilities(url, token, "secret/metadata/team/")
    for method, path in (("LIST", "secret/metadata/team/"), ("GET", "secret/metadata/team/?list=true")):
        status, body = call(url, method, path, token)
        assert status == 200, body
        assert body["data"]["keys"] == ["a", "b"]


def test_a_list_without_the_slash_is_checked_as_vault_checks_it(url: str) -> None:
    token = token_with(url, 'path "secret/metadata/team/" { capabilities = ["list"] }')
    status, body = call(url, "LIST", "secret/metadata/team", token)
    assert status == 200, body
    assert body["data"]["keys"] == ["a", "b"]


def test_capabilities_self_agrees_with_a_refused_list(url: str) -> None:
    token = token_with(url, 'path "secret/metadata/team/a" { capabilities = ["read"] }')
    assert "list" not in capabilities(url, token, "secret/metadata/team/")
    status, body = call(url, "LIST", "secret/metadata/team/", token)
    assert status == 403
    assert body["errors"]


@pytest.mark.parametrize(
    "path",
    ["secret/data/pub//conf", "secret/data/pub/%2Fconf", "secret/data//pub/conf", "secret/metadata/team//"],
)
def test_a_path_with_an_empty_segment_is_refused_before_routing(url: str, path: str) -> None:
    for token in (ROOT, token_with(url, 'path "secret/data/+/+/conf" { capabilities = ["read"] }')):
        status, body = call(url, "GET", path, token)
        assert status == 400, (path, status, body)
        assert body == {"errors": ["invalid path: it has an empty segment ('//')"]}


def test_plus_never_matches_an_empty_segment(url: str) -> None:
    token = token_with(url, 'path "secret/metadata/+" { capabilities = ["list"] }')
    assert "list" not in capabilities(url, token, "secret/metadata/")
    status, _ = call(url, "LIST", "secret/metadata/", token)
    assert status == 403


def test_a_rule_for_a_folder_does_not_grant_a_read_of_the_secret_of_that_name(url: str) -> None:
    token = token_with(url, 'path "secret/data/pub/conf/" { capabilities = ["read"] }')
    for path in ("secret/data/pub/conf", "secret/data/pub/conf/", "secret/data/pub/conf%2F"):
        status, _ = call(url, "GET", path, token)
        assert status == 403, path

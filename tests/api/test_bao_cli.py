"""Vault's CLI habits through OpenBao's own `bao` against `keycell server --dev`: the
address and token from VAULT_ADDR / VAULT_TOKEN (or BAO_ADDR / BAO_TOKEN), engines and
auth methods enabled and listed, KV v2 put / get / metadata get (the CLI first asks
sys/internal/ui/mounts which KV version a mount is), AppRole set up and logged into with
`bao write`, tokens looked up, policies written and read. Every answer is read with
-format=json and checked field by field."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import hvac
import hvac.exceptions
import pytest

from bench.api import bao_binary, bao_environment
from keycell.testing.processes import dev_server

ROOT = "kc.bao-cli-tests-root"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z\Z")
POLICY = 'path "kv-apps/data/app/*" {\n  capabilities = ["read"]\n}\n'


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dev_server(tmp_path_factory.mktemp("bao-cli"), ROOT) as url:
        yield url


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> str:
    """HOME for `bao`, so no token helper file of the machine's user is read or written."""
    return str(tmp_path_factory.mktemp("bao-home"))


def bao(
    address: str, home: str, *args: str, token: str = ROOT, names: str = "VAULT", stdin: str | None = None
) -> str:
    """`bao ARGS` with the address and token in `names`_ADDR and `names`_TOKEN only; its
    standard output, or a failed assertion carrying its standard error."""
    env = bao_environment(home, **{f"{names}_ADDR": address, f"{names}_TOKEN": token})
    done = subprocess.run(
        [bao_binary(), *args], env=env, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, f"bao {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def bao_json(address: str, home: str, command: str, *args: str, **options: Any) -> Any:
    """`bao COMMAND -format=json ARGS` ("kv get", "token lookup"), its output parsed."""
    return json.loads(bao(address, home, *command.split(), "-format=json", *args, **options))


@pytest.fixture(scope="module")
def kv_apps(address: str, home: str) -> str:
    out = bao(address, home, "secrets", "enable", "-path=kv-apps", "kv-v2")
    assert "Enabled the kv-v2 secrets engine at: kv-apps/" in out
    return "kv-apps"


@pytest.fixture(scope="module")
def approle(address: str, home: str) -> str:
    assert "Enabled approle auth method at: approle/" in bao(address, home, "auth", "enable", "approle")
    bao(address, home, "policy", "write", "app-read", "-", stdin=POLICY)
    bao(
        address,
        home,
        "write",
        "auth/approle/role/ci",
        "token_policies=app-read",
        "token_ttl=20m",
        "secret_id_num_uses=3",
    )
    return "approle"


def test_secrets_enable_then_list_shows_the_kv_v2_mount(address: str, home: str, kv_apps: str) -> None:
    mounts = bao_json(address, home, "secrets list")
    row = mounts["kv-apps/"]
    assert row["type"] == "kv" and row["options"] == {"version": "2"}
    assert UUID.match(row["uuid"]) and row["accessor"].startswith("kv_")
    assert row["config"]["default_lease_ttl"] == 0 and row["config"]["max_lease_ttl"] == 0
    assert mounts["secret/"]["options"] == {"version": "2"} and mounts["sys/"]["type"] == "system"


def test_kv_put_get_and_metadata_get(address: str, home: str, kv_apps: str) -> None:
    put = bao_json(address, home, "kv put", "kv-apps/app/db", "password=one")
    assert put["data"]["version"] == 1 and put["data"]["destroyed"] is False
    assert RFC3339.match(put["data"]["created_time"])
    second = bao_json(address, home, "kv put", "-mount=kv-apps", "app/db", "password=two")
    assert second["data"]["version"] == 2
    got = bao_json(address, home, "kv get", "kv-apps/app/db")
    assert got["data"]["data"] == {"password": "two"}
    assert got["data"]["metadata"]["version"] == 2 and got["data"]["metadata"]["deletion_time"] == ""
    old = bao_json(address, home, "kv get", "-version=1", "kv-apps/app/db")
    assert old["data"]["data"] == {"password": "one"}
    assert bao(address, home, "kv", "get", "-field=password", "kv-apps/app/db") == "two"
    meta = bao_json(address, home, "kv metadata get", "kv-apps/app/db")["data"]
    assert meta["current_version"] == 2 and meta["oldest_version"] == 0
    assert sorted(meta["versions"]) == ["1", "2"] and meta["versions"]["2"]["destroyed"] is False
    assert meta["cas_required"] is False and meta["max_versions"] == 0
    assert meta["delete_version_after"] == "0s" and RFC3339.match(meta["updated_time"])


def test_kv_on_the_built_in_secret_mount(address: str, home: str) -> None:
    bao(address, home, "kv", "put", "secret/cli/x", "a=b")
    assert bao_json(address, home, "kv get", "secret/cli/x")["data"]["data"] == {"a": "b"}


def test_policy_write_and_read(address: str, home: str, approle: str) -> None:
    read = bao_json(address, home, "policy read", "app-read")
    assert read == {"policy": POLICY}
    assert "app-read" in bao_json(address, home, "policy list")


def test_approle_role_and_login_with_bao_write(address: str, home: str, approle: str, kv_apps: str) -> None:
    role = bao_json(address, home, "read", "auth/approle/role/ci")["data"]
    assert role["token_policies"] == ["app-read"] and role["token_ttl"] == 1200
    assert role["secret_id_num_uses"] == 3 and role["bind_secret_id"] is True
    role_id = bao_json(address, home, "read", "auth/approle/role/ci/role-id")["data"]["role_id"]
    assert UUID.match(role_id)
    made = bao_json(address, home, "write", "-f", "auth/approle/role/ci/secret-id")["data"]
    assert UUID.match(made["secret_id"]) and UUID.match(made["secret_id_accessor"])
    assert made["secret_id_num_uses"] == 3 and made["secret_id_ttl"] == 0
    login = bao_json(
        address, home, "write", "auth/approle/login", f"role_id={role_id}", f"secret_id={made['secret_id']}"
    )
    auth = login["auth"]
    assert auth["metadata"] == {"role_name": "ci"} and sorted(auth["policies"]) == ["app-read", "default"]
    assert auth["lease_duration"] == 1200 and auth["renewable"] is True and auth["orphan"] is True
    assert login["data"] is None and auth["client_token"] and auth["accessor"]
    token = auth["client_token"]
    mine = bao_json(address, home, "token lookup", token=token)["data"]
    assert mine["accessor"] == auth["accessor"] and mine["path"] == "auth/approle/login"
    assert mine["display_name"] == "approle" and mine["meta"] == {"role_name": "ci"}
    assert 0 < mine["ttl"] <= 1200 and RFC3339.match(mine["expire_time"])
    by_root = bao_json(address, home, "token lookup", token)["data"]
    assert by_root["accessor"] == auth["accessor"] and by_root["id"] == token
    by_accessor = bao_json(address, home, "token lookup", "-accessor", auth["accessor"])["data"]
    assert by_accessor["policies"] == mine["policies"] and by_accessor["id"] == ""
    bao(address, home, "kv", "put", "kv-apps/app/cfg", "level=debug")
    read = bao_json(address, home, "kv get", "kv-apps/app/cfg", token=token)
    assert read["data"]["data"] == {"level": "debug"}


def test_bao_addr_and_bao_token_are_honoured(address: str, home: str) -> None:
    looked = bao_json(address, home, "token lookup", names="BAO")["data"]
    assert looked["policies"] == ["root"] and looked["id"] == ROOT


def test_auth_list_shows_approle_and_the_built_in_methods(address: str, home: str, approle: str) -> None:
    methods = bao_json(address, home, "auth list")
    assert methods["approle/"]["type"] == "approle" and methods["token/"]["type"] == "token"
    assert methods["approle/"]["accessor"].startswith("auth_approle_")


# --- sys/internal/ui/mounts, which the CLI's `kv` commands ask first -------------------------


def test_ui_mounts_names_the_mount_and_its_kv_version(address: str, approle: str, kv_apps: str) -> None:
    client = hvac.Client(url=address, token=ROOT)
    reader = client.auth.token.create(policies=["app-read"], ttl="5m")["auth"]["client_token"]
    found = hvac.Client(url=address, token=reader).read("sys/internal/ui/mounts/kv-apps/app/db")["data"]
    assert found["path"] == "kv-apps/" and found["type"] == "kv" and found["options"] == {"version": "2"}
    auth = client.read("sys/internal/ui/mounts/auth/approle/login")["data"]
    assert auth["path"] == "auth/approle/" and auth["type"] == "approle"


def test_ui_mounts_refuses_a_token_with_nothing_under_the_mount(address: str, kv_apps: str) -> None:
    client = hvac.Client(url=address, token=ROOT)
    outsider = client.auth.token.create(policies=["default"], ttl="5m")["auth"]["client_token"]
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=address, token=outsider).read("sys/internal/ui/mounts/kv-apps/app/db")
    with pytest.raises(hvac.exceptions.Forbidden):
        client.read("sys/internal/ui/mounts/no-such-mount/x")  # not found reads the same as refused
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=address).read("sys/internal/ui/mounts/kv-apps/app/db")  # no token


def test_pki_through_bao_secrets_enable_write_and_read_cert_ca(address: str, home: str) -> None:
    """`bao secrets enable pki`, a root generated with `bao write`, a role, an issue, and
    `bao read pki/cert/ca` giving the root's PEM, which `cryptography` parses as a CA."""
    from cryptography import x509

    assert "Enabled the pki secrets engine at: pki/" in bao(address, home, "secrets", "enable", "pki")
    root = bao_json(
        address, home, "write", "pki/root/generate/internal", "common_name=Keycell CLI Root", "ttl=24h"
    )
    ca = bao_json(address, home, "read", "pki/cert/ca")["data"]["certificate"]
    assert ca.strip() == root["data"]["certificate"].strip()
    parsed = x509.load_pem_x509_certificate(ca.encode())
    assert parsed.subject.rfc4514_string() == "CN=Keycell CLI Root"
    assert parsed.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    bao(
        address,
        home,
        "write",
        "pki/roles/web",
        "allowed_domains=example.com",
        "allow_subdomains=true",
        "max_ttl=1h",
    )
    issued = bao_json(address, home, "write", "pki/issue/web", "common_name=api.example.com", "ttl=10m")[
        "data"
    ]
    leaf = x509.load_pem_x509_certificate(issued["certificate"].encode())
    assert leaf.issuer == parsed.subject
    assert issued["serial_number"] and issued["private_key_type"] == "rsa"  # a role's default, as Vault's

"""AppRole through hvac, unmodified, against `keycell server --dev` over real HTTP: the
flow Vault Agent's auto-auth and CI runners use (role, role ID, a wrapped secret ID
unwrapped once, login, a token that holds the role's policy), and its refusals."""

from __future__ import annotations

from collections.abc import Iterator

import hvac
import hvac.exceptions
import pytest

from keycell.testing.processes import dev_server

ROOT = "kc.dev-root-token-for-tests"


@pytest.fixture(scope="module")
def dev_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dev_server(tmp_path_factory.mktemp("approle"), ROOT) as url:
        yield url


@pytest.fixture(scope="module")
def root(dev_url: str) -> hvac.Client:
    client = hvac.Client(url=dev_url, token=ROOT)
    client.sys.enable_auth_method("approle")
    client.sys.create_or_update_policy("app-read", 'path "secret/data/app/*" { capabilities = ["read"] }')
    client.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "s3cret"})
    client.auth.approle.create_or_update_approle(
        "ci", token_policies=["app-read"], token_ttl="20m", token_max_ttl="30m", secret_id_num_uses=5
    )
    return client


def test_wrapped_secret_id_then_login_reads_what_the_policy_allows(root: hvac.Client, dev_url: str) -> None:
    role_id = root.auth.approle.read_role_id("ci")["data"]["role_id"]
    wrapped = root.auth.approle.generate_secret_id("ci", metadata={"runner": "r1"}, wrap_ttl="60s")
    wrap_token = wrapped["wrap_info"]["token"]
    assert "data" not in wrapped or not wrapped["data"], "a wrapped answer carries no secret ID"
    runner = hvac.Client(url=dev_url)
    secret_id = runner.sys.unwrap(wrap_token)["data"]["secret_id"]
    with pytest.raises(hvac.exceptions.InvalidRequest):
        runner.sys.unwrap(wrap_token)  # single use
    login = runner.auth.approle.login(role_id=role_id, secret_id=secret_id)
    assert login["auth"]["policies"] == ["app-read", "default"] or login["auth"]["policies"] == [
        "default",
        "app-read",
    ]
    assert login["auth"]["metadata"] == {"role_name": "ci", "runner": "r1"}
    assert login["auth"]["lease_duration"] == 1200
    assert runner.is_authenticated()
    read = runner.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
    assert read["data"]["data"] == {"password": "s3cret"}
    with pytest.raises(hvac.exceptions.Forbidden):
        runner.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "mine"})


def test_role_read_list_and_secret_id_lookups(root: hvac.Client) -> None:
    role = root.auth.approle.read_role("ci")["data"]
    assert role["bind_secret_id"] is True and role["secret_id_num_uses"] == 5
    assert (
        role["token_policies"] == ["app-read"] and role["token_ttl"] == 1200 and role["token_max_ttl"] == 1800
    )
    assert "ci" in root.auth.approle.list_roles()["data"]["keys"]
    made = root.auth.approle.generate_secret_id("ci")["data"]
    assert made["secret_id_num_uses"] == 5
    assert made["secret_id_accessor"] in root.auth.approle.list_secret_id_accessors("ci")["data"]["keys"]
    looked = root.auth.approle.read_secret_id("ci", made["secret_id"])["data"]
    assert looked["secret_id_accessor"] == made["secret_id_accessor"] and looked["secret_id_num_uses"] == 5
    by_accessor = root.auth.approle.read_secret_id_accessor("ci", made["secret_id_accessor"])["data"]
    assert by_accessor["creation_time"] == looked["creation_time"]
    root.auth.approle.destroy_secret_id_accessor("ci", made["secret_id_accessor"])
    assert (
        made["secret_id_accessor"] not in (root.auth.approle.list_secret_id_accessors("ci")["data"]["keys"])
    )


def test_num_uses_exhausted_and_cidr_refusals(root: hvac.Client, dev_url: str) -> None:
    role_id = root.auth.approle.read_role_id("ci")["data"]["role_id"]
    client = hvac.Client(url=dev_url)
    once = root.write(
        "auth/approle/role/ci/custom-secret-id", secret_id="custom-secret-id-for-once", num_uses=1
    )
    assert once is not None and once["data"]["secret_id"] == "custom-secret-id-for-once"
    client.auth.approle.login(role_id=role_id, secret_id="custom-secret-id-for-once", use_token=False)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        client.auth.approle.login(role_id=role_id, secret_id="custom-secret-id-for-once")
    fenced = root.auth.approle.generate_secret_id("ci", cidr_list=["10.0.0.0/8"])["data"]["secret_id"]
    with pytest.raises(hvac.exceptions.InvalidRequest, match="CIDR restrictions on the secret ID") as caught:
        client.auth.approle.login(role_id=role_id, secret_id=fenced)
    assert fenced not in str(caught.value)
    root.auth.approle.create_or_update_approle("fenced-role", secret_id_bound_cidrs=["192.0.2.0/24"])
    fenced_role = root.auth.approle.read_role_id("fenced-role")["data"]["role_id"]
    sid = root.write("auth/approle/role/fenced-role/secret-id")
    assert sid is not None
    with pytest.raises(hvac.exceptions.InvalidRequest, match="CIDR restrictions on the role"):
        client.auth.approle.login(role_id=fenced_role, secret_id=sid["data"]["secret_id"])
    # A client on the server's own host cannot claim an address inside the fence.
    spoofing = hvac.Client(url=dev_url)
    spoofing.session.headers.update({"X-Forwarded-For": "192.0.2.7", "Forwarded": "for=192.0.2.7"})
    with pytest.raises(hvac.exceptions.InvalidRequest, match=r'"127\.0\.0\.1" unauthorized'):
        spoofing.auth.approle.login(role_id=fenced_role, secret_id=sid["data"]["secret_id"])


def test_an_approle_token_is_revoked_with_its_method(root: hvac.Client, dev_url: str) -> None:
    role_id = root.auth.approle.read_role_id("ci")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("ci")["data"]["secret_id"]
    client = hvac.Client(url=dev_url)
    client.auth.approle.login(role_id=role_id, secret_id=secret_id)
    assert client.is_authenticated()
    root.sys.revoke_prefix("auth/approle/login")
    assert not client.is_authenticated()


def test_an_approle_mount_at_its_own_path_is_separate_and_goes_with_its_data(
    root: hvac.Client, dev_url: str
) -> None:
    root.sys.enable_auth_method("approle", path="ci-two")
    root.auth.approle.create_or_update_approle("ci", token_policies=["default"], mount_point="ci-two")
    role_id = root.auth.approle.read_role_id("ci", mount_point="ci-two")["data"]["role_id"]
    assert role_id != root.auth.approle.read_role_id("ci")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("ci", mount_point="ci-two")["data"]["secret_id"]
    client = hvac.Client(url=dev_url)
    login = client.auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point="ci-two")
    assert login["auth"]["metadata"] == {"role_name": "ci"}
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        client.auth.approle.login(role_id=role_id, secret_id=secret_id)  # the other mount's IDs
    root.sys.disable_auth_method("ci-two")
    assert "ci-two/" not in root.sys.list_auth_methods()["data"]
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point="ci-two")
    root.sys.enable_auth_method("approle", path="ci-two")
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.auth.approle.read_role_id("ci", mount_point="ci-two")  # a new mount starts empty


def test_the_mount_tune_sets_the_default_ttl_and_caps_the_roles_max(root: hvac.Client, dev_url: str) -> None:
    """`vault auth tune`: a role without token_ttl takes the mount's default_lease_ttl,
    and the mount's max_lease_ttl caps the role's token_max_ttl, from the next login on."""
    root.sys.enable_auth_method("approle", path="tuned-approle")
    try:
        root.auth.approle.create_or_update_approle("svc", token_max_ttl="2h", mount_point="tuned-approle")
        role_id = root.auth.approle.read_role_id("svc", mount_point="tuned-approle")["data"]["role_id"]

        def login() -> dict[str, object]:
            secret_id = root.auth.approle.generate_secret_id("svc", mount_point="tuned-approle")["data"]
            client = hvac.Client(url=dev_url)
            auth = client.auth.approle.login(role_id, secret_id["secret_id"], mount_point="tuned-approle")
            looked_up = client.auth.token.lookup_self()["data"]
            return {
                "lease": auth["auth"]["lease_duration"],
                "explicit": looked_up["explicit_max_ttl"],
                "c": client,
            }

        untuned = login()
        assert untuned["lease"] == 2 * 3600  # the store's default (32 days) capped by the role's max
        root.sys.tune_auth_method("tuned-approle", default_lease_ttl="10m", max_lease_ttl="1h")
        tuned = login()
        assert tuned["lease"] == 600  # the mount's default: the role has no token_ttl
        client = tuned["c"]
        assert isinstance(client, hvac.Client)
        renewed = client.auth.token.renew_self(increment="3h")
        assert renewed["auth"]["lease_duration"] <= 3600  # the mount's max caps the role's 2 h
        assert renewed["auth"]["lease_duration"] > 3000
    finally:
        root.sys.disable_auth_method("tuned-approle")

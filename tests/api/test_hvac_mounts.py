"""The mount tables through hvac against `keycell server --dev`: enable, list, read,
tune and disable secrets engines and auth methods, and engines at their own paths
serving Vault's paths (a second KV v2, a second transit), with refusals that change
nothing."""

from __future__ import annotations

from collections.abc import Iterator

import hvac
import hvac.exceptions
import pytest

from keycell.testing.processes import keycell_server

ROOT = "kc.dev-root-token-for-tests"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hvac.Client]:
    server = keycell_server(tmp_path_factory.mktemp("mounts"), dev_root_token=ROOT, workers=2)
    port = server.start()
    try:
        yield hvac.Client(url=f"http://127.0.0.1:{port}", token=ROOT)
    finally:
        server.stop()


def test_the_built_in_mounts_are_listed_as_today(root: hvac.Client) -> None:
    mounts = root.sys.list_mounted_secrets_engines()["data"]
    assert mounts["secret/"]["type"] == "kv" and mounts["secret/"]["options"] == {"version": "2"}
    assert {"secret/", "transit/", "database/", "sys/", "cubbyhole/", "identity/"} <= set(mounts)
    for entry in mounts.values():
        assert set(entry) >= {
            "type",
            "description",
            "accessor",
            "uuid",
            "config",
            "options",
            "local",
            "seal_wrap",
        }
    auths = root.sys.list_auth_methods()["data"]
    assert auths["token/"]["type"] == "token" and auths["jwt/"]["type"] == "jwt"
    with pytest.raises(hvac.exceptions.InvalidRequest, match="built into every Keycell cell"):
        root.sys.disable_secrets_engine("secret")


def test_a_second_kv_v2_at_its_own_path_is_its_own_store(root: hvac.Client) -> None:
    root.sys.enable_secrets_engine("kv-v2", path="kv-apps", description="team apps")
    entry = root.sys.list_mounted_secrets_engines()["data"]["kv-apps/"]
    assert (
        entry["type"] == "kv" and entry["options"] == {"version": "2"} and entry["description"] == "team apps"
    )
    root.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "apps"}, mount_point="kv-apps")
    root.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "default"})
    read = root.secrets.kv.v2.read_secret_version(
        "app/db", mount_point="kv-apps", raise_on_deleted_version=True
    )
    assert read["data"]["data"] == {"password": "apps"}
    default = root.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
    assert default["data"]["data"] == {"password": "default"}
    assert root.secrets.kv.v2.list_secrets("app", mount_point="kv-apps")["data"]["keys"] == ["db"]
    root.sys.disable_secrets_engine("kv-apps")
    assert "kv-apps/" not in root.sys.list_mounted_secrets_engines()["data"]
    with pytest.raises(hvac.exceptions.InvalidPath):
        root.secrets.kv.v2.read_secret_version("app/db", mount_point="kv-apps", raise_on_deleted_version=True)
    root.sys.enable_secrets_engine("kv", path="kv-apps", options={"version": "2"})
    with pytest.raises(hvac.exceptions.InvalidPath):  # disabling took the data with it
        root.secrets.kv.v2.read_secret_version("app/db", mount_point="kv-apps", raise_on_deleted_version=True)
    root.sys.disable_secrets_engine("kv-apps")


def test_a_transit_mount_at_a_nested_path(root: hvac.Client) -> None:
    root.sys.enable_secrets_engine("transit", path="team/transit")
    root.secrets.transit.create_key("k1", mount_point="team/transit")
    sealed = root.secrets.transit.encrypt_data("k1", "aGVsbG8=", mount_point="team/transit")["data"][
        "ciphertext"
    ]
    opened = root.secrets.transit.decrypt_data("k1", sealed, mount_point="team/transit")["data"]["plaintext"]
    assert opened == "aGVsbG8="
    with pytest.raises(hvac.exceptions.InvalidRequest):
        root.secrets.transit.decrypt_data("k1", sealed)  # the default transit/ has no such key
    root.sys.disable_secrets_engine("team/transit")


def test_tune_reads_and_writes_lease_ttls_and_description(root: hvac.Client) -> None:
    root.sys.enable_secrets_engine("kv-v2", path="tuned")
    tune = root.sys.read_mount_configuration("tuned")["data"]
    assert tune["default_lease_ttl"] == 2764800 and tune["max_lease_ttl"] == 2764800
    root.sys.tune_mount_configuration("tuned", default_lease_ttl="1h", max_lease_ttl="24h", description="t")
    tune = root.sys.read_mount_configuration("tuned")["data"]
    assert (tune["default_lease_ttl"], tune["max_lease_ttl"], tune["description"]) == (3600, 86400, "t")
    assert root.sys.list_mounted_secrets_engines()["data"]["tuned/"]["config"]["default_lease_ttl"] == 3600
    with pytest.raises(hvac.exceptions.InvalidRequest, match="cannot be greater"):
        root.sys.tune_mount_configuration("tuned", default_lease_ttl="48h")
    assert root.sys.read_mount_configuration("tuned")["data"]["default_lease_ttl"] == 3600
    root.sys.tune_mount_configuration("secret", max_lease_ttl="12h")
    assert root.sys.read_mount_configuration("secret")["data"]["max_lease_ttl"] == 43200
    root.sys.disable_secrets_engine("tuned")


@pytest.mark.parametrize(
    ("path", "kind", "options", "message"),
    [
        ("secret/inner", "kv-v2", None, "already in use at secret/"),
        ("sys", "kv-v2", None, "already in use"),
        ("auth", "kv-v2", None, "already in use"),
        ("fresh", "kv", {"version": "1"}, "KV version 2 only"),
        ("fresh", "ssh", None, "type must be one of"),
        ("bad path!", "kv-v2", None, "a mount path is"),
    ],
)
def test_bad_enables_are_refused_and_change_nothing(
    root: hvac.Client, path: str, kind: str, options: dict[str, str] | None, message: str
) -> None:
    before = root.sys.list_mounted_secrets_engines()["data"]
    with pytest.raises(hvac.exceptions.InvalidRequest, match=message):
        root.sys.enable_secrets_engine(kind, path=path, options=options)
    assert root.sys.list_mounted_secrets_engines()["data"] == before


def test_enabling_a_taken_path_twice_is_refused(root: hvac.Client) -> None:
    root.sys.enable_secrets_engine("kv-v2", path="twice")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already in use at twice/"):
        root.sys.enable_secrets_engine("kv-v2", path="twice")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="already in use at twice/"):
        root.sys.enable_secrets_engine("kv-v2", path="twice/nested")
    root.sys.disable_secrets_engine("twice")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="type must be one of approle, kubernetes"):
        root.sys.enable_auth_method("ldap")

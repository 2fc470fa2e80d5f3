"""Kubernetes auth through hvac against `keycell server --dev`, with the cluster played
by a local API server that answers TokenReviews (authentication.k8s.io/v1) over HTTPS
and mints real service account JWTs (keycell/testing/kubernetes_api.py)."""

from __future__ import annotations

from collections.abc import Iterator

import hvac
import hvac.exceptions
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from keycell.testing.kubernetes_api import KubernetesApi
from keycell.testing.processes import keycell_server

ROOT = "kc.dev-root-token-for-tests"


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubernetesApi]:
    with KubernetesApi(tmp_path_factory.mktemp("k8s")) as api:
        yield api


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, k8s: KubernetesApi) -> Iterator[str]:
    cell = keycell_server(tmp_path_factory.mktemp("k8s-cell"), dev_root_token=ROOT, workers=2)
    port = cell.start()
    url = f"http://127.0.0.1:{port}"
    root = hvac.Client(url=url, token=ROOT)
    root.sys.enable_auth_method("kubernetes")
    root.auth.kubernetes.configure(
        k8s.url,
        kubernetes_ca_cert=k8s.ca_pem,
        token_reviewer_jwt=k8s.service_account_token("kube-system", "keycell-reviewer"),
    )
    root.sys.create_or_update_policy("payments", 'path "secret/data/payments/*" { capabilities = ["read"] }')
    root.secrets.kv.v2.create_or_update_secret("payments/db", secret={"password": "s3cret"})
    root.auth.kubernetes.create_role(
        "payments",
        bound_service_account_names=["api", "worker"],
        bound_service_account_namespaces=["payments"],
        policies=["payments"],
        ttl="15m",
    )
    try:
        yield url
    finally:
        cell.stop()


def test_a_pods_service_account_token_logs_in_and_reads_what_its_role_allows(
    server: str, k8s: KubernetesApi
) -> None:
    pod = hvac.Client(url=server)
    login = pod.auth.kubernetes.login("payments", k8s.service_account_token("payments", "api"))
    auth = login["auth"]
    assert sorted(auth["policies"]) == ["default", "payments"] and auth["lease_duration"] == 900
    assert auth["metadata"]["service_account_name"] == "api"
    assert auth["metadata"]["service_account_namespace"] == "payments"
    assert auth["metadata"]["role"] == "payments" and auth["metadata"]["service_account_uid"]
    read = pod.secrets.kv.v2.read_secret_version("payments/db", raise_on_deleted_version=True)
    assert read["data"]["data"] == {"password": "s3cret"}
    legacy = k8s.service_account_token("payments", "worker", legacy=True)
    assert hvac.Client(url=server).auth.kubernetes.login("payments", legacy)["auth"]["client_token"]


@pytest.mark.parametrize(
    ("namespace", "name", "message"),
    [
        ("payments", "intruder", "service account name not authorized"),
        ("other", "api", "namespace not authorized"),
    ],
)
def test_accounts_outside_the_roles_bounds_are_refused(
    server: str, k8s: KubernetesApi, namespace: str, name: str, message: str
) -> None:
    token = k8s.service_account_token(namespace, name)
    with pytest.raises(hvac.exceptions.Forbidden, match=message) as caught:
        hvac.Client(url=server).auth.kubernetes.login("payments", token)
    assert token not in str(caught.value)


def test_the_cluster_decides_expired_forged_and_deleted_accounts(server: str, k8s: KubernetesApi) -> None:
    client = hvac.Client(url=server)
    before = k8s.reviews
    expired = k8s.service_account_token("payments", "api", ttl=-60)
    with pytest.raises(hvac.exceptions.Forbidden, match="did not authenticate"):
        client.auth.kubernetes.login("payments", expired)
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = k8s.service_account_token("payments", "api", signing_key=other_key)
    with pytest.raises(hvac.exceptions.Forbidden, match="did not authenticate"):
        client.auth.kubernetes.login("payments", forged)
    token = k8s.service_account_token("payments", "worker")
    client.auth.kubernetes.login("payments", token, use_token=False)
    k8s.delete_service_account("payments", "worker")
    with pytest.raises(hvac.exceptions.Forbidden, match="did not authenticate"):
        client.auth.kubernetes.login("payments", token)
    assert k8s.reviews - before == 4, "every login asked the cluster"


def test_an_audience_bound_role_needs_the_cluster_to_confirm_it(server: str, k8s: KubernetesApi) -> None:
    root = hvac.Client(url=server, token=ROOT)
    root.auth.kubernetes.create_role(
        "vault-aud",
        bound_service_account_names=["*"],
        bound_service_account_namespaces=["payments"],
        audience="vault",
    )
    client = hvac.Client(url=server)
    client.auth.kubernetes.login(
        "vault-aud", k8s.service_account_token("payments", "api", audiences=("vault",))
    )
    with pytest.raises(hvac.exceptions.Forbidden, match="did not authenticate"):
        client.auth.kubernetes.login("vault-aud", k8s.service_account_token("payments", "api"))


def test_config_and_roles_read_back_without_the_reviewer_jwt(server: str, k8s: KubernetesApi) -> None:
    root = hvac.Client(url=server, token=ROOT)
    config = root.auth.kubernetes.read_config()
    assert config["kubernetes_host"] == k8s.url and "token_reviewer_jwt" not in config
    role = root.auth.kubernetes.read_role("payments")
    assert role["bound_service_account_names"] == ["api", "worker"] and role["token_ttl"] == 900
    assert "payments" in root.auth.kubernetes.list_roles()["keys"]
    with pytest.raises(hvac.exceptions.InvalidRequest, match="https URL"):
        root.auth.kubernetes.configure("http://127.0.0.1:1")
    assert root.auth.kubernetes.read_config()["kubernetes_host"] == k8s.url
    with pytest.raises(hvac.exceptions.InvalidRequest, match="bound_service_account_namespaces is required"):
        root.write("auth/kubernetes/role/bad", bound_service_account_names="api")


def test_a_reviewer_the_cluster_does_not_allow_makes_logins_fail_closed(
    server: str, k8s: KubernetesApi
) -> None:
    root = hvac.Client(url=server, token=ROOT)
    root.sys.enable_auth_method("kubernetes", path="k8s-weak")
    root.auth.kubernetes.configure(
        k8s.url,
        kubernetes_ca_cert=k8s.ca_pem,
        token_reviewer_jwt=k8s.service_account_token("payments", "api"),
        mount_point="k8s-weak",
    )
    root.auth.kubernetes.create_role(
        "r",
        bound_service_account_names=["api"],
        bound_service_account_namespaces=["payments"],
        mount_point="k8s-weak",
    )
    with pytest.raises(hvac.exceptions.Forbidden, match="refused by the cluster"):
        hvac.Client(url=server).auth.kubernetes.login(
            "r", k8s.service_account_token("payments", "api"), mount_point="k8s-weak"
        )
    root.sys.disable_auth_method("k8s-weak")

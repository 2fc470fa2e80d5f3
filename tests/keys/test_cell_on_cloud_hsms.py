"""A whole cell built from nothing but its environment, its keys in Azure Managed HSM
or Cloud KMS: the variables the deployment templates set (infra/azure/cell.json,
infra/gcp/main.tf) are the ones `functions/wiring.py` reads.

Each test starts the cloud's wire-API server (HTTPS + the real azure SDK; gRPC + the
real google-cloud-kms client) on 127.0.0.1, builds a cell from the template's own
variables with only the values that name cloud resources swapped for local ones, runs
init / KV / transit through the router, then opens a second cell from the same
environment, as a new process would: it finds the cell sealed, opens itself through
the HSM (KEYCELL_SEAL=hsm) and reads what the first wrote. No mocks: the Azure cell's
identity is azure-identity's DefaultAzureCredential fetching a token from a local
App Service managed identity endpoint, as the Function App's does.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import hcl2
import pytest
from azure.keyvault.keys import KeyClient
from hcl2 import SerializationOptions

from keycell.adapters.keys.azure_mhsm import AzureManagedHsmKeyBackend
from keycell.adapters.keys.cloudhsm import CloudHsmKeyBackend
from keycell.adapters.keys.gcp_kms import GcpKmsKeyBackend
from keycell.control_plane.router import Router
from keycell.functions.api import http
from keycell.functions.wiring import KEY_BACKENDS, key_backend_from_environment, router_from_environment
from keycell.testing.azure_mhsm_server import RESOURCE, AzureManagedHsmServer, StubTokenCredential
from keycell.testing.gcp_kms_server import GcpKmsServer

REPO = Path(__file__).resolve().parents[2]
AZURE_TEMPLATE = REPO / "infra" / "azure" / "cell.json"
GCP_MODULE = REPO / "infra" / "gcp" / "main.tf"
SEAL_KEY = "cell-kek-seal"  # CellConfig.kek + "-seal": the key that wraps the root key


# --- the templates' environments ------------------------------------------------------------


def azure_template_env() -> dict[str, str]:
    """The Function App's KEYCELL_* app settings, as the ARM template writes them."""
    arm = json.loads(AZURE_TEMPLATE.read_text())
    (site,) = [r for r in arm["resources"] if r["type"] == "Microsoft.Web/sites"]
    settings = site["properties"]["siteConfig"]["appSettings"]
    return {s["name"]: s["value"] for s in settings if s["name"].startswith("KEYCELL_")}


def gcp_template_env() -> dict[str, str]:
    """The Cloud Run services' common environment, as the Terraform module writes it."""
    options = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    with GCP_MODULE.open() as f:
        parsed = hcl2.load(f, serialization_options=options)
    (env,) = [block["common_env"] for block in parsed["locals"] if "common_env" in block]
    return {str(k): str(v) for k, v in env.items()}


def localized(template: dict[str, str], local: dict[str, str], emulator: dict[str, str]) -> dict[str, str]:
    """The template's environment with the values in `local` swapped (each must be a
    variable the template sets: a renamed variable fails here) plus `emulator`'s
    settings, which only a local stand-in needs (TLS trust, plaintext)."""
    missing = set(local) - set(template)
    assert not missing, f"the template does not set {sorted(missing)}"
    return {**template, **local, **emulator}


# --- driving a cell through its router -----------------------------------------------------


def call(
    router: Router, method: str, path: str, body: dict[str, Any] | None = None, token: str = ""
) -> tuple[int, dict[str, Any]]:
    headers = {"x-vault-token": token} if token else {}
    status, _, out = http.handle(router, method, path, headers, {}, json.dumps(body) if body else None)
    return status, (json.loads(out) if out else {})


def ok(
    router: Router, method: str, path: str, body: dict[str, Any] | None = None, token: str = ""
) -> dict[str, Any]:
    status, out = call(router, method, path, body, token)
    assert status in (200, 204), (method, path, status, out)
    return out


def first_cell_life(router: Router) -> tuple[str, str, str]:
    """Initialize, write a secret, encrypt with transit; return (root token, secret, ciphertext)."""
    assert router.services.barrier.sealed
    assert ok(router, "GET", "sys/seal-status")["initialized"] is False
    init = ok(router, "POST", "sys/init", {"recovery_shares": 1, "recovery_threshold": 1})
    root = init["root_token"]
    status = ok(router, "GET", "sys/seal-status")
    assert status["sealed"] is False and status["recovery_seal"] is True  # opened by the HSM, no shares
    value = secrets.token_urlsafe(16)
    ok(router, "POST", "secret/data/app/db", {"data": {"password": value}}, root)
    assert ok(router, "GET", "secret/data/app/db", token=root)["data"]["data"] == {"password": value}
    ok(router, "POST", "transit/keys/app", {}, root)
    plain = base64.b64encode(b"card 4111").decode()
    ciphertext = ok(router, "POST", "transit/encrypt/app", {"plaintext": plain}, root)["data"]["ciphertext"]
    assert ciphertext.startswith("vault:v1:") and "card" not in ciphertext
    decrypted = ok(router, "POST", "transit/decrypt/app", {"ciphertext": ciphertext}, root)["data"][
        "plaintext"
    ]
    assert base64.b64decode(decrypted) == b"card 4111"
    return root, value, ciphertext


def second_cell_life(router: Router, root: str, value: str, ciphertext: str) -> None:
    """A fresh cell on the same ledger and HSM: sealed until its first request, which
    opens it through the HSM; it then reads and decrypts what the first one wrote."""
    assert router.services.barrier.sealed
    status = ok(router, "GET", "sys/seal-status")
    assert status["initialized"] is True and status["sealed"] is False
    assert ok(router, "GET", "secret/data/app/db", token=root)["data"]["data"] == {"password": value}
    decrypted = ok(router, "POST", "transit/decrypt/app", {"ciphertext": ciphertext}, root)["data"][
        "plaintext"
    ]
    assert base64.b64decode(decrypted) == b"card 4111"


@pytest.fixture
def routers() -> Iterator[list[Router]]:
    """Every router a test builds; their key backends are closed at the end."""
    made: list[Router] = []
    yield made
    for router in made:
        router.services.key_backend.close()


# --- Azure Managed HSM ---------------------------------------------------------------------


class ManagedIdentityEndpoint:
    """App Service's managed identity endpoint (api-version 2019-08-01) on 127.0.0.1: a
    GET with the X-IDENTITY-HEADER secret and `resource` gets a bearer token. It hands
    out the token the local HSM accepts, standing in for Entra ID."""

    def __init__(self, token: str) -> None:
        self.header = secrets.token_hex(16)
        self.token = token
        self.issued: list[str] = []  # the resources tokens were issued for
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                resource = (query.get("resource") or [""])[0]
                if self.headers.get("X-IDENTITY-HEADER") != endpoint.header:
                    self._answer(
                        401, {"error": "invalid_request", "error_description": "bad identity header"}
                    )
                elif (query.get("api-version") or [""])[0] != "2019-08-01" or not resource:
                    self._answer(
                        400, {"error": "invalid_request", "error_description": "api-version, resource"}
                    )
                else:
                    endpoint.issued.append(resource)
                    expires = str(int(time.time()) + 3600)
                    body = {"access_token": endpoint.token, "expires_on": expires, "resource": resource}
                    self._answer(200, {**body, "token_type": "Bearer", "client_id": str(uuid.uuid4())})

            def _answer(self, status: int, body: dict[str, str]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/msi/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def azure_hsm() -> Iterator[AzureManagedHsmServer]:
    with AzureManagedHsmServer() as hsm:
        assert urlsplit(hsm.vault_url).hostname == "127.0.0.1"
        yield hsm


@pytest.fixture
def managed_identity(
    azure_hsm: AzureManagedHsmServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ManagedIdentityEndpoint]:
    """What App Service puts in a Function App's process environment for its identity;
    azure-identity reads it from there. Nothing else may offer a credential first."""
    endpoint = ManagedIdentityEndpoint(azure_hsm.token)
    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE",
                 "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_USERNAME", "IMDS_ENDPOINT", "MSI_ENDPOINT",
                 "MSI_SECRET", "IDENTITY_SERVER_THUMBPRINT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
    monkeypatch.setenv("IDENTITY_HEADER", endpoint.header)
    try:
        yield endpoint
    finally:
        endpoint.close()


def azure_env(hsm: AzureManagedHsmServer, ledger: Path, cell: str = "az") -> dict[str, str]:
    return localized(
        azure_template_env(),
        {
            "KEYCELL_CELL": cell,
            "KEYCELL_LEDGER": f"sqlite:///{ledger}",  # the template's is cosmos://, a ledger not built yet
            "KEYCELL_AZURE_MHSM_URL": hsm.vault_url,
            "KEYCELL_AUDIT_STDOUT": "0",
        },
        # The emulator's certificate comes from a throwaway CA, and 127.0.0.1 is not
        # under managedhsm.azure.net, the resource its challenge names.
        {"KEYCELL_AZURE_MHSM_CA": hsm.ca_path, "KEYCELL_AZURE_MHSM_VERIFY_CHALLENGE": "0"},
    )


def test_a_cell_on_azure_managed_hsm_from_its_environment(
    azure_hsm: AzureManagedHsmServer,
    managed_identity: ManagedIdentityEndpoint,
    tmp_path: Path,
    routers: list[Router],
) -> None:
    env = azure_env(azure_hsm, tmp_path / "ledger.db")
    assert env["KEYCELL_KEY_BACKEND"] == "azure-mhsm" and env["KEYCELL_SEAL"] == "hsm"  # the template's own
    routers.append(router_from_environment(env))
    assert isinstance(routers[0].services.key_backend, AzureManagedHsmKeyBackend)
    root, value, ciphertext = first_cell_life(routers[0])
    assert managed_identity.issued and set(managed_identity.issued) == {RESOURCE}  # the identity was used

    # The root key's wrapping key is in the HSM, where the SDK itself finds it.
    client = KeyClient(
        azure_hsm.vault_url,
        StubTokenCredential(azure_hsm.token),
        connection_verify=azure_hsm.ca_path,
        verify_challenge_resource=False,
    )
    with client:
        assert client.get_key(SEAL_KEY).key_type == "oct-HSM"

    routers.append(router_from_environment(env))
    second_cell_life(routers[1], root, value, ciphertext)


def test_an_azure_cell_the_hsm_refuses_stays_sealed(
    azure_hsm: AzureManagedHsmServer,
    managed_identity: ManagedIdentityEndpoint,
    tmp_path: Path,
    routers: list[Router],
) -> None:
    env = azure_env(azure_hsm, tmp_path / "ledger.db")
    routers.append(router_from_environment(env))
    root, _, _ = first_cell_life(routers[0])
    managed_identity.token = "a-token-the-hsm-refuses"  # the identity lost its role
    routers.append(router_from_environment(env))
    status, out = call(routers[1], "GET", "secret/data/app/db", token=root)
    assert status == 503 and "key backend is unavailable" in out["errors"][0], out
    assert routers[1].services.barrier.sealed
    assert "a-token-the-hsm-refuses" not in json.dumps(out)


# --- Cloud KMS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcp_kms() -> Iterator[GcpKmsServer]:
    with GcpKmsServer() as kms:
        assert kms.endpoint.startswith("127.0.0.1:")
        yield kms


def gcp_env(kms: GcpKmsServer, ledger: Path, ring: str) -> dict[str, str]:
    return localized(
        gcp_template_env(),
        {
            "KEYCELL_CELL": "gcp",
            "KEYCELL_LEDGER": f"sqlite:///{ledger}",  # the template's is firestore://, a ledger not built yet
            "KEYCELL_GCP_KMS_KEY_RING": ring,
            "KEYCELL_AUDIT_STDOUT": "0",
        },
        {"KEYCELL_GCP_KMS_ENDPOINT": kms.endpoint, "KEYCELL_GCP_KMS_INSECURE": "1"},  # plaintext gRPC
    )


def test_a_cell_on_cloud_kms_from_its_environment(
    gcp_kms: GcpKmsServer, tmp_path: Path, routers: list[Router]
) -> None:
    ring = f"projects/keycell-test/locations/europe-west1/keyRings/cell-{uuid.uuid4().hex[:8]}"
    env = gcp_env(gcp_kms, tmp_path / "ledger.db", ring)
    assert env["KEYCELL_KEY_BACKEND"] == "gcp-kms" and env["KEYCELL_SEAL"] == "hsm"  # the template's own
    routers.append(router_from_environment(env))
    assert isinstance(routers[0].services.key_backend, GcpKmsKeyBackend)
    root, value, ciphertext = first_cell_life(routers[0])

    # The ring was created on first use and holds the seal key, at protection level HSM.
    client = gcp_kms.client()
    key = client.get_crypto_key(name=f"{ring}/cryptoKeys/{SEAL_KEY}")
    assert key.version_template.protection_level.name == "HSM"

    routers.append(router_from_environment(env))
    second_cell_life(routers[1], root, value, ciphertext)

    # The same ledger with another key ring: the seal key is not there; the cell stays sealed.
    other = gcp_env(gcp_kms, tmp_path / "ledger.db", f"{ring}-other")
    routers.append(router_from_environment(other))
    status, out = call(routers[2], "GET", "secret/data/app/db", token=root)
    assert status == 503 and "key backend is unavailable" in out["errors"][0], out
    assert routers[2].services.barrier.sealed


# --- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KEYCELL_KEY_BACKEND": "azure-mhsm"}, "KEYCELL_AZURE_MHSM_URL"),
        ({"KEYCELL_KEY_BACKEND": "azure-mhsm", "KEYCELL_AZURE_MHSM_URL": "http://hsm.example"}, "KEYCELL_AZURE_MHSM_URL"),
        ({"KEYCELL_KEY_BACKEND": "azure-mhsm", "KEYCELL_AZURE_MHSM_URL": "https://h.example",
          "KEYCELL_AZURE_MHSM_CA": "/nonexistent/ca.pem"}, "KEYCELL_AZURE_MHSM_CA"),
        ({"KEYCELL_KEY_BACKEND": "azure-mhsm", "KEYCELL_AZURE_MHSM_URL": "https://h.example",
          "KEYCELL_AZURE_MHSM_VERIFY_CHALLENGE": "maybe"}, "KEYCELL_AZURE_MHSM_VERIFY_CHALLENGE"),
        ({"KEYCELL_KEY_BACKEND": "gcp-kms"}, "KEYCELL_GCP_KMS_KEY_RING"),
        ({"KEYCELL_KEY_BACKEND": "gcp-kms", "KEYCELL_GCP_KMS_KEY_RING": "my-ring"}, "KEYCELL_GCP_KMS_KEY_RING"),
        ({"KEYCELL_KEY_BACKEND": "gcp-kms", "KEYCELL_GCP_KMS_KEY_RING": "projects/p/locations/l/keyRings/r",
          "KEYCELL_GCP_KMS_ENDPOINT": "https://kms.example/v1"}, "KEYCELL_GCP_KMS_ENDPOINT"),
        ({"KEYCELL_KEY_BACKEND": "gcp-kms", "KEYCELL_GCP_KMS_KEY_RING": "projects/p/locations/l/keyRings/r",
          "KEYCELL_GCP_KMS_ENDPOINT": "kms.example:443", "KEYCELL_GCP_KMS_INSECURE": "1"}, "KEYCELL_GCP_KMS_INSECURE"),
        ({"KEYCELL_KEY_BACKEND": "cloudhsm", "KEYCELL_CLOUDHSM_PIN": "cu:hunter2"}, "KEYCELL_CLOUDHSM_CLUSTER_ID"),
        ({"KEYCELL_KEY_BACKEND": "pkcs11", "KEYCELL_PKCS11_PIN": "hunter2"}, "KEYCELL_PKCS11_MODULE"),
    ],
)  # fmt: skip
def test_bad_key_backend_settings_name_the_variable_and_no_secret(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named) as raised:
        key_backend_from_environment(env)
    assert "hunter2" not in str(raised.value)


def test_a_url_with_credentials_in_it_is_refused_without_repeating_them() -> None:
    env = {"KEYCELL_KEY_BACKEND": "azure-mhsm", "KEYCELL_AZURE_MHSM_URL": "https://u:hunter2@h.example"}
    with pytest.raises(ValueError, match="KEYCELL_AZURE_MHSM_URL") as raised:
        key_backend_from_environment(env)
    assert "hunter2" not in str(raised.value)


def test_an_unknown_backend_lists_every_backend() -> None:
    with pytest.raises(ValueError, match="KEYCELL_KEY_BACKEND") as raised:
        key_backend_from_environment({"KEYCELL_KEY_BACKEND": "vault-transit"})
    for kind in ("software", "pkcs11", "aws-kms", "cloudhsm", "azure-mhsm", "gcp-kms"):
        assert kind in KEY_BACKENDS and kind in str(raised.value)


def test_cloudhsm_is_configured_from_the_given_environment_not_the_process_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cloudhsm backend reads the mapping wiring hands it: a cluster id only in the
    process environment does not count."""
    monkeypatch.setenv("KEYCELL_CLOUDHSM_CLUSTER_ID", "cluster-abc")
    monkeypatch.setenv("KEYCELL_CLOUDHSM_PIN", "cu:pw")
    with pytest.raises(ValueError, match="KEYCELL_CLOUDHSM_CLUSTER_ID, KEYCELL_CLOUDHSM_PIN"):
        CloudHsmKeyBackend.from_env({})

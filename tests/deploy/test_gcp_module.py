"""The Terraform module of a GCP cell, parsed with python-hcl2 (no terraform binary, no
providers: CI has neither) and checked for what a cell must hold."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2 import SerializationOptions

from keycell.control_plane.ledger import ATTR_EXPIRES_AT

MODULE = Path(__file__).resolve().parents[2] / "infra" / "gcp"
OPTIONS = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)


def parse(path: Path) -> dict[str, Any]:
    with path.open() as f:
        parsed: dict[str, Any] = hcl2.load(f, serialization_options=OPTIONS)
    return parsed


@pytest.fixture(scope="module")
def module() -> dict[str, Any]:
    files = sorted(MODULE.glob("*.tf"))
    assert {f.name for f in files} >= {"main.tf", "variables.tf", "outputs.tf", "versions.tf"}
    return {f.name: parse(f) for f in files}


@pytest.fixture(scope="module")
def resources(module: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for parsed in module.values():
        for block in parsed.get("resource", []):
            for kind, named in block.items():
                for name, body in named.items():
                    assert (kind, name) not in out, f"{kind}.{name} declared twice"
                    out[(kind, name)] = body
    return out


def variables(module: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for block in module["variables.tf"]["variable"] for k, v in block.items()}


def first(block: Any) -> dict[str, Any]:
    """A nested block parses to a list of one dict."""
    return block[0] if isinstance(block, list) else block


def source_text() -> str:
    return "\n".join(f.read_text() for f in sorted(MODULE.glob("*.tf")))


def test_every_variable_used_is_declared_and_every_declared_one_is_used(module: dict[str, Any]) -> None:
    declared = set(variables(module))
    used = set(re.findall(r"\bvar\.([a-z_][a-z0-9_]*)", source_text()))
    assert used - declared == set(), "undeclared variables"
    assert declared - used == set(), "unused variables"


def test_every_resource_reference_names_a_declared_resource(resources: dict[tuple[str, str], Any]) -> None:
    declared = {f"{k}.{n}" for k, n in resources}
    referenced = set(re.findall(r"\b(google_[a-z0-9_]+\.[a-z_][a-z0-9_]*)\b", source_text()))
    referenced = {r for r in referenced if not r.startswith("google_project.")}  # the data source
    assert referenced - declared == set()


def test_the_key_ring_holds_hsm_keys_that_rotate_and_cannot_be_destroyed_by_terraform(
    resources: dict[tuple[str, str], Any], module: dict[str, Any]
) -> None:
    keys = {n: body for (k, n), body in resources.items() if k == "google_kms_crypto_key"}
    assert set(keys) == {"storage"}  # the cell makes its own keys in the ring (below)
    for body in keys.values():
        assert first(body["version_template"])["protection_level"] == "HSM"
        assert body["rotation_period"] == "${var.key_rotation_period}"
        assert first(body["lifecycle"])["prevent_destroy"] is True
        assert body["key_ring"] == "${google_kms_key_ring.cell.id}"
    assert variables(module)["key_rotation_period"]["default"] == "7776000s"  # 90 days


def test_the_ledger_is_firestore_with_pitr_delete_protection_cmek_and_ttl_on_expires_at(
    resources: dict[tuple[str, str], Any],
) -> None:
    db = resources[("google_firestore_database", "ledger")]
    assert db["point_in_time_recovery_enablement"] == "POINT_IN_TIME_RECOVERY_ENABLED"
    assert db["delete_protection_state"] == "DELETE_PROTECTION_ENABLED"
    assert db["deletion_policy"] == "ABANDON"
    assert first(db["cmek_config"])["kms_key_name"] == "${google_kms_crypto_key.storage.id}"
    ttl = resources[("google_firestore_field", "ledger_ttl")]
    assert ttl["field"] == ATTR_EXPIRES_AT
    assert "ttl_config" in ttl


def test_secret_manager_rotation_notices_reach_the_rotation_service(
    resources: dict[tuple[str, str], Any],
) -> None:
    publisher = resources[("google_pubsub_topic_iam_member", "secret_manager_publishes")]
    assert publisher["role"] == "roles/pubsub.publisher"
    assert "gcp-sa-secretmanager.iam.gserviceaccount.com" in publisher["member"]
    assert publisher["topic"] == "${google_pubsub_topic.secret_events.name}"
    sub = resources[("google_pubsub_subscription", "rotation")]
    assert sub["topic"] == "${google_pubsub_topic.secret_events.id}"
    assert "SECRET_ROTATE" in sub["filter"]
    push = first(sub["push_config"])
    assert 'google_cloud_run_v2_service.function["rotation"].uri' in push["push_endpoint"]
    assert first(push["oidc_token"])["service_account_email"] == "${google_service_account.pubsub_push.email}"
    assert first(sub["dead_letter_policy"])["dead_letter_topic"] == "${google_pubsub_topic.dead_letters.id}"
    for (kind, _), body in resources.items():
        if kind == "google_pubsub_topic":
            assert body["kms_key_name"] == "${google_kms_crypto_key.storage.id}"


def test_functions_run_on_cloud_run_and_only_the_api_takes_outside_traffic(
    resources: dict[tuple[str, str], Any], module: dict[str, Any]
) -> None:
    functions = resources[("google_cloud_run_v2_service", "function")]
    assert functions["for_each"] == "${local.functions}"
    assert set(first(module["main.tf"]["locals"])["functions"]) == {"api", "rotation", "revocation"}
    assert (
        functions["ingress"]
        == '${each.key == "api" ? "INGRESS_TRAFFIC_ALL" : "INGRESS_TRAFFIC_INTERNAL_ONLY"}'
    )
    template = first(functions["template"])
    assert template["service_account"] == "${google_service_account.function[each.key].email}"
    invokers = resources[("google_cloud_run_v2_service_iam_member", "push")]
    assert invokers["member"] == "serviceAccount:${google_service_account.pubsub_push.email}"


def test_the_api_is_plain_http_only_behind_cloud_runs_tls_front_end(module: dict[str, Any]) -> None:
    """Cloud Run terminates TLS for the service's HTTPS URL and hands requests to the
    container's port: `keycell server` there listens off loopback, so it must say
    --tls-disable (it refuses a cleartext non-loopback listener otherwise)."""
    command = first(module["main.tf"]["locals"])["functions"]["api"]
    assert command[:2] == ["keycell", "server"]
    assert command[command.index("--listen") + 1] == "0.0.0.0:8080"
    assert "--tls-disable" in command and "--tls-cert-file" not in command


def test_the_relays_are_always_on_cloud_run_instances(resources: dict[tuple[str, str], Any]) -> None:
    relay = resources[("google_cloud_run_v2_service", "relay")]
    template = first(relay["template"])
    scaling = first(template["scaling"])
    assert scaling["min_instance_count"] == scaling["max_instance_count"] == "${var.relays}"
    assert template["annotations"]["run.googleapis.com/cpu-throttling"] == "false"
    container = first(template["containers"])
    assert container["command"] == ["keycell", "relay"]
    assert first(container["resources"])["cpu_idle"] is False


def test_no_identity_gets_a_basic_role_or_is_public_by_default(
    resources: dict[tuple[str, str], Any], module: dict[str, Any]
) -> None:
    text = source_text()
    for basic in ("roles/owner", "roles/editor", "roles/viewer"):
        assert basic not in text
    assert "allUsers" not in re.sub(r'description\s*=\s*".*"', "", text)
    assert variables(module)["api_invokers"]["default"] == []
    ledger = resources[("google_project_iam_member", "ledger")]
    assert ledger["role"] == "roles/datastore.user"
    assert "databases/${local.ledger}" in first(ledger["condition"])["expression"]
    keys = resources[("google_kms_key_ring_iam_member", "cell_keys")]
    assert keys["role"] == "${google_project_iam_custom_role.cell_keys.id}"
    assert keys["key_ring_id"] == "${google_kms_key_ring.cell.id}"  # this ring, not the project


# What each Cloud KMS call the key adapter makes needs (Cloud KMS's permission reference).
KMS_PERMISSIONS = {
    "get_key_ring": "cloudkms.keyRings.get",
    "create_crypto_key": "cloudkms.cryptoKeys.create",
    "get_crypto_key": "cloudkms.cryptoKeys.get",
    "update_crypto_key": "cloudkms.cryptoKeys.update",
    "update_crypto_key_primary_version": "cloudkms.cryptoKeys.update",
    "create_crypto_key_version": "cloudkms.cryptoKeyVersions.create",
    "get_crypto_key_version": "cloudkms.cryptoKeyVersions.get",
    "list_crypto_key_versions": "cloudkms.cryptoKeyVersions.list",
    "update_crypto_key_version": "cloudkms.cryptoKeyVersions.update",
    "destroy_crypto_key_version": "cloudkms.cryptoKeyVersions.destroy",
    "encrypt": "cloudkms.cryptoKeyVersions.useToEncrypt",
    "decrypt": "cloudkms.cryptoKeyVersions.useToDecrypt",
    "asymmetric_sign": "cloudkms.cryptoKeyVersions.useToSign",
    "get_public_key": "cloudkms.cryptoKeyVersions.viewPublicKey",
    "create_key_ring": "cloudkms.keyRings.create",
}


def test_the_cells_role_holds_what_the_key_adapter_calls_and_no_more(
    resources: dict[tuple[str, str], Any],
) -> None:
    """Every Cloud KMS method adapters/keys/gcp_kms.py calls on its ring is allowed by the
    role the functions and the relay get on the ring; nothing else is. (The ring itself
    is Terraform's: creating one is the adapter's fallback for a ring that does not
    exist, which the role leaves out on purpose.)"""
    source = (MODULE.parents[1] / "adapters" / "keys" / "gcp_kms.py").read_text()
    called = set(re.findall(r"_client\.([a-z_]+)\(", source))
    assert called and called <= set(KMS_PERMISSIONS), called - set(KMS_PERMISSIONS)
    needed = {KMS_PERMISSIONS[m] for m in called if m != "create_key_ring"}
    role = resources[("google_project_iam_custom_role", "cell_keys")]
    assert set(role["permissions"]) == needed
    binding = resources[("google_kms_key_ring_iam_member", "cell_keys")]
    assert binding["for_each"] == "${local.ledger_users}"  # every function and the relay

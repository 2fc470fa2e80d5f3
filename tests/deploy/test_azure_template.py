"""The ARM template of an Azure cell: well formed (every parameter, variable and
dependency it names exists) and holding what a cell needs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "azure" / "cell.json"
PARAMETERS = TEMPLATE.with_name("cell.parameters.example.json")


@pytest.fixture(scope="module")
def arm() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(TEMPLATE.read_text())
    return loaded


def of_type(arm: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in arm["resources"] if r["type"] == kind]


def one(arm: dict[str, Any], kind: str) -> dict[str, Any]:
    (found,) = of_type(arm, kind)
    return found


def test_every_parameter_and_variable_named_is_declared_and_every_declared_one_used(
    arm: dict[str, Any],
) -> None:
    text = TEMPLATE.read_text()
    used_params = set(re.findall(r"parameters\('([A-Za-z]+)'\)", text))
    used_vars = set(re.findall(r"variables\('([A-Za-z]+)'\)", text))
    assert used_params == set(arm["parameters"])
    assert used_vars == set(arm["variables"])


_ARG = re.compile(r"variables\('[A-Za-z]+'\)|'[^']*'|guid\([^)]*\)")


def _token(arg: str) -> str:
    return arg.strip("'") if arg.startswith("'") else f"<{arg}>"


def name_segments(expression: str) -> tuple[str, ...]:
    """A resource name expression as its '/'-separated segments, variables kept symbolic."""
    if match := re.fullmatch(r"\[format\('([^']*)', (.+)\)\]", expression):
        text, args = match.groups()
        for i, arg in enumerate(_ARG.findall(args)):
            text = text.replace(f"{{{i}}}", _token(arg))
        return tuple(text.split("/"))
    if match := re.fullmatch(r"\[(variables\('[A-Za-z]+'\))\]", expression):
        return (_token(match.group(1)),)
    return tuple(expression.split("/"))


def test_every_dependency_is_a_resource_of_the_template(arm: dict[str, Any]) -> None:
    declared = {(r["type"], name_segments(r["name"])) for r in arm["resources"]}
    for resource in arm["resources"]:
        for dependency in resource.get("dependsOn", []):
            match = re.fullmatch(r"\[resourceId\('([^']+)', (.+)\)\]", dependency)
            assert match, dependency
            kind, args = match.groups()
            segments = tuple(_token(a) for a in _ARG.findall(args))
            assert (kind, segments) in declared, (resource["name"], dependency)


def test_the_example_parameters_fill_every_required_parameter(arm: dict[str, Any]) -> None:
    given = json.loads(PARAMETERS.read_text())["parameters"]
    required = {k for k, v in arm["parameters"].items() if "defaultValue" not in v}
    assert required <= set(given)
    assert set(given) <= set(arm["parameters"])


def test_the_functions_run_python_on_a_locked_down_function_app(arm: dict[str, Any]) -> None:
    site = one(arm, "Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    assert site["identity"] == {"type": "SystemAssigned"}
    props = site["properties"]
    assert props["httpsOnly"] is True
    config = props["siteConfig"]
    assert config["linuxFxVersion"] == "PYTHON|3.11"
    assert config["minTlsVersion"] == "1.2"
    assert config["ftpsState"] == "Disabled"
    assert config["ipSecurityRestrictionsDefaultAction"] == "Deny"
    settings = {s["name"]: s["value"] for s in config["appSettings"]}
    assert settings["KEYCELL_KEY_BACKEND"] == "azure-mhsm"
    assert settings["KEYCELL_SEAL"] == "hsm"
    assert "AzureWebJobsStorage__accountName" in settings  # identity, no connection string
    assert not any("AccountKey" in str(v) for v in settings.values())


def test_keys_live_in_a_managed_hsm_non_exportable_and_rotating(arm: dict[str, Any]) -> None:
    hsm = one(arm, "Microsoft.KeyVault/managedHSMs")
    assert hsm["properties"]["enablePurgeProtection"] is True
    assert hsm["properties"]["publicNetworkAccess"] == "Disabled"
    key = one(arm, "Microsoft.KeyVault/managedHSMs/keys")
    assert key["properties"]["kty"] == "oct-HSM"
    assert key["properties"]["attributes"]["exportable"] is False
    actions = [a["action"]["type"] for a in key["properties"]["rotationPolicy"]["lifetimeActions"]]
    assert "rotate" in actions
    grants = of_type(arm, "Microsoft.KeyVault/managedHSMs/providers/roleAssignments")
    holders = {g["properties"]["principalId"].split("', variables('")[1].split("'")[0] for g in grants}
    assert holders == {"functionAppName", "relayAppName"}
    for grant in grants:
        assert grant["properties"]["scope"] == "/keys"  # keys only, not the HSM's administration
        assert grant["properties"]["roleDefinitionId"].endswith("variables('hsmCryptoUser'))]")


def test_the_ledger_is_a_strongly_consistent_cosmos_container_keyed_by_kind_with_per_item_ttl(
    arm: dict[str, Any],
) -> None:
    account = one(arm, "Microsoft.DocumentDB/databaseAccounts")
    assert account["properties"]["consistencyPolicy"]["defaultConsistencyLevel"] == "Strong"
    assert account["properties"]["disableLocalAuth"] is True
    assert account["properties"]["backupPolicy"]["type"] == "Continuous"
    container = one(arm, "Microsoft.DocumentDB/databaseAccounts/sqlDatabases/containers")
    resource = container["properties"]["resource"]
    assert resource["partitionKey"]["paths"] == ["/kind"]
    assert resource["defaultTtl"] == -1
    assert resource["uniqueKeyPolicy"]["uniqueKeys"] == [{"paths": ["/path"]}]


def test_key_vault_near_expiry_events_go_to_the_rotation_function(arm: dict[str, Any]) -> None:
    topic = one(arm, "Microsoft.EventGrid/systemTopics")
    assert topic["properties"]["topicType"] == "Microsoft.KeyVault.vaults"
    subscription = one(arm, "Microsoft.EventGrid/systemTopics/eventSubscriptions")
    props = subscription["properties"]
    assert {"Microsoft.KeyVault.SecretNearExpiry", "Microsoft.KeyVault.KeyNearExpiry"} <= set(
        props["filter"]["includedEventTypes"]
    )
    assert props["destination"]["endpointType"] == "AzureFunction"
    target = props["destination"]["properties"]["resourceId"]
    assert (
        target
        == "[format('{0}/functions/rotation', resourceId('Microsoft.Web/sites', variables('functionAppName')))]"
    )
    assert props["eventDeliverySchema"] == "CloudEventSchemaV1_0"
    assert props["deadLetterWithResourceIdentity"]["deadLetterDestination"]["endpointType"] == "StorageBlob"


def test_the_relays_are_a_container_app_with_a_fixed_replica_count_and_tcp_ingress(
    arm: dict[str, Any],
) -> None:
    app = one(arm, "Microsoft.App/containerApps")
    scale = app["properties"]["template"]["scale"]
    assert scale["minReplicas"] == scale["maxReplicas"] == "[parameters('relays')]"
    ingress = app["properties"]["configuration"]["ingress"]
    assert ingress["transport"] == "tcp"
    assert ingress["allowInsecure"] is False
    (container,) = app["properties"]["template"]["containers"]
    assert container["command"] == ["keycell", "relay"]


def test_every_checkov_suppression_gives_its_reason(arm: dict[str, Any]) -> None:
    for resource in arm["resources"]:
        for item in resource.get("metadata", {}).get("checkov", []):
            check, _, reason = item.removeprefix("checkov:skip=").partition(":")
            assert re.fullmatch(r"CKV2?_AZURE_\d+", check) and len(reason.strip()) > 20, item

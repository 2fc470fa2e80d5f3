"""The synthesized AWS deployment holds what a cell needs, sized by infra/cells.toml,
and every role may do only its own job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match, Template

from infra.aws.assembly import Assembly, synthesize
from infra.aws.stacks import handler_importable
from keycell.control_plane.ledger import ATTR_EXPIRES_AT, ATTR_KIND, ATTR_PATH
from keycell.deployment import Cell, load_cell_set, parse_cell_set


def template(assembly: Assembly, name: str) -> Template:
    return Template.from_json(assembly.template(name))


def resources(assembly: Assembly, name: str, kind: str) -> dict[str, dict[str, Any]]:
    raw = assembly.template(name)["Resources"]
    assert isinstance(raw, dict)
    return {k: v for k, v in raw.items() if v["Type"] == kind}


def only(found: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    assert len(found) == 1, sorted(found)
    return next(iter(found.items()))


def statements(role_policy: dict[str, Any]) -> list[dict[str, Any]]:
    found = role_policy["Properties"]["PolicyDocument"]["Statement"]
    assert isinstance(found, list)
    return found


def listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policies_of(assembly: Assembly, name: str, role_id: str) -> list[dict[str, Any]]:
    """Every statement attached to role `role_id` by the stack's inline policies."""
    out = []
    for policy in resources(assembly, name, "AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            out += statements(policy)
    return out


def role_id(assembly: Assembly, name: str, role_name_suffix: str) -> str:
    for logical, role in resources(assembly, name, "AWS::IAM::Role").items():
        if str(role["Properties"].get("RoleName", "")).endswith(role_name_suffix):
            return logical
    raise AssertionError(f"no role named *{role_name_suffix} in {name}")


@pytest.fixture(scope="module")
def eu(aws_assembly: Assembly) -> tuple[Assembly, Cell, str]:
    cell = aws_assembly.cells.cell("eu")
    return aws_assembly, cell, "keycell-eu"


def test_one_stack_per_aws_cell_and_a_global_stack(aws_assembly: Assembly) -> None:
    names = {p.name.removesuffix(".template.json") for p in aws_assembly.template_files()}
    assert names == {"keycell-global"} | {f"keycell-{c.id}" for c in aws_assembly.cells.on("aws")}
    regions = {s.stack_name: s.region for s in aws_assembly.stacks}
    assert regions == {f"keycell-{c.id}": c.region for c in aws_assembly.cells.on("aws")}
    assert aws_assembly.global_stack.region == aws_assembly.cells.home_region


def test_the_ledger_table_has_the_adapters_key_schema_ttl_pitr_cmk_and_deletion_protection(eu: Any) -> None:
    assembly, _, name = eu
    t = template(assembly, name)
    t.resource_count_is("AWS::DynamoDB::Table", 1)
    t.has_resource(
        "AWS::DynamoDB::Table",
        {
            "Properties": {
                "TableName": "keycell-eu-ledger",
                "KeySchema": [
                    {"AttributeName": ATTR_KIND, "KeyType": "HASH"},
                    {"AttributeName": ATTR_PATH, "KeyType": "RANGE"},
                ],
                "BillingMode": "PAY_PER_REQUEST",
                "TimeToLiveSpecification": {"AttributeName": ATTR_EXPIRES_AT, "Enabled": True},
                "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
                "DeletionProtectionEnabled": True,
                "SSESpecification": {
                    "SSEEnabled": True,
                    "SSEType": "KMS",
                    "KMSMasterKeyId": {"Fn::GetAtt": [Match.string_like_regexp("^LedgerKey"), "Arn"]},
                },
            },
            "DeletionPolicy": "Retain",
        },
    )


def test_the_adapter_creates_the_same_table_shape(eu: Any) -> None:
    """DynamoLedger.ensure_table (tests, laptops) and the stack agree on the key schema."""
    from keycell.adapters.ledgers.dynamodb import DynamoLedger

    assembly, _, name = eu
    _, table = only(resources(assembly, name, "AWS::DynamoDB::Table"))
    model = DynamoLedger("keycell-eu-ledger").model
    schema = {
        a.attr_name: ("HASH" if a.is_hash_key else "RANGE")
        for a in model.get_attributes().values()
        if a.is_hash_key or a.is_range_key
    }
    assert {k["AttributeName"]: k["KeyType"] for k in table["Properties"]["KeySchema"]} == schema
    assert model.expires_at.attr_name == table["Properties"]["TimeToLiveSpecification"]["AttributeName"]


def test_every_kms_key_rotates_and_is_kept_on_stack_deletion(eu: Any) -> None:
    assembly, _, name = eu
    keys = resources(assembly, name, "AWS::KMS::Key")
    assert len(keys) == 2
    for key in keys.values():
        assert key["Properties"]["EnableKeyRotation"] is True
        assert key["DeletionPolicy"] == "Retain"


def test_the_api_is_the_chalice_app_wired_to_this_cells_ledger_and_keys(eu: Any) -> None:
    assembly, cell, name = eu
    t = template(assembly, name)
    t.has_resource_properties(
        "AWS::Serverless::Function",
        {
            "FunctionName": "keycell-eu-api",
            "Handler": "app.app",
            "Runtime": "python3.11",
            "Role": {"Fn::GetAtt": [role_id(assembly, name, "-api-eu-west-1"), "Arn"]},
            "ReservedConcurrentExecutions": cell.api_reserved_concurrency,
            "Tracing": "Active",
            "VpcConfig": Match.object_like({"SecurityGroupIds": Match.any_value()}),
            "Environment": {
                "Variables": Match.object_like(
                    {
                        "KEYCELL_CELL": "eu",
                        "KEYCELL_LEDGER": "dynamodb://keycell-eu-ledger?region=eu-west-1",
                        "KEYCELL_KEY_BACKEND": "aws-kms",
                        "KEYCELL_SEAL": "hsm",
                    }
                )
            },
        },
    )
    # Chalice's placeholder role never reaches the template.
    assert "replaced-by-the-cell-stack" not in json.dumps(assembly.template(name))


def test_the_api_is_throttled_as_the_config_says_and_never_logs_bodies(eu: Any) -> None:
    assembly, cell, name = eu
    _, api = only(resources(assembly, name, "AWS::Serverless::Api"))
    (settings,) = api["Properties"]["MethodSettings"]
    assert settings["ThrottlingRateLimit"] == cell.api_rate_limit
    assert settings["ThrottlingBurstLimit"] == cell.api_burst
    assert settings["DataTraceEnabled"] is False
    assert api["Properties"]["StageName"] == "v1"
    assert api["Properties"]["EndpointConfiguration"] == "REGIONAL"
    assert api["Properties"]["AccessLogSetting"]["DestinationArn"]["Fn::GetAtt"][0].startswith(
        "ApiAccessLogs"
    )


def test_rotation_runs_on_each_configured_schedule_and_as_a_secrets_manager_rotation_lambda(eu: Any) -> None:
    assembly, cell, name = eu
    t = template(assembly, name)
    t.has_resource_properties(
        "AWS::Lambda::Function",
        {"FunctionName": "keycell-eu-rotation", "Handler": cell.rotation_handler, "Runtime": "python3.11"},
    )
    rotation_id = next(
        k
        for k, v in resources(assembly, name, "AWS::Lambda::Function").items()
        if v["Properties"].get("FunctionName") == "keycell-eu-rotation"
    )
    rules = {
        r["Properties"]["ScheduleExpression"]: r
        for r in resources(assembly, name, "AWS::Events::Rule").values()
        if "ScheduleExpression" in r["Properties"]
    }
    assert set(rules) == {s.expression for s in cell.rotation_schedules}
    for schedule in cell.rotation_schedules:
        (target,) = rules[schedule.expression]["Properties"]["Targets"]
        assert target["Arn"] == {"Fn::GetAtt": [rotation_id, "Arn"]}
        assert f'"prefix":"{schedule.prefix}"' in json.dumps(
            target["InputTransformer"], separators=(",", ":")
        ).replace("\\", "")
        assert "DeadLetterConfig" in target
    t.has_resource_properties(
        "AWS::Lambda::Permission",
        {
            "Principal": "secretsmanager.amazonaws.com",
            "FunctionName": {"Fn::GetAtt": [rotation_id, "Arn"]},
            "SourceAccount": Match.any_value(),
        },
    )


def test_revocations_reach_the_revocation_function_through_an_encrypted_queue(eu: Any) -> None:
    assembly, cell, name = eu
    t = template(assembly, name)
    t.has_resource_properties(
        "AWS::Lambda::Function", {"FunctionName": "keycell-eu-revocation", "Handler": cell.revocation_handler}
    )
    queues = resources(assembly, name, "AWS::SQS::Queue")
    revocations_id = next(
        k for k, q in queues.items() if q["Properties"]["QueueName"] == "keycell-eu-revocations"
    )
    assert "KmsMasterKeyId" in queues[revocations_id]["Properties"]
    assert queues[revocations_id]["Properties"]["RedrivePolicy"]["maxReceiveCount"] == 5
    t.has_resource_properties(
        "AWS::Lambda::EventSourceMapping",
        {
            "EventSourceArn": {"Fn::GetAtt": [revocations_id, "Arn"]},
            "FunctionResponseTypes": ["ReportBatchItemFailures"],
        },
    )
    t.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventBusName": {"Ref": Match.string_like_regexp("^EventBus")},
            "EventPattern": {"source": ["keycell"], "detail-type": ["Keycell Revocation"]},
            "Targets": [Match.object_like({"Arn": {"Fn::GetAtt": [revocations_id, "Arn"]}})],
        },
    )


def test_only_revocations_made_here_are_forwarded_to_the_other_cells(aws_assembly: Assembly) -> None:
    for stack in aws_assembly.stacks:
        cell = stack.cell
        forward = [
            r
            for r in resources(aws_assembly, stack.stack_name, "AWS::Events::Rule").values()
            if r["Properties"].get("EventPattern", {}).get("detail") == {"origin_cell": [cell.id]}
        ]
        assert len(forward) == 1, cell.id
        arns = json.dumps([t["Arn"] for t in forward[0]["Properties"]["Targets"]])
        for peer in aws_assembly.cells.on("aws"):
            assert (f"event-bus/keycell-{peer.id}-events" in arns) == (peer.id != cell.id)
        for target in forward[0]["Properties"]["Targets"]:
            assert "keycell-event-forwarder" in json.dumps(target["RoleArn"])


def test_the_global_forwarder_may_only_put_events_on_the_cells_buses(aws_assembly: Assembly) -> None:
    (statement,) = [
        s
        for p in resources(aws_assembly, "keycell-global", "AWS::IAM::Policy").values()
        for s in statements(p)
    ]
    assert statement["Action"] == "events:PutEvents"
    buses = json.dumps(statement["Resource"])
    assert all(f"event-bus/keycell-{c.id}-events" in buses for c in aws_assembly.cells.on("aws"))
    directory = only(resources(aws_assembly, "keycell-global", "AWS::SSM::Parameter"))[1]
    listed_cells = json.loads(directory["Properties"]["Value"])["cells"]
    assert [c["id"] for c in listed_cells] == [c.id for c in aws_assembly.cells.cells]


def test_the_relay_is_a_long_lived_fargate_service_reachable_by_other_cells(eu: Any) -> None:
    assembly, cell, name = eu
    t = template(assembly, name)
    t.has_resource_properties(
        "AWS::ECS::Service",
        {
            "LaunchType": "FARGATE",
            "DesiredCount": cell.relays,
            "DeploymentConfiguration": Match.object_like(
                {"DeploymentCircuitBreaker": {"Enable": True, "Rollback": True}, "MinimumHealthyPercent": 100}
            ),
            "NetworkConfiguration": {
                "AwsvpcConfiguration": Match.object_like({"AssignPublicIp": "DISABLED"})
            },
        },
    )
    _, task = only(resources(assembly, name, "AWS::ECS::TaskDefinition"))
    (container,) = task["Properties"]["ContainerDefinitions"]
    assert container["Image"] == cell.relay_image
    assert container["ReadonlyRootFilesystem"] is True
    assert container["User"] == "10001"
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["KEYCELL_RELAY_PEERS"].split(",") == [
        f"relay.{c.id}.keycell.example.com:{c.relay_port}" for c in assembly.cells.cells if c.id != "eu"
    ]
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener", {"Port": cell.relay_port, "Protocol": "TCP"}
    )


# --- least privilege -------------------------------------------------------------------------

STAR_ALLOWED = {
    # CreateKey names no resource; the statement requires the keycell:name request tag.
    "kms:CreateKey",
    "kms:ListAliases",
    "kms:ListKeys",
    "secretsmanager:GetRandomPassword",
    # X-Ray has no resource-level permissions.
    "xray:PutTraceSegments",
    "xray:PutTelemetryRecords",
}


def test_no_role_is_granted_a_wildcard_action_or_an_unbounded_resource(aws_assembly: Assembly) -> None:
    for path in aws_assembly.template_files():
        name = path.name.removesuffix(".template.json")
        for policy in resources(aws_assembly, name, "AWS::IAM::Policy").values():
            for statement in statements(policy):
                actions = listed(statement["Action"])
                assert all(
                    "*" not in a.split(":")[1] or a.endswith(("GenerateDataKey*",)) for a in actions
                ), statement
                if "*" in listed(statement["Resource"]):
                    assert set(actions) <= STAR_ALLOWED, statement
                    if "kms:CreateKey" in actions:
                        assert statement["Condition"] == {"Null": {"aws:RequestTag/keycell:name": "false"}}


def test_the_ledger_is_reached_item_by_item_never_scanned_or_dropped(eu: Any) -> None:
    assembly, _, name = eu
    table_id = only(resources(assembly, name, "AWS::DynamoDB::Table"))[0]
    for suffix in ("-api-eu-west-1", "-rotation-eu-west-1", "-revocation-eu-west-1", "-relay-eu-west-1"):
        granted = policies_of(assembly, name, role_id(assembly, name, suffix))
        dynamo = [s for s in granted if any(a.startswith("dynamodb:") for a in listed(s["Action"]))]
        assert dynamo, suffix
        for statement in dynamo:
            assert statement["Resource"] == {"Fn::GetAtt": [table_id, "Arn"]}
            assert not {
                "dynamodb:Scan",
                "dynamodb:DeleteTable",
                "dynamodb:CreateTable",
                "dynamodb:UpdateTable",
            } & set(listed(statement["Action"]))


def test_only_the_api_creates_and_manages_keys_and_only_keycells_own(eu: Any) -> None:
    assembly, _, name = eu
    manage = {"kms:CreateKey", "kms:ScheduleKeyDeletion", "kms:DisableKey", "kms:CreateAlias"}
    for suffix, may_manage in (
        ("-api-eu-west-1", True),
        ("-rotation-eu-west-1", False),
        ("-revocation-eu-west-1", False),
        ("-relay-eu-west-1", False),
    ):
        granted = policies_of(assembly, name, role_id(assembly, name, suffix))
        actions = {a for s in granted for a in listed(s["Action"])}
        assert bool(manage & actions) == may_manage, suffix
        for statement in granted:
            if {"kms:Sign", "kms:ScheduleKeyDeletion"} & set(listed(statement["Action"])):
                assert statement["Condition"] == {"Null": {"aws:ResourceTag/keycell:name": "false"}}


def test_the_secrets_manager_grant_covers_only_this_deployments_secrets(eu: Any) -> None:
    assembly, _, name = eu
    granted = policies_of(assembly, name, role_id(assembly, name, "-rotation-eu-west-1"))
    (statement,) = [s for s in granted if "secretsmanager:PutSecretValue" in listed(s["Action"])]
    assert ":secret:keycell/*" in json.dumps(statement["Resource"])


# --- a different cell set ---------------------------------------------------------------------


def test_a_lone_cell_is_sized_by_its_own_config_and_forwards_to_nobody(tmp_path: Path) -> None:
    raw = {
        "deployment": {
            "name": "kc",
            "trust_domain": "t.example",
            "home_region": "eu-central-1",
            "dns_zone": "kc.example",
        },
        "defaults": {"relays": 5, "api_rate_limit": 50},
        "cells": [
            {"id": "solo", "cloud": "aws", "region": "eu-central-1", "cidr": "10.40.0.0/16", "relays": 2}
        ],
    }
    assembly = synthesize(parse_cell_set(raw), tmp_path)
    t = template(assembly, "kc-solo")
    t.has_resource_properties("AWS::ECS::Service", {"DesiredCount": 2})
    t.has_resource_properties(
        "AWS::Serverless::Api",
        {"MethodSettings": [Match.object_like({"ThrottlingRateLimit": 50.0, "ThrottlingBurstLimit": 400})]},
    )
    t.has_resource_properties("AWS::DynamoDB::Table", {"TableName": "kc-solo-ledger"})
    assert not [
        r
        for r in resources(assembly, "kc-solo", "AWS::Events::Rule").values()
        if "detail" in r["Properties"].get("EventPattern", {})
    ]


def test_a_handler_that_does_not_import_is_named_in_a_synth_warning(tmp_path: Path) -> None:
    raw = {
        "deployment": {
            "name": "kc",
            "trust_domain": "t.example",
            "home_region": "eu-central-1",
            "dns_zone": "kc.example",
        },
        "cells": [
            {
                "id": "solo",
                "cloud": "aws",
                "region": "eu-central-1",
                "cidr": "10.40.0.0/16",
                "rotation_handler": "keycell.functions.api.app.dispatch",  # exists: no warning
                "revocation_handler": "keycell.functions.nowhere.handler",
            }
        ],
    }
    assembly = synthesize(parse_cell_set(raw), tmp_path)
    # has_warning / has_no_warning match inside Node.js and return nothing. find_warning
    # would hand back MetadataEntry objects, which jsii can only wrap when the venv's
    # aws_cdk/cloud_assembly_schema/__init__.py is aws-cdk-lib's copy; the
    # aws-cdk.cloud-assembly-schema wheel ships a file at the same path, and which one
    # is left depends on the order the installer happened to unpack them in.
    annotations = Annotations.from_stack(assembly.stacks[0])
    annotations.has_warning(
        "*", Match.string_like_regexp(r"revocation handler 'keycell\.functions\.nowhere\.handler'")
    )
    annotations.has_no_warning("*", Match.string_like_regexp("rotation handler"))


def test_handler_importable_names_only_callables() -> None:
    assert handler_importable("keycell.functions.api.app.dispatch")
    assert not handler_importable("keycell.functions.api.app.MAX_DEPTH")
    assert not handler_importable("keycell.functions.absent.app.handler")


def test_the_cdk_app_reads_the_repositorys_cell_set() -> None:
    cells = load_cell_set()
    assert [c.region for c in cells.on("aws")] == ["eu-west-1", "us-east-1", "ap-southeast-2"]


def test_synthesizing_leaves_the_process_environment_as_it_was(tmp_path: Path) -> None:
    """chalice.cdk loads the app with the stage's environment variables set; a cell's
    KEYCELL_LEDGER or KEYCELL_SEAL must not leak into whatever runs next."""
    import os

    before = dict(os.environ)
    synthesize(load_cell_set(), tmp_path)
    assert dict(os.environ) == before

"""The LocalStack kit: its provisioning creates what the stacks create, under the same
names, and the ledger adapter works on the table it makes. Runs against the session's
moto server, or LocalStack when AWS_ENDPOINT_URL names one (`make localstack-test`)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
import yaml

from infra.aws.assembly import Assembly
from keycell.adapters.ledgers.dynamodb import DynamoLedger
from keycell.control_plane.ledger import ATTR_EXPIRES_AT, ConflictError, Key, Kind
from keycell.deployment import load_cell_set

KIT = Path(__file__).resolve().parents[2] / "localstack"


def load_provision() -> ModuleType:
    spec = importlib.util.spec_from_file_location("keycell_localstack_provision", KIT / "provision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def provisioned(aws_endpoint: str) -> dict[str, dict[str, str]]:
    provision = load_provision()
    cells_file = KIT.parent / "infra" / "cells.toml"
    made: dict[str, dict[str, str]] = provision.provision(aws_endpoint, cells_file)
    # A second run (a restarted container) changes nothing and does not fail.
    assert provision.provision(aws_endpoint, cells_file) == made
    return made


def client(service: str, endpoint: str, region: str) -> Any:
    return boto3.client(service, endpoint_url=endpoint, region_name=region)


def test_the_kit_names_resources_as_the_stacks_do(provisioned: dict[str, dict[str, str]]) -> None:
    cells = load_cell_set()
    assert set(provisioned) == {c.id for c in cells.on("aws")}
    for cell in cells.on("aws"):
        made = provisioned[cell.id]
        assert made["table"] == cells.table_name(cell)
        assert made["bus"] == cells.event_bus_name(cell)
        assert made["ledger_key"] == f"alias/{cells.resource_name(cell, 'ledger')}"
        assert made["revocations"] == cells.resource_name(cell, "revocations")


def test_each_cells_table_is_in_its_region_with_the_ledgers_schema_and_ttl(
    provisioned: dict[str, dict[str, str]], aws_endpoint: str
) -> None:
    for cell in load_cell_set().on("aws"):
        dynamodb = client("dynamodb", aws_endpoint, cell.region)
        table = dynamodb.describe_table(TableName=provisioned[cell.id]["table"])["Table"]
        assert {k["AttributeName"]: k["KeyType"] for k in table["KeySchema"]} == {
            "kind": "HASH",
            "path": "RANGE",
        }
        assert table["SSEDescription"]["SSEType"] == "KMS"
        ttl = dynamodb.describe_time_to_live(TableName=provisioned[cell.id]["table"])["TimeToLiveDescription"]
        assert ttl["AttributeName"] == ATTR_EXPIRES_AT
        backups = dynamodb.describe_continuous_backups(TableName=provisioned[cell.id]["table"])
        pitr = backups["ContinuousBackupsDescription"]["PointInTimeRecoveryDescription"]
        assert pitr["PointInTimeRecoveryStatus"] == "ENABLED"


def test_the_ledger_adapter_does_conditional_writes_on_the_provisioned_table(
    provisioned: dict[str, dict[str, str]], aws_endpoint: str
) -> None:
    cell = load_cell_set().cell("us")
    ledger = DynamoLedger(provisioned["us"]["table"], region=cell.region, endpoint_url=aws_endpoint)
    key = Key(Kind.SECRET_META, f"secret/kit-{time.time_ns()}")
    first = ledger.put_if(key, b"one", 0)
    with pytest.raises(ConflictError) as lost:
        ledger.put_if(key, b"two", 0)
    assert lost.value.current_version == first.version
    stored = ledger.get(key)
    assert stored is not None and stored.value == b"one"


def test_the_cells_kms_keys_encrypt_and_decrypt(
    provisioned: dict[str, dict[str, str]], aws_endpoint: str
) -> None:
    cell = load_cell_set().cell("eu")
    kms = client("kms", aws_endpoint, cell.region)
    sealed = kms.encrypt(KeyId=provisioned["eu"]["ledger_key"], Plaintext=b"kit")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=sealed)["Plaintext"] == b"kit"


def test_a_revocation_put_on_a_cells_bus_lands_in_its_revocation_queue(
    provisioned: dict[str, dict[str, str]], aws_endpoint: str
) -> None:
    cell = load_cell_set().cell("eu")
    events = client("events", aws_endpoint, cell.region)
    sqs = client("sqs", aws_endpoint, cell.region)
    marker = f"rev-{time.time_ns()}"
    detail = {"origin_cell": "eu", "revocation": marker}
    sent = events.put_events(
        Entries=[
            {
                "Source": "keycell",
                "DetailType": "Keycell Revocation",
                "Detail": json.dumps(detail),
                "EventBusName": provisioned["eu"]["bus"],
            }
        ]
    )
    assert sent["FailedEntryCount"] == 0
    url = sqs.get_queue_url(QueueName=provisioned["eu"]["revocations"])["QueueUrl"]
    bodies: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(marker in b for b in bodies):
        received = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        bodies += [m["Body"] for m in received.get("Messages", [])]
    (body,) = [b for b in bodies if marker in b]
    assert json.loads(body)["detail"] == detail


def test_every_rotation_schedule_has_a_rule_targeting_the_rotation_queue(
    provisioned: dict[str, dict[str, str]], aws_endpoint: str
) -> None:
    cell = load_cell_set().cell("ap")
    events = client("events", aws_endpoint, cell.region)
    for schedule in cell.rotation_schedules:
        rule = events.describe_rule(Name=f"keycell-ap-rotate-{schedule.name}")
        assert rule["ScheduleExpression"] == schedule.expression
        (target,) = events.list_targets_by_rule(Rule=f"keycell-ap-rotate-{schedule.name}")["Targets"]
        assert target["Arn"].endswith(":keycell-ap-rotation-requests")
        assert json.loads(target["Input"])["detail"]["prefix"] == schedule.prefix


def test_the_compose_file_pins_localstack_4_14_0_on_loopback_with_the_hook_mounted() -> None:
    compose = yaml.safe_load((KIT / "docker-compose.yml").read_text())
    service = compose["services"]["localstack"]
    assert service["image"] == "localstack/localstack:4.14.0"
    assert service["ports"] == ["127.0.0.1:4566:4566"]
    mounts = {m.split(":")[1]: (KIT / m.split(":")[0]).resolve() for m in service["volumes"]}
    assert mounts["/etc/localstack/init/ready.d"] == (KIT / "ready.d").resolve()
    for mount, source in mounts.items():
        assert source.exists(), mount
    assert (KIT / "ready.d" / "10-keycell.py").read_text().count("/opt/keycell/cells.toml") == 1


def test_a_cell_configured_as_the_stack_configures_its_api_boots_on_the_provisioned_resources(
    provisioned: dict[str, dict[str, str]],
    aws_endpoint: str,
    aws_assembly: Assembly,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The API function's environment, read from the synthesized template, run against
    the emulator: DynamoDB ledger on the cell's table, AWS KMS auto-unseal."""
    from keycell.functions.api import http
    from keycell.functions.wiring import router_from_environment

    template = aws_assembly.template("keycell-eu")
    (function,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::Serverless::Function"]
    env: dict[str, str] = dict(function["Properties"]["Environment"]["Variables"])
    assert env["KEYCELL_LEDGER"] == f"dynamodb://{provisioned['eu']['table']}?region=eu-west-1"
    # A fresh copy of the cell's resources, so a long-lived emulator can run this again.
    fresh = load_provision().provision_cell(
        boto3.Session(), aws_endpoint, f"t{uuid.uuid4().hex[:8]}", {"id": "eu", "region": "eu-west-1"}
    )
    env["KEYCELL_LEDGER"] = f"dynamodb://{fresh['table']}?region=eu-west-1"
    # The stack points the API at the cell's relays; no relay runs here, and a cell that
    # cannot reach its relay cannot claim a new secret's home (issue 9), so this cell
    # runs alone, as every secret's home.
    assert env.pop("KEYCELL_RELAY")
    # What Lambda adds: the region; what the emulator needs: its endpoint.
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_endpoint)
    router = router_from_environment({**env, "AWS_REGION": "eu-west-1"})

    def call(method: str, path: str, body: dict[str, Any] | None = None, token: str = "") -> dict[str, Any]:
        headers = {"x-vault-token": token} if token else {}
        status, _, out = http.handle(router, method, path, headers, {}, json.dumps(body) if body else None)
        assert status in (200, 204), (path, status, out)
        return json.loads(out) if out else {}

    assert call("GET", "sys/seal-status")["initialized"] is False
    root = call("POST", "sys/init", {"recovery_shares": 1, "recovery_threshold": 1})["root_token"]
    status = call("GET", "sys/seal-status")
    assert status["sealed"] is False and status["recovery_seal"] is True  # unsealed by KMS
    call("POST", "secret/data/app/db", {"data": {"password": "kit-s3cret"}}, root)
    read = call("GET", "secret/data/app/db", token=root)
    assert read["data"]["data"] == {"password": "kit-s3cret"}
    # The audit trail goes to standard output (CloudWatch Logs on Lambda), without the secret.
    printed = capsys.readouterr().out
    assert '"path":"secret/data/app/db"' in printed
    assert "kit-s3cret" not in printed

"""Create every AWS cell's local resources on an emulator (LocalStack or a moto server).

The LocalStack init hook (`ready.d/10-keycell.py`) runs this inside the container;
the tests run it against their moto server. Only the standard library and boto3, since
LocalStack's interpreter has nothing else, so the naming rule of
`keycell.deployment.CellSet` is repeated here (a test holds the two together).

Per AWS cell of `infra/cells.toml`, in the cell's region:
- the ledger table `<name>-<cell>-ledger` (hash `kind`, range `path`, on demand, TTL on
  `expires_at`, point-in-time recovery, encrypted under the cell's ledger key);
- KMS keys `alias/<name>-<cell>-ledger` and `alias/<name>-<cell>-operations`;
- the event bus `<name>-<cell>-events`, the queues `-revocations` (with `-dead-letters`)
  and `-rotation-requests`, a rule sending revocations on the bus to the queue, and one
  schedule rule per rotation schedule sending to the rotation-requests queue (locally
  nothing runs the rotation function; whoever drives the demo reads that queue).

Run again, it changes nothing (every step tolerates "already exists").

    python localstack/provision.py --endpoint http://127.0.0.1:4566 [--cells infra/cells.toml]
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

REVOCATION_DETAIL_TYPE = "Keycell Revocation"
EVENT_SOURCE = "keycell"
TTL_ATTRIBUTE = "expires_at"


def aws_cells(config: dict[str, Any]) -> list[dict[str, Any]]:
    defaults = config.get("defaults", {})
    return [{**defaults, **cell} for cell in config["cells"] if cell.get("cloud", "aws") == "aws"]


def names(deployment: str, cell_id: str) -> dict[str, str]:
    prefix = f"{deployment}-{cell_id}"
    return {
        "table": f"{prefix}-ledger",
        "ledger_key": f"alias/{prefix}-ledger",
        "operations_key": f"alias/{prefix}-operations",
        "bus": f"{prefix}-events",
        "revocations": f"{prefix}-revocations",
        "dead_letters": f"{prefix}-dead-letters",
        "rotation_requests": f"{prefix}-rotation-requests",
    }


def _exists_ok(call: Any, *codes: str, **kwargs: Any) -> Any:
    try:
        return call(**kwargs)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in codes:
            return None
        raise


def _key(kms: Any, alias: str, description: str) -> str:
    try:
        return str(kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"])
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "NotFoundException":
            raise
    arn = str(
        kms.create_key(Description=description, KeyUsage="ENCRYPT_DECRYPT", KeySpec="SYMMETRIC_DEFAULT")[
            "KeyMetadata"
        ]["Arn"]
    )
    kms.create_alias(AliasName=alias, TargetKeyId=arn)
    return arn


def _queue(sqs: Any, name: str, attributes: dict[str, str]) -> tuple[str, str]:
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return str(url), str(arn)


def provision_cell(
    session: boto3.Session, endpoint: str, deployment: str, cell: dict[str, Any]
) -> dict[str, str]:
    region = cell["region"]
    n = names(deployment, cell["id"])

    def client(service: str) -> Any:
        return session.client(service, endpoint_url=endpoint, region_name=region)

    kms, dynamodb, sqs, events = client("kms"), client("dynamodb"), client("sqs"), client("events")
    ledger_key = _key(kms, n["ledger_key"], f"ledger table of cell {cell['id']}")
    _key(kms, n["operations_key"], f"logs and queues of cell {cell['id']}")

    created = _exists_ok(
        dynamodb.create_table,
        "ResourceInUseException",
        TableName=n["table"],
        AttributeDefinitions=[
            {"AttributeName": "kind", "AttributeType": "S"},
            {"AttributeName": "path", "AttributeType": "S"},
        ],
        KeySchema=[
            {"AttributeName": "kind", "KeyType": "HASH"},
            {"AttributeName": "path", "KeyType": "RANGE"},
        ],
        BillingMode="PAY_PER_REQUEST",
        SSESpecification={"Enabled": True, "SSEType": "KMS", "KMSMasterKeyId": ledger_key},
    )
    if created is not None:
        dynamodb.get_waiter("table_exists").wait(
            TableName=n["table"], WaiterConfig={"Delay": 1, "MaxAttempts": 60}
        )
        dynamodb.update_time_to_live(
            TableName=n["table"], TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
        )
        dynamodb.update_continuous_backups(
            TableName=n["table"], PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True}
        )

    _, dead_arn = _queue(sqs, n["dead_letters"], {"MessageRetentionPeriod": "1209600"})
    _, revocations_arn = _queue(
        sqs,
        n["revocations"],
        {"RedrivePolicy": json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": "5"})},
    )
    _, rotation_arn = _queue(sqs, n["rotation_requests"], {})

    _exists_ok(events.create_event_bus, "ResourceAlreadyExistsException", Name=n["bus"])
    events.put_rule(
        Name=f"{deployment}-{cell['id']}-revocations-to-queue",
        EventBusName=n["bus"],
        EventPattern=json.dumps({"source": [EVENT_SOURCE], "detail-type": [REVOCATION_DETAIL_TYPE]}),
    )
    events.put_targets(
        Rule=f"{deployment}-{cell['id']}-revocations-to-queue",
        EventBusName=n["bus"],
        Targets=[{"Id": "revocations", "Arn": revocations_arn}],
    )
    for schedule in cell.get("rotation_schedules", []):
        rule = f"{deployment}-{cell['id']}-rotate-{schedule['name']}"
        events.put_rule(Name=rule, ScheduleExpression=schedule["expression"])
        detail = {"schedule": schedule["name"], "prefix": schedule.get("prefix", "")}
        events.put_targets(
            Rule=rule,
            Targets=[{"Id": "rotation", "Arn": rotation_arn, "Input": json.dumps({"detail": detail})}],
        )
    return n


def provision(endpoint: str, cells_file: Path) -> dict[str, dict[str, str]]:
    config = tomllib.loads(cells_file.read_text(encoding="utf-8"))
    deployment = config["deployment"]["name"]
    session = boto3.Session()
    return {cell["id"]: provision_cell(session, endpoint, deployment, cell) for cell in aws_cells(config)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="http://127.0.0.1:4566")
    parser.add_argument(
        "--cells", type=Path, default=Path(__file__).resolve().parent.parent / "infra" / "cells.toml"
    )
    args = parser.parse_args(argv)
    for cell_id, made in provision(args.endpoint, args.cells).items():
        print(f"keycell: cell {cell_id}: {', '.join(made.values())}")


if __name__ == "__main__":
    main()

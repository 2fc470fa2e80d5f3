"""The rotation function (functions/rotation/app.py) through Chalice's test client:
as a real Secrets Manager rotation Lambda against moto's Secrets Manager (staging
labels moving as AWS moves them) rotating a real PostgreSQL role; HTTP deliveries of
CloudEvents and Event Grid; bad events answered 400, never dropped."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from chalice.test import Client

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.adapters.secretstores.aws_secretsmanager import SecretsManagerStore
from keycell.control_plane.rotation import Rotator
from keycell.control_plane.services import CellServices
from keycell.functions.rotation import app as rotation_app
from keycell.functions.rotation.handler import RotationContext
from keycell.functions.rotation.wiring import install
from keycell.testing.postgres import PostgresServer
from tests.rotation.conftest import pg_login_works, unique


@pytest.fixture
def services(tmp_path: Path, postgres: PostgresServer) -> Iterator[CellServices]:
    ledger = SqliteLedger(tmp_path / "cell.db")
    services = CellServices(ledger, lambda barrier: SoftwareKeyBackend(store=barrier))
    result = services.seal.init(1, 1)
    services.seal.unseal(result.shares[0])
    services.after_unseal()
    install(services, {"KEYCELL_TARGET_POSTGRES": postgres.dsn()})
    yield services
    ledger.close()


@pytest.fixture
def client(services: CellServices, aws_endpoint: str) -> Iterator[Client]:
    def sm_rotator() -> Rotator:
        return Rotator(SecretsManagerStore(endpoint_url=aws_endpoint), services.rotator.targets)

    rotation_app.configure(RotationContext(services, secretsmanager=sm_rotator))
    with Client(rotation_app.app) as test_client:
        yield test_client
    rotation_app.configure(None)


def labels(sm: Any, secret: str) -> dict[str, list[str]]:
    return {v: sorted(s) for v, s in sm.describe_secret(SecretId=secret)["VersionIdsToStages"].items()}


def invoke(client: Client, event: dict[str, Any]) -> Any:
    return client.lambda_.invoke("rotate", event)


def test_a_secrets_manager_rotation_lambda_rotates_a_postgres_role(
    client: Client, services: CellServices, aws_endpoint: str
) -> None:
    sm = boto3.client("secretsmanager", endpoint_url=aws_endpoint, region_name="us-east-1")
    base = unique("smapp")
    target = services.rotator.targets["postgres"]
    first = target.generate({"username": base}, None, None)
    target.apply({"username": base}, first, None)
    created = sm.create_secret(
        Name=base,
        SecretString=json.dumps(first),
        Tags=[
            {"Key": "keycell:target", "Value": "postgres"},
            {"Key": "keycell:params", "Value": json.dumps({"username": base})},
        ],
    )
    v1 = created["VersionId"]
    arn = created["ARN"]
    tokens = [str(uuid.uuid4()), str(uuid.uuid4())]
    users = []
    for round_, token in enumerate(tokens):
        for step in ("createSecret", "setSecret", "testSecret", "finishSecret"):
            reply = invoke(client, {"Step": step, "SecretId": arn, "ClientRequestToken": token})
            assert reply.payload["results"][0]["outcome"] == "done", reply.payload
            if step == "createSecret":
                # Secrets Manager redelivers: the same token makes no second version.
                invoke(client, {"Step": step, "SecretId": arn, "ClientRequestToken": token})
                assert labels(sm, base)[token] == ["AWSPENDING"]
        now = labels(sm, base)
        previous = v1 if round_ == 0 else tokens[0]
        assert now[token] == ["AWSCURRENT"] and now[previous] == ["AWSPREVIOUS"]
        assert [v for v, s in now.items() if "AWSCURRENT" in s] == [token]
        assert not any("AWSPENDING" in s for s in now.values())
        current = json.loads(sm.get_secret_value(SecretId=base)["SecretString"])
        old = json.loads(sm.get_secret_value(SecretId=base, VersionStage="AWSPREVIOUS")["SecretString"])
        assert pg_login_works(current) and pg_login_works(old)  # alternating users: both work
        users.append(current["username"])
    assert users == [f"{base}_clone", base]
    assert len(sm.list_secret_version_ids(SecretId=base)["Versions"]) == 3


def test_a_failing_step_raises_so_secrets_manager_retries(client: Client, aws_endpoint: str) -> None:
    sm = boto3.client("secretsmanager", endpoint_url=aws_endpoint, region_name="us-east-1")
    name = unique("smbad")
    sm.create_secret(Name=name, SecretString=json.dumps({"password": "x"}))
    token = str(uuid.uuid4())
    with pytest.raises(Exception, match="not pending"):
        invoke(client, {"Step": "setSecret", "SecretId": name, "ClientRequestToken": token})
    assert not any("AWSPENDING" in s for s in labels(sm, name).values())


def test_http_cloudevents_rotate_once_per_event(client: Client, services: CellServices) -> None:
    services.rotator.enroll(services.rotation_store, "team/api", target="generic", params={})
    event = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "/ops",
        "type": "dev.keycell.rotation.requested",
        "data": {"secret": "team/api"},
    }
    headers = {"Content-Type": "application/cloudevents+json"}
    first = client.http.post("/events", headers=headers, body=json.dumps(event))
    again = client.http.post("/events", headers=headers, body=json.dumps(event))
    assert first.status_code == again.status_code == 200
    assert json.loads(first.body)["results"][0]["outcome"] == "rotated"
    assert json.loads(again.body)["results"][0]["outcome"] == "already-done"
    binary = client.http.post(
        "/events",
        headers={
            "ce-specversion": "1.0",
            "ce-id": "e-2",
            "ce-source": "/ops",
            "ce-type": "dev.keycell.rotation.requested",
            "Content-Type": "application/json",
        },
        body=json.dumps({"secret": "team/api"}),
    )
    assert binary.status_code == 200
    assert services.rotation_store.state("team/api").rotations == 2


def test_event_grid_handshake_and_near_expiry(client: Client, services: CellServices) -> None:
    services.rotator.enroll(services.rotation_store, "db-password", target="generic", params={})
    handshake = [
        {
            "id": "v",
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "subject": "",
            "data": {"validationCode": "code-123"},
            "eventTime": "2026-11-29T06:00:00Z",
            "dataVersion": "1",
        }
    ]
    reply = client.http.post(
        "/events", headers={"Content-Type": "application/json"}, body=json.dumps(handshake)
    )
    assert json.loads(reply.body) == {"validationResponse": "code-123"}
    near = [
        {
            "id": "n1",
            "eventType": "Microsoft.KeyVault.SecretNearExpiry",
            "subject": "db-password",
            "data": {"ObjectName": "db-password", "VaultName": "kv"},
            "eventTime": "2026-11-29T06:00:00Z",
            "dataVersion": "1",
        }
    ]
    reply = client.http.post("/events", headers={"Content-Type": "application/json"}, body=json.dumps(near))
    assert reply.status_code == 200
    assert services.rotation_store.state("db-password").rotations == 1


def test_unknown_and_malformed_events_are_answered_400(client: Client) -> None:
    for body in ["{}", "not json", json.dumps({"Step": "bogus", "SecretId": "x", "ClientRequestToken": "t"})]:
        reply = client.http.post("/events", headers={"Content-Type": "application/json"}, body=body)
        assert reply.status_code == 400 and json.loads(reply.body)["errors"]
    with pytest.raises(Exception, match="unrecognised event"):
        invoke(client, {"hello": "world"})


def test_an_eventbridge_schedule_sweeps_what_is_due(client: Client, services: CellServices) -> None:
    services.rotator.enroll(services.rotation_store, "due/a", target="generic", params={}, interval=1)
    services.rotation_store.configure("due/a", interval=1)
    event = {
        "version": "0",
        "id": "sched-1",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "time": "2026-11-29T06:00:00Z",
        "detail": {},
    }
    import time

    time.sleep(1.1)
    rotation_app.context().window = 0  # no splay: everything due runs now
    reply = invoke(client, event)
    outcome = reply.payload["results"][0]
    assert outcome["rotated"] == ["due/a"]
    # The same schedule tidies expired leases and retries failed revocations.
    assert outcome["leases_tidied"] == {"revoked": 0, "revoker_errors": 0}
    assert outcome["revocations_retried"] == {"revoked": 0, "still_failing": 0}


def test_the_function_configures_itself_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keycell.functions.wiring import services_from_environment

    monkeypatch.setenv("KEYCELL_LEDGER", f"sqlite://{tmp_path}/cell.db")
    monkeypatch.setenv("KEYCELL_KEY_BACKEND", "software")
    monkeypatch.setenv("KEYCELL_SOFTWARE_KEYS", f"sqlite://{tmp_path}/keys.db")
    monkeypatch.setenv("KEYCELL_SEAL", "hsm")
    first = services_from_environment()
    first.seal.init(1, 1)  # HSM seal: every process of the cell unseals itself
    first.after_unseal()
    first.rotator.enroll(first.rotation_store, "env/one", target="generic", params={})
    first.ledger.close()
    rotation_app.configure(None)
    try:
        with Client(rotation_app.app) as test_client:
            event = {
                "version": "0",
                "id": "e-env",
                "detail-type": "Keycell Rotation Requested",
                "source": "ops",
                "detail": {"secret": "env/one"},
            }
            reply = test_client.lambda_.invoke("rotate", event)
            assert reply.payload["results"][0]["outcome"] == "rotated"
            assert set(rotation_app.context().services.rotator.targets) >= {"generic"}
    finally:
        rotation_app.configure(None)

"""One conformance suite for the event normalisers: every sample of every cloud shape
is claimed by exactly one normaliser and yields the expected request; malformed
samples of each shape are refused with a clear error; unknown events are refused;
redelivery gives the same token."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent

from keycell.adapters.events import NORMALISERS
from keycell.control_plane.events import (
    IGNORE,
    ROTATE,
    STEP,
    SWEEP,
    VALIDATE,
    MalformedEventError,
    RawEvent,
    UnknownEventError,
    normalise,
)
from keycell.control_plane.rotation import Step

TOKEN = "6a1f5c0e-2b7d-4f3a-9c1e-0d8b7a6f5e4d"


def sm(step: str = "createSecret", **more: Any) -> dict[str, Any]:
    return {
        "Step": step,
        "SecretId": "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbCdEf",
        "ClientRequestToken": TOKEN,
        **more,
    }


def eventbridge(detail: dict[str, Any] | None = None, kind: str = "Scheduled Event") -> dict[str, Any]:
    return {
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": kind,
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-11-29T06:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/keycell-sweep"],
        "detail": detail or {},
    }


def eventgrid(
    event_type: str = "Microsoft.KeyVault.SecretNearExpiry", name: str = "db-password"
) -> list[dict[str, Any]]:
    return [
        {
            "id": "00eccf70-95a7-4e7c-8299-2eb17ee9ad64",
            "topic": "/subscriptions/s/resourceGroups/g/providers/Microsoft.KeyVault/vaults/kv1",
            "subject": name,
            "eventType": event_type,
            "eventTime": "2026-11-29T06:00:00Z",
            "data": {
                "Id": f"https://kv1.vault.azure.net/secrets/{name}/abc",
                "VaultName": "kv1",
                "ObjectType": "Secret",
                "ObjectName": name,
                "Version": "abc",
                "NBF": None,
                "EXP": 1796000000,
            },
            "dataVersion": "1",
            "metadataVersion": "1",
        }
    ]


def pubsub(event_type: str = "SECRET_ROTATE", push: bool = True) -> dict[str, Any]:
    message = {
        "attributes": {
            "eventType": event_type,
            "secretId": "projects/p1/secrets/api-key",
            "dataFormat": "JSON_API_V1",
        },
        "data": base64.b64encode(b'{"name": "projects/p1/secrets/api-key"}').decode(),
        "messageId": "2070443601311540",
        "publishTime": "2026-11-29T06:00:00Z",
    }
    return {"message": message, "subscription": "projects/p1/subscriptions/keycell"} if push else message


def cloudevent(
    event_type: str = "dev.keycell.rotation.requested", data: Any = None, **attrs: str
) -> CloudEvent:
    return CloudEvent(
        {"type": event_type, "source": "/keycell/tests", "id": "ce-1", **attrs},
        data if data is not None else {"secret": "app/db"},
    )


def structured(event: CloudEvent) -> RawEvent:
    headers, body = to_structured(event)
    return RawEvent(body, {k.lower(): v for k, v in headers.items()})


def binary(event: CloudEvent) -> RawEvent:
    headers, body = to_binary(event)
    return RawEvent(body, {k.lower(): v for k, v in headers.items()})


# sample -> (source, action, secret)
GOOD: dict[str, tuple[RawEvent, str, str, str | None]] = {
    "secretsmanager-create": (RawEvent(sm()), "aws.secretsmanager", STEP, sm()["SecretId"]),
    "secretsmanager-finish-with-rotation-token": (
        RawEvent(sm("finishSecret", RotationToken="x")),
        "aws.secretsmanager",
        STEP,
        sm()["SecretId"],
    ),
    "eventbridge-schedule": (RawEvent(eventbridge()), "aws.events", SWEEP, None),
    "eventbridge-schedule-one-secret": (
        RawEvent(eventbridge({"secret": "app/db"})),
        "aws.events",
        ROTATE,
        "app/db",
    ),
    "eventbridge-requested": (
        RawEvent(eventbridge({"secret": "app/db"}, "Keycell Rotation Requested")),
        "aws.events",
        ROTATE,
        "app/db",
    ),
    "eventgrid-secret": (RawEvent(eventgrid()), "azure.eventgrid", ROTATE, "db-password"),
    "eventgrid-key": (
        RawEvent(eventgrid("Microsoft.KeyVault.KeyNearExpiry", "signing")),
        "azure.eventgrid",
        ROTATE,
        "signing",
    ),
    "eventgrid-other-keyvault": (
        RawEvent(eventgrid("Microsoft.KeyVault.SecretNewVersionCreated")),
        "azure.eventgrid",
        IGNORE,
        None,
    ),
    "eventgrid-validation": (
        RawEvent(
            [
                {
                    "id": "v1",
                    "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
                    "subject": "",
                    "data": {"validationCode": "512d38b6"},
                    "eventTime": "2026-11-29T06:00:00Z",
                    "dataVersion": "1",
                }
            ]
        ),
        "azure.eventgrid",
        VALIDATE,
        None,
    ),
    "pubsub-push": (RawEvent(pubsub()), "gcp.pubsub", ROTATE, "api-key"),
    "pubsub-background": (RawEvent(pubsub(push=False)), "gcp.pubsub", ROTATE, "api-key"),
    "pubsub-other-type": (RawEvent(pubsub("SECRET_VERSION_ADD")), "gcp.pubsub", IGNORE, "api-key"),
    "cloudevents-structured": (structured(cloudevent()), "cloudevents", ROTATE, "app/db"),
    "cloudevents-binary": (binary(cloudevent()), "cloudevents", ROTATE, "app/db"),
    "cloudevents-dict": (
        RawEvent(json.loads(structured(cloudevent()).body)),
        "cloudevents",
        ROTATE,
        "app/db",
    ),
    "cloudevents-subject": (
        structured(cloudevent(data={}, subject="svc/key")),
        "cloudevents",
        ROTATE,
        "svc/key",
    ),
    "cloudevents-sweep": (
        binary(cloudevent("dev.keycell.rotation.sweep", {"prefix": "team/"})),
        "cloudevents",
        SWEEP,
        None,
    ),
    "cloudevents-keyvault": (
        structured(
            cloudevent("Microsoft.KeyVault.SecretNearExpiry", eventgrid()[0]["data"], subject="db-password")
        ),
        "cloudevents",
        ROTATE,
        "db-password",
    ),
    "cloudevents-eventarc-pubsub": (
        structured(cloudevent("google.cloud.pubsub.topic.v1.messagePublished", pubsub())),
        "cloudevents",
        ROTATE,
        "api-key",
    ),
}

BAD: dict[str, RawEvent] = {
    "secretsmanager-unknown-step": RawEvent(sm("rotateEverything")),
    "secretsmanager-no-token": RawEvent({"Step": "createSecret", "SecretId": "db"}),
    "secretsmanager-token-with-slash": RawEvent({**sm(), "ClientRequestToken": "a/b"}),
    "eventbridge-no-id": RawEvent({k: v for k, v in eventbridge().items() if k != "id"}),
    "eventbridge-other-detail-type": RawEvent(eventbridge(kind="EC2 Instance State-change Notification")),
    "eventbridge-detail-not-object": RawEvent({**eventbridge(), "detail": "x"}),
    "eventbridge-requested-without-secret": RawEvent(eventbridge(kind="Keycell Rotation Requested")),
    "eventgrid-no-data": RawEvent([{k: v for k, v in eventgrid()[0].items() if k != "data"}]),
    "eventgrid-not-keyvault": RawEvent([{**eventgrid()[0], "eventType": "Microsoft.Storage.BlobCreated"}]),
    "eventgrid-no-name": RawEvent([{**eventgrid()[0], "subject": "", "data": {"VaultName": "kv1"}}]),
    "pubsub-no-attributes": RawEvent({"message": {"data": "", "messageId": "1"}, "subscription": "s"}),
    "pubsub-unknown-type": RawEvent(pubsub("SOMETHING_ELSE")),
    "pubsub-bad-secret-id": RawEvent(
        {
            "message": {
                **pubsub()["message"],
                "attributes": {"eventType": "SECRET_ROTATE", "secretId": "api-key"},
            },
            "subscription": "s",
        }
    ),
    "cloudevents-wrong-version": RawEvent(
        {
            "specversion": "0.3",
            "id": "1",
            "source": "s",
            "type": "dev.keycell.rotation.requested",
            "data": {"secret": "x"},
        }
    ),
    "cloudevents-no-id": RawEvent(
        {"specversion": "1.0", "source": "s", "type": "dev.keycell.rotation.requested"}
    ),
    "cloudevents-unknown-type": structured(cloudevent("com.example.unrelated")),
    "cloudevents-no-secret": structured(cloudevent(data={"other": 1})),
    "cloudevents-binary-not-json": RawEvent(
        b"\x00\x01",
        {
            "ce-specversion": "1.0",
            "ce-id": "1",
            "ce-source": "s",
            "ce-type": "dev.keycell.rotation.requested",
        },
    ),
    "cloudevents-structured-not-json": RawEvent(b"{nope", {"content-type": "application/cloudevents+json"}),
}

UNKNOWN: dict[str, RawEvent] = {
    "empty-object": RawEvent({}),
    "a-number": RawEvent(42),
    "text": RawEvent(b"rotate please"),
    "s3-notification": RawEvent({"Records": [{"eventSource": "aws:s3"}]}),
    "empty-array": RawEvent([]),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_each_sample_is_claimed_by_exactly_one_normaliser(case: str) -> None:
    raw, source, _, _ = GOOD[case]
    assert [n.source for n in NORMALISERS if n.claims(raw)] == [source]


@pytest.mark.parametrize("case", sorted(GOOD))
def test_each_sample_gives_its_request(case: str) -> None:
    raw, source, action, secret = GOOD[case]
    requests = normalise(raw, NORMALISERS)
    assert len(requests) == 1
    request = requests[0]
    assert (request.source, request.action, request.secret) == (source, action, secret)
    if action == ROTATE:
        assert request.token and "/" not in request.token
    if action == STEP:
        assert request.token == TOKEN and isinstance(request.step, Step)


@pytest.mark.parametrize("case", sorted(GOOD))
def test_redelivery_gives_the_same_token(case: str) -> None:
    raw, *_ = GOOD[case]
    assert normalise(raw, NORMALISERS)[0].token == normalise(raw, NORMALISERS)[0].token


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_events_of_each_shape_are_refused_and_logged(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(MalformedEventError) as caught:
        normalise(BAD[case], NORMALISERS)
    assert caught.value.status == 400 and caught.value.message
    assert any("malformed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", sorted(UNKNOWN))
def test_unknown_events_are_refused_and_logged(case: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(UnknownEventError):
        normalise(UNKNOWN[case], NORMALISERS)
    assert any("unknown shape" in r.getMessage() for r in caplog.records)


def test_the_secret_payload_never_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    raw = RawEvent(
        {"specversion": "1.0", "id": "1", "source": "s", "type": "x", "data": {"password": "hunter2-secret"}}
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(MalformedEventError):
        normalise(raw, NORMALISERS)
    assert "hunter2-secret" not in caplog.text


def test_distinct_events_give_distinct_tokens() -> None:
    a = normalise(structured(cloudevent(id="1")), NORMALISERS)[0].token
    b = normalise(structured(cloudevent(id="2")), NORMALISERS)[0].token
    c = normalise(structured(cloudevent(id="1", source="/other")), NORMALISERS)[0].token
    assert len({a, b, c}) == 3

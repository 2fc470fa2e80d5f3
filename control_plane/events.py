"""Cloud events that trigger rotation, normalised to one shape.

Each cloud says "rotate this" differently: an EventBridge schedule, a Secrets Manager
rotation step, an Azure Event Grid `Microsoft.KeyVault.SecretNearExpiry`, a GCP
Pub/Sub `SECRET_ROTATE` notification, a CloudEvents 1.0 event (structured or binary).
An `EventNormaliser` (one per shape, in adapters/events) claims the events of its
shape and turns each into `RotationRequest`s. `normalise` asks every normaliser:

- exactly one claims a well-formed event; its requests come back;
- no normaliser claims it: `UnknownEventError`;
- the claiming normaliser finds it malformed: `MalformedEventError`.

Both errors are logged (the event's shape, never its payload) and raised: an event is
never dropped silently. Requests that deliberately do nothing (a Pub/Sub notification
about another kind of secret change) say so with action "ignore" and a reason, and
the rotation function reports them.

Request tokens: a Secrets Manager step carries its own `ClientRequestToken`; for the
other shapes the token is derived from the event's source and id, so a redelivered
event (every cloud delivers at least once) rotates nothing twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.rotation import Step

log = logging.getLogger(__name__)

ROTATE, STEP, SWEEP, VALIDATE, IGNORE = "rotate", "step", "sweep", "validate", "ignore"


@dataclass(frozen=True)
class RawEvent:
    """What arrived: a Lambda invocation's event (a parsed JSON value, no headers) or an
    HTTP delivery (the body, parsed when it is JSON, and lower-cased headers)."""

    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RotationRequest:
    source: str  # which normaliser: "aws.events", "aws.secretsmanager", ...
    action: str  # rotate | step | sweep | validate | ignore
    event_id: str
    secret: str | None = None  # the secret's name (or Secrets Manager SecretId)
    token: str | None = None
    step: Step | None = None
    detail: dict[str, Any] = field(default_factory=dict)  # prefix (sweep), validation code, reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "action": self.action,
            "event_id": self.event_id,
            "secret": self.secret,
            "token": self.token,
            "step": None if self.step is None else self.step.value,
            "detail": self.detail,
        }


class EventError(InvalidRequest):
    """An event the rotation function cannot act on (400 over HTTP; a failed Lambda
    invocation, so the sender retries or dead-letters it)."""


class UnknownEventError(EventError):
    pass


class MalformedEventError(EventError):
    pass


class EventNormaliser(Protocol):
    source: str

    def claims(self, raw: RawEvent) -> bool:
        """Is this event of my shape (well-formed or not)? Cheap; never raises."""
        ...

    def normalise(self, raw: RawEvent) -> list[RotationRequest]:
        """The requests this event makes; MalformedEventError if it is of my shape but
        broken. Never an empty list."""
        ...


def derived_token(source: str, event_id: str) -> str:
    """A request token from an event's identity: the same event, the same token."""
    return "evt-" + hashlib.sha256(f"{source}\x00{event_id}".encode()).hexdigest()[:40]


def describe(raw: RawEvent) -> str:
    """The event's shape for a log line: its top-level keys and header names, no values."""
    body = raw.body
    if isinstance(body, Mapping):
        shape = "object with keys " + ",".join(sorted(str(k) for k in body)[:12])
    elif isinstance(body, list):
        shape = f"array of {len(body)}"
    else:
        shape = type(body).__name__
    headers = ",".join(sorted(h for h in raw.headers if h.startswith("ce-") or h == "content-type"))
    return shape + (f"; headers {headers}" if headers else "")


def normalise(raw: RawEvent, normalisers: Sequence[EventNormaliser]) -> list[RotationRequest]:
    claimants = [n for n in normalisers if n.claims(raw)]
    if not claimants:
        log.warning("rotation event rejected: unknown shape (%s)", describe(raw))
        raise UnknownEventError(
            "unrecognised event: expected an EventBridge scheduled event, a Secrets Manager rotation step, "
            "an Azure Event Grid KeyVault NearExpiry event, a GCP Pub/Sub SECRET_ROTATE notification or a "
            "CloudEvents 1.0 event"
        )
    if len(claimants) > 1:  # a bug in the normalisers, not the sender's fault; still never silent
        log.error("rotation event claimed by %s", [n.source for n in claimants])
    normaliser = claimants[0]
    try:
        requests = normaliser.normalise(raw)
    except MalformedEventError as exc:
        log.warning(
            "rotation event rejected: malformed %s event (%s): %s",
            normaliser.source,
            describe(raw),
            exc.message,
        )
        raise
    if not requests:
        raise MalformedEventError(f"the {normaliser.source} event asks for nothing")
    for request in requests:
        log.info(
            "rotation event %s from %s: %s %s",
            request.event_id,
            request.source,
            request.action,
            request.secret,
        )
    return requests


# --- helpers the normalisers share -----------------------------------------------------


def require_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MalformedEventError(f"{where}: {key!r} must be a non-empty string")
    return value


def require_obj(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if not isinstance(value, Mapping):
        raise MalformedEventError(f"{where}: {key!r} must be an object")
    return value

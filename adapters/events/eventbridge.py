"""Amazon EventBridge events: the scheduled rule's `Scheduled Event` (sweep what is due,
optionally under `detail.prefix`, or rotate `detail.secret`), and Keycell's own
`Keycell Rotation Requested` (rotate `detail.secret`)."""

from __future__ import annotations

from collections.abc import Mapping

from keycell.control_plane.events import (
    ROTATE,
    SWEEP,
    MalformedEventError,
    RawEvent,
    RotationRequest,
    derived_token,
    require_str,
)

SCHEDULED = "Scheduled Event"
REQUESTED = "Keycell Rotation Requested"


class EventBridgeSchedule:
    source = "aws.events"

    def claims(self, raw: RawEvent) -> bool:
        return isinstance(raw.body, Mapping) and "detail-type" in raw.body

    def normalise(self, raw: RawEvent) -> list[RotationRequest]:
        body = raw.body
        where = "EventBridge event"
        kind = require_str(body, "detail-type", where)
        event_id = require_str(body, "id", where)
        require_str(body, "source", where)
        detail = body.get("detail", {})
        if not isinstance(detail, Mapping):
            raise MalformedEventError(f"{where}: 'detail' must be an object")
        secret = detail.get("secret")
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise MalformedEventError(f"{where}: detail.secret must be a non-empty string")
        token = derived_token(self.source, event_id)
        if kind == SCHEDULED:
            if secret:
                return [RotationRequest(self.source, ROTATE, event_id, secret=secret, token=token)]
            prefix = detail.get("prefix", "")
            if not isinstance(prefix, str):
                raise MalformedEventError(f"{where}: detail.prefix must be a string")
            return [
                RotationRequest(
                    self.source, SWEEP, event_id, detail={"prefix": prefix, "time": body.get("time")}
                )
            ]
        if kind == REQUESTED:
            if not secret:
                raise MalformedEventError(f"{where}: {REQUESTED!r} needs detail.secret")
            return [RotationRequest(self.source, ROTATE, event_id, secret=secret, token=token)]
        raise MalformedEventError(
            f"{where}: detail-type {kind!r} does not ask for rotation; expected {SCHEDULED!r} or {REQUESTED!r}"
        )

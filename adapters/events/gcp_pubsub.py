"""GCP Secret Manager notifications through Pub/Sub: a push delivery
`{"message": {"attributes": {...}, "data": base64, "messageId": ...}, "subscription": ...}`
or the message itself (a background function's event). `eventType: SECRET_ROTATE`
rotates the secret named by `secretId` (projects/P/secrets/NAME); the other Secret
Manager event types are acknowledged as "ignore" with the reason."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from keycell.control_plane.events import (
    IGNORE,
    ROTATE,
    MalformedEventError,
    RawEvent,
    RotationRequest,
    derived_token,
    require_obj,
    require_str,
)

SECRET_ID = re.compile(r"projects/[^/]+/secrets/(?P<name>[A-Za-z0-9_-]{1,255})\Z")
KNOWN = {
    "SECRET_CREATE",
    "SECRET_UPDATE",
    "SECRET_DELETE",
    "SECRET_VERSION_ADD",
    "SECRET_VERSION_ENABLE",
    "SECRET_VERSION_DISABLE",
    "SECRET_VERSION_DESTROY",
    "SECRET_VERSION_DESTROY_SCHEDULED",
    "SECRET_ROTATE",
}


class GcpPubSub:
    source = "gcp.pubsub"

    @staticmethod
    def _message(body: Any) -> Any:
        if not isinstance(body, Mapping):
            return None
        if "message" in body and ("subscription" in body or isinstance(body.get("message"), Mapping)):
            return body["message"]
        if "attributes" in body and ("messageId" in body or "message_id" in body or "data" in body):
            return body
        return None

    def claims(self, raw: RawEvent) -> bool:
        return self._message(raw.body) is not None

    def normalise(self, raw: RawEvent) -> list[RotationRequest]:
        message = self._message(raw.body)
        where = "Pub/Sub message"
        if not isinstance(message, Mapping):
            raise MalformedEventError(f"{where}: 'message' must be an object")
        attributes = require_obj(message, "attributes", where)
        event_id = message.get("messageId") or message.get("message_id")
        if not isinstance(event_id, str) or not event_id:
            raise MalformedEventError(f"{where}: 'messageId' must be a non-empty string")
        event_type = require_str(attributes, "eventType", where + " attributes")
        if event_type not in KNOWN:
            raise MalformedEventError(f"{where}: eventType {event_type!r} is not a Secret Manager event")
        secret_id = require_str(attributes, "secretId", where + " attributes")
        found = SECRET_ID.match(secret_id)
        if found is None:
            raise MalformedEventError(f"{where}: secretId is not projects/PROJECT/secrets/NAME")
        if event_type != "SECRET_ROTATE":
            return [
                RotationRequest(
                    self.source,
                    IGNORE,
                    event_id,
                    secret=found["name"],
                    detail={"reason": f"{event_type} does not ask for rotation"},
                )
            ]
        return [
            RotationRequest(
                self.source,
                ROTATE,
                event_id,
                secret=found["name"],
                token=derived_token(self.source, event_id),
                detail={"secret_id": secret_id},
            )
        ]

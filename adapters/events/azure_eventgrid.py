"""Azure Event Grid (Event Grid schema) deliveries: an array of events (one object is
accepted too). `Microsoft.KeyVault.SecretNearExpiry` and `...KeyNearExpiry` rotate the
object named by `data.ObjectName` (or the subject); Event Grid's
`Microsoft.EventGrid.SubscriptionValidationEvent` handshake is answered with its
validation code. Key Vault events in the CloudEvents schema go to the CloudEvents
normaliser, which reads the same types."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keycell.control_plane.events import (
    IGNORE,
    ROTATE,
    VALIDATE,
    MalformedEventError,
    RawEvent,
    RotationRequest,
    derived_token,
    require_obj,
    require_str,
)

NEAR_EXPIRY = ("Microsoft.KeyVault.SecretNearExpiry", "Microsoft.KeyVault.KeyNearExpiry")
VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
KEYVAULT_PREFIX = "Microsoft.KeyVault."


def keyvault_request(
    source: str, event_id: str, event_type: str, subject: str | None, data: Mapping[str, Any]
) -> RotationRequest:
    """Shared with the CloudEvents normaliser (Event Grid's CloudEvents schema)."""
    if event_type not in NEAR_EXPIRY:
        return RotationRequest(
            source, IGNORE, event_id, detail={"reason": f"{event_type} does not ask for rotation"}
        )
    name = data.get("ObjectName") or subject
    if not isinstance(name, str) or not name:
        raise MalformedEventError(f"{event_type}: no data.ObjectName or subject names the secret")
    kind = "key" if event_type.endswith("KeyNearExpiry") else "secret"
    detail = {
        "vault": data.get("VaultName"),
        "object_type": kind,
        "version": data.get("Version"),
        "expires": data.get("EXP"),
    }
    return RotationRequest(
        source, ROTATE, event_id, secret=name, token=derived_token(source, event_id), detail=detail
    )


class AzureEventGrid:
    source = "azure.eventgrid"

    @staticmethod
    def _events(body: Any) -> list[Any] | None:
        if isinstance(body, Mapping):
            return [body] if "eventType" in body else None
        if isinstance(body, list) and body and all(isinstance(e, Mapping) and "eventType" in e for e in body):
            return body
        return None

    def claims(self, raw: RawEvent) -> bool:
        return self._events(raw.body) is not None

    def normalise(self, raw: RawEvent) -> list[RotationRequest]:
        events = self._events(raw.body) or []
        out = []
        for index, event in enumerate(events):
            where = f"Event Grid event {index}"
            event_type = require_str(event, "eventType", where)
            event_id = require_str(event, "id", where)
            data = require_obj(event, "data", where)
            if event_type == VALIDATION:
                code = require_str(data, "validationCode", where)
                out.append(RotationRequest(self.source, VALIDATE, event_id, detail={"validation_code": code}))
            elif event_type.startswith(KEYVAULT_PREFIX):
                subject = event.get("subject")
                out.append(
                    keyvault_request(
                        self.source, event_id, event_type, subject if isinstance(subject, str) else None, data
                    )
                )
            else:
                raise MalformedEventError(f"{where}: eventType {event_type!r} is not a Key Vault event")
        return out

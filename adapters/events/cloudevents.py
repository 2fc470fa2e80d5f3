"""CloudEvents 1.0, structured mode (a JSON object with `specversion`, or any body with
Content-Type application/cloudevents+json) and binary mode (`ce-*` headers, the body
is the data). Types understood:

- `dev.keycell.rotation.requested`: rotate `data.secret` (or the `subject`);
- `dev.keycell.rotation.sweep`: sweep what is due (optional `data.prefix`);
- Key Vault's `Microsoft.KeyVault.SecretNearExpiry` / `KeyNearExpiry` (Event Grid's
  CloudEvents schema);
- `google.cloud.pubsub.topic.v1.messagePublished` (Eventarc) carrying a Secret Manager
  notification.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from keycell.adapters.events.azure_eventgrid import KEYVAULT_PREFIX, keyvault_request
from keycell.adapters.events.gcp_pubsub import GcpPubSub
from keycell.control_plane.events import (
    ROTATE,
    SWEEP,
    MalformedEventError,
    RawEvent,
    RotationRequest,
    derived_token,
    require_str,
)

REQUESTED = "dev.keycell.rotation.requested"
SWEEP_TYPE = "dev.keycell.rotation.sweep"
PUBSUB = "google.cloud.pubsub.topic.v1.messagePublished"
STRUCTURED = "application/cloudevents+json"


class CloudEvents:
    source = "cloudevents"

    def claims(self, raw: RawEvent) -> bool:
        if "ce-specversion" in raw.headers:
            return True
        if raw.headers.get("content-type", "").split(";")[0].strip() == STRUCTURED:
            return True
        return isinstance(raw.body, Mapping) and "specversion" in raw.body

    def _attributes(self, raw: RawEvent) -> tuple[dict[str, Any], Any]:
        if "ce-specversion" in raw.headers:
            attrs = {k[3:]: v for k, v in raw.headers.items() if k.startswith("ce-")}
            data = raw.body
            if isinstance(data, bytes | bytearray) and data:
                try:
                    data = json.loads(data)
                except ValueError:
                    raise MalformedEventError("CloudEvent (binary): the body is not JSON") from None
            return attrs, data
        body = raw.body
        if isinstance(body, bytes | bytearray):
            try:
                body = json.loads(body)
            except ValueError:
                raise MalformedEventError("CloudEvent (structured): the body is not JSON") from None
        if not isinstance(body, Mapping):
            raise MalformedEventError("CloudEvent (structured): the body must be a JSON object")
        attrs = {k: v for k, v in body.items() if k not in ("data", "data_base64")}
        return attrs, body.get("data")

    def normalise(self, raw: RawEvent) -> list[RotationRequest]:
        attrs, data = self._attributes(raw)
        where = "CloudEvent"
        version = require_str(attrs, "specversion", where)
        if version != "1.0":
            raise MalformedEventError(f"{where}: specversion {version!r} is not supported; send 1.0")
        event_id = require_str(attrs, "id", where)
        event_source = require_str(attrs, "source", where)
        event_type = require_str(attrs, "type", where)
        subject = attrs.get("subject") if isinstance(attrs.get("subject"), str) else None
        data = data if data is not None else {}
        if not isinstance(data, Mapping):
            raise MalformedEventError(f"{where}: data must be a JSON object")
        key = f"{event_source}\x00{event_id}"  # CloudEvents: source + id identify an event
        if event_type == REQUESTED:
            secret = data.get("secret") or subject
            if not isinstance(secret, str) or not secret:
                raise MalformedEventError(f"{where}: {REQUESTED} needs data.secret or a subject")
            return [
                RotationRequest(
                    self.source, ROTATE, event_id, secret=secret, token=derived_token(self.source, key)
                )
            ]
        if event_type == SWEEP_TYPE:
            prefix = data.get("prefix", "")
            if not isinstance(prefix, str):
                raise MalformedEventError(f"{where}: data.prefix must be a string")
            return [RotationRequest(self.source, SWEEP, event_id, detail={"prefix": prefix})]
        if event_type.startswith(KEYVAULT_PREFIX):
            request = keyvault_request(self.source, event_id, event_type, subject, data)
            if request.token is not None:
                request = RotationRequest(
                    request.source,
                    request.action,
                    event_id,
                    secret=request.secret,
                    token=derived_token(self.source, key),
                    detail=request.detail,
                )
            return [request]
        if event_type == PUBSUB:
            message = data.get("message")
            if not isinstance(message, Mapping):
                raise MalformedEventError(f"{where}: {PUBSUB} needs data.message")
            inner = GcpPubSub().normalise(
                RawEvent({"message": message, "subscription": data.get("subscription", "")})
            )
            return [
                RotationRequest(
                    self.source,
                    r.action,
                    event_id,
                    secret=r.secret,
                    token=None if r.token is None else derived_token(self.source, key),
                    detail=r.detail,
                )
                for r in inner
            ]
        raise MalformedEventError(f"{where}: type {event_type!r} does not ask for rotation")

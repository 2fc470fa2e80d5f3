"""The rotation function as a Chalice app: one handler, three ways in.

- `rotate` (a plain Lambda function): Secrets Manager rotation invocations, EventBridge
  rules targeting it, Pub/Sub or Event Grid events relayed by a Lambda. Errors raise,
  so the sender retries and, in the end, dead-letters: nothing is dropped silently.
- `sweep` (an EventBridge schedule, every minute): rotate what is due, with splay.
- `POST /events` (HTTP): Event Grid webhooks (the validation handshake included),
  Pub/Sub push subscriptions, CloudEvents in structured or binary mode. An unknown
  or malformed event answers 400 with Vault's error shape; the sender sees it.

Configuration comes from the environment (keycell.functions.wiring, and
keycell.functions.rotation.wiring for the targets).
"""

from __future__ import annotations

import json
from typing import Any

from chalice.app import Chalice, Rate, Response

from keycell.control_plane.errors import RequestError
from keycell.control_plane.events import RawEvent
from keycell.functions.rotation.handler import RotationContext, handle

app = Chalice(app_name="keycell-rotation")
_context: RotationContext | None = None

CONTENT_TYPES = [
    "application/json",
    "application/cloudevents+json",
    "application/octet-stream",
    "text/plain",
]


def configure(context: RotationContext | None) -> None:
    """Use this context (tests) instead of the environment's; None: back to the environment."""
    global _context
    _context = context


def context() -> RotationContext:
    global _context
    if _context is None:
        from keycell.functions.wiring import (
            audit_rotation_steps,
            auditor_from_environment,
            services_from_environment,
        )

        services = services_from_environment()
        auditor = auditor_from_environment(services)
        if auditor is not None:
            audit_rotation_steps(services, auditor)
        _context = RotationContext(services)
    return _context


@app.lambda_function(name="rotate")
def rotate(event: Any, _lambda_context: Any) -> dict[str, Any]:
    return handle(RawEvent(event), context())


@app.schedule(Rate(1, unit=Rate.MINUTES), name="sweep")
def scheduled(event: Any) -> dict[str, Any]:
    return handle(RawEvent(event.to_dict()), context())


@app.route("/events", methods=["POST"], content_types=CONTENT_TYPES)
def events() -> Response:
    request = app.current_request
    assert request is not None
    headers = {k.lower(): v for k, v in request.headers.items()}
    raw_body = request.raw_body or b""
    body: Any = raw_body
    if "ce-specversion" not in headers:  # binary CloudEvents keep their data as sent
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body
    try:
        result = handle(RawEvent(body, headers), context())
    except RequestError as exc:
        return Response(
            body=json.dumps({"errors": [exc.message]}),
            status_code=exc.status,
            headers={"Content-Type": "application/json"},
        )
    return Response(body=json.dumps(result), status_code=200, headers={"Content-Type": "application/json"})

"""The rotation function's work, framework-free: normalise the event, run the state
machine, say what was done. `app.py` adapts Lambda and HTTP deliveries to this.

- a Secrets Manager step runs that one step against Secrets Manager (the function is
  then a Secrets Manager rotation Lambda; failures raise, so Secrets Manager retries);
- "rotate" runs (or resumes) a whole rotation of a secret in the cell's own store, under
  the event's token, so a redelivered event rotates once;
- "sweep" rotates what is due in splay order and tidies expired leases (dropping
  expired database users);
- "validate" answers Event Grid's subscription handshake; "ignore" is reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keycell.adapters.events import NORMALISERS
from keycell.control_plane.errors import RequestError
from keycell.control_plane.events import IGNORE, ROTATE, STEP, SWEEP, VALIDATE, RawEvent, normalise
from keycell.control_plane.rotation import Rotator, sweep

log = logging.getLogger("keycell.rotation")


@dataclass
class RotationContext:
    services: Any  # CellServices: rotation_store, rotator, leases, clock
    secretsmanager: Callable[[], Rotator] | None = None  # built on first Secrets Manager event
    window: float = 60.0
    _sm: Rotator | None = field(default=None, repr=False)

    def sm_rotator(self) -> Rotator:
        if self._sm is None:
            if self.secretsmanager is None:
                from keycell.adapters.secretstores.aws_secretsmanager import SecretsManagerStore

                store = SecretsManagerStore(
                    endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                    region=os.environ.get("AWS_REGION")
                    or os.environ.get("AWS_DEFAULT_REGION")
                    or "us-east-1",
                )
                # The cell's step hook (the audit trail) follows Secrets Manager steps too.
                self._sm = Rotator(
                    store, self.services.rotator.targets, on_step=self.services.rotator.on_step
                )
            else:
                self._sm = self.secretsmanager()
        return self._sm


def handle(raw: RawEvent, ctx: RotationContext) -> dict[str, Any]:
    """Raises EventError (unknown / malformed) and the state machine's errors, each
    logged here by type (the event itself is logged by the normaliser)."""
    try:
        return _handle(raw, ctx)
    except RequestError as exc:
        log.warning("rotation event failed: %s: %s", type(exc).__name__, exc.message)
        raise


def _handle(raw: RawEvent, ctx: RotationContext) -> dict[str, Any]:
    services = ctx.services
    services.ensure_unsealed()
    results: list[dict[str, Any]] = []
    for request in normalise(raw, NORMALISERS):
        outcome: dict[str, Any] = {
            "event_id": request.event_id,
            "source": request.source,
            "action": request.action,
        }
        if request.action == VALIDATE:
            return {"validationResponse": request.detail["validation_code"]}
        if request.action == STEP:
            assert request.secret is not None and request.step is not None and request.token is not None
            ctx.sm_rotator().run_step(request.secret, request.step, request.token)
            outcome.update(secret=request.secret, step=request.step.value, outcome="done")
        elif request.action == ROTATE:
            assert request.secret is not None
            result = services.rotator.rotate(request.secret, request.token)
            outcome.update(result.to_dict())
        elif request.action == SWEEP:
            prefix = str(request.detail.get("prefix", ""))
            report = sweep(
                services.rotator,
                services.rotation_store,
                services.clock(),
                window=ctx.window,
                prefix=prefix,
                full=request.detail.get("full") is True,
            )
            outcome.update(report.to_dict())
            outcome["leases_tidied"] = services.leases.tidy_expired()
            outcome["revocations_retried"] = services.database.retry_revocations()
        elif request.action == IGNORE:
            log.info("rotation event %s ignored: %s", request.event_id, request.detail.get("reason"))
            outcome.update(secret=request.secret, outcome="ignored", reason=request.detail.get("reason"))
        results.append(outcome)
    return {"results": results}

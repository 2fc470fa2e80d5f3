"""AWS Secrets Manager rotation events: the Lambda invocation Secrets Manager makes
for each step, `{"Step": "createSecret", "SecretId": ARN, "ClientRequestToken": T}`
(newer invocations also carry `RotationToken`, which is passed through unused)."""

from __future__ import annotations

from collections.abc import Mapping

from keycell.control_plane.events import STEP, MalformedEventError, RawEvent, RotationRequest, require_str
from keycell.control_plane.rotation import Step

_KEYS = ("Step", "SecretId", "ClientRequestToken")


class SecretsManagerRotation:
    source = "aws.secretsmanager"

    def claims(self, raw: RawEvent) -> bool:
        return isinstance(raw.body, Mapping) and any(k in raw.body for k in _KEYS)

    def normalise(self, raw: RawEvent) -> list[RotationRequest]:
        body = raw.body
        where = "Secrets Manager rotation event"
        step_name = require_str(body, "Step", where)
        try:
            step = Step(step_name)
        except ValueError:
            raise MalformedEventError(
                f"{where}: unknown Step {step_name!r}; expected one of {[s.value for s in Step]}"
            ) from None
        secret = require_str(body, "SecretId", where)
        token = require_str(body, "ClientRequestToken", where)
        if len(token) > 128 or "/" in token or "#" in token:
            raise MalformedEventError(f"{where}: ClientRequestToken is not a valid token")
        return [RotationRequest(self.source, STEP, token, secret=secret, token=token, step=step)]

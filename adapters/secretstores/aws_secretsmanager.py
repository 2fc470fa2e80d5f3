"""AWS Secrets Manager as the rotation state machine's version store, so the rotation
function works as a real Secrets Manager rotation Lambda.

Stages are Secrets Manager's staging labels: CURRENT = AWSCURRENT, PENDING =
AWSPENDING (on a version that is not also AWSCURRENT), PREVIOUS = AWSPREVIOUS. The
request token is the version id, as Secrets Manager makes it. Promotion moves
AWSCURRENT to the new version with one `UpdateSecretVersionStage` call (Secrets
Manager itself moves AWSPREVIOUS to the version that lost AWSCURRENT), then removes
AWSPENDING from it. Secrets Manager drives the steps and retries them, so progress
is not recorded here, and a new token supersedes an abandoned pending version (the
service decides which rotation is in flight).

Which target the secret's credentials live on: the secret's tag `keycell:target`
(default: the store's `default_target`); its params: the tag `keycell:params` (JSON).
"""

from __future__ import annotations

import json
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from keycell.control_plane.errors import NotFound, Unavailable
from keycell.control_plane.rotation import RotationError, SecretState, Value

CURRENT, PENDING, PREVIOUS = "AWSCURRENT", "AWSPENDING", "AWSPREVIOUS"
TARGET_TAG, PARAMS_TAG = "keycell:target", "keycell:params"


def _code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


class SecretsManagerStore:
    supersedes_pending = True

    def __init__(
        self, *, endpoint_url: str | None = None, region: str = "us-east-1", default_target: str = "generic"
    ) -> None:
        self.client = boto3.client("secretsmanager", endpoint_url=endpoint_url, region_name=region)
        self.default_target = default_target

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":
                raise NotFound(f"Secrets Manager has no {what}") from None
            raise Unavailable(f"Secrets Manager refused {what} ({_code(exc)})") from None
        except BotoCoreError as exc:
            raise Unavailable(f"Secrets Manager unreachable for {what} ({type(exc).__name__})") from None

    def state(self, name: str) -> SecretState:
        described = self._call("secret " + repr(name), self.client.describe_secret, SecretId=name)
        stages: dict[str, list[str]] = described.get("VersionIdsToStages", {})
        by_label = {label: vid for vid, labels in stages.items() for label in labels}
        current = by_label.get(CURRENT)
        pending = by_label.get(PENDING)
        if pending == current:
            pending = None
        tags = {t["Key"]: t["Value"] for t in described.get("Tags", [])}
        try:
            params = json.loads(tags.get(PARAMS_TAG, "{}"))
        except ValueError:
            raise RotationError(f"the {PARAMS_TAG} tag of {name!r} is not JSON") from None
        return SecretState(
            name=name,
            target=tags.get(TARGET_TAG, self.default_target),
            params=params if isinstance(params, dict) else {},
            current=current,
            previous=by_label.get(PREVIOUS),
            pending=pending,
            in_flight=pending,
            progress=None,
        )

    def value(self, name: str, version: str) -> Value:
        found = self._call(
            "version of " + repr(name), self.client.get_secret_value, SecretId=name, VersionId=version
        )
        try:
            value = json.loads(found["SecretString"])
        except (KeyError, ValueError):
            raise RotationError(f"a version of {name!r} is not a JSON SecretString") from None
        if not isinstance(value, dict):
            raise RotationError(f"a version of {name!r} is not a JSON object")
        return value

    def put_pending(self, name: str, token: str, value: Value) -> None:
        # Idempotent in Secrets Manager itself: the same token and value is a no-op.
        self._call(
            "the pending version of " + repr(name),
            self.client.put_secret_value,
            SecretId=name,
            ClientRequestToken=token,
            SecretString=json.dumps(value, separators=(",", ":"), sort_keys=True),
            VersionStages=[PENDING],
        )

    def record(self, name: str, token: str, progress: str) -> None:
        return None  # Secrets Manager drives and retries the steps itself

    def promote(self, name: str, token: str) -> None:
        state = self.state(name)
        if state.current == token:
            return
        kwargs: dict[str, Any] = {"SecretId": name, "VersionStage": CURRENT, "MoveToVersionId": token}
        if state.current is not None:
            kwargs["RemoveFromVersionId"] = state.current
        self._call("promoting a version of " + repr(name), self.client.update_secret_version_stage, **kwargs)
        self.complete(name, token)

    def complete(self, name: str, token: str) -> None:
        described = self._call("secret " + repr(name), self.client.describe_secret, SecretId=name)
        if PENDING in described.get("VersionIdsToStages", {}).get(token, []):
            self._call(
                "clearing AWSPENDING of " + repr(name),
                self.client.update_secret_version_stage,
                SecretId=name,
                VersionStage=PENDING,
                RemoveFromVersionId=token,
            )

"""AWS IAM access keys: create, test, deactivate the old, delete the one before.

IAM allows two access keys per user. A rotation mints the new key in `generate`
(IAM, not Keycell, chooses its secret), first deleting every key of the user that is
not CURRENT: the one before (deactivated by the last rotation) and any key a crashed
attempt minted but never stored. `verify` signs a request with the new key
(sts:GetCallerIdentity) and checks whose it is; after promotion `retire`
deactivates the replaced key. `revoke` deactivates a key at once.

Params: `user` (the IAM user name). Values: {"user", "access_key_id", "secret_access_key"}.
Real IAM is eventually consistent: a fresh key can take seconds to work, so `verify`
retries for up to `consistency_wait` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from keycell.control_plane.rotation import TargetError, TargetParamsError, Value


def _error(what: str, exc: BaseException) -> TargetError:
    code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
    return TargetError(f"{what} failed ({type(exc).__name__}{': ' + code if code else ''})")


class AwsIamTarget:
    kind = "aws_iam"

    def __init__(
        self, *, endpoint_url: str | None = None, region: str = "us-east-1", consistency_wait: float = 10.0
    ) -> None:
        self.endpoint_url = endpoint_url
        self.region = region
        self.consistency_wait = consistency_wait
        self.iam = boto3.client("iam", endpoint_url=endpoint_url, region_name=region)

    @staticmethod
    def _user(params: Mapping[str, Any]) -> str:
        user = params.get("user")
        if not isinstance(user, str) or not user:
            raise TargetParamsError("an aws_iam secret needs params.user (the IAM user name)")
        return user

    def keys(self, user: str) -> dict[str, str]:
        """Access key id -> status."""
        try:
            listed = self.iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
        except (ClientError, BotoCoreError) as exc:
            raise _error(f"listing the access keys of {user!r}", exc) from None
        return {k["AccessKeyId"]: k["Status"] for k in listed}

    def generate(self, params: Mapping[str, Any], current: Value | None, previous: Value | None) -> Value:
        user = self._user(params)
        keep = None if current is None else current.get("access_key_id")
        try:
            for key_id in self.keys(user):
                if key_id != keep:
                    self.iam.delete_access_key(UserName=user, AccessKeyId=key_id)
            made = self.iam.create_access_key(UserName=user)["AccessKey"]
        except (ClientError, BotoCoreError) as exc:
            raise _error(f"making an access key for {user!r}", exc) from None
        return {
            "user": user,
            "access_key_id": made["AccessKeyId"],
            "secret_access_key": made["SecretAccessKey"],
        }

    def apply(self, params: Mapping[str, Any], pending: Value, current: Value | None) -> None:
        self._set_status(str(pending["user"]), str(pending["access_key_id"]), "Active")

    def verify(self, params: Mapping[str, Any], pending: Value) -> None:
        user = str(pending["user"])
        sts = boto3.client(
            "sts",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=str(pending["access_key_id"]),
            aws_secret_access_key=str(pending["secret_access_key"]),
            aws_session_token=None,
        )
        deadline = time.monotonic() + self.consistency_wait
        while True:
            try:
                arn = str(sts.get_caller_identity()["Arn"])
                break
            except (ClientError, BotoCoreError) as exc:
                if time.monotonic() >= deadline:
                    raise _error(f"signing in with the new key of {user!r}", exc) from None
                time.sleep(0.5)
        if not arn.endswith(f":user/{user}"):
            raise TargetError(f"the new key signs in, but not as IAM user {user!r}")
        if self.keys(user).get(str(pending["access_key_id"])) != "Active":
            raise TargetError(f"the new key of {user!r} is not active")

    def retire(self, params: Mapping[str, Any], current: Value, previous: Value | None) -> None:
        if previous is not None and previous.get("access_key_id") != current.get("access_key_id"):
            self._set_status(str(previous["user"]), str(previous["access_key_id"]), "Inactive")

    def revoke(self, params: Mapping[str, Any], value: Value) -> None:
        self._set_status(str(value["user"]), str(value["access_key_id"]), "Inactive")

    def _set_status(self, user: str, key_id: str, status: str) -> None:
        try:
            self.iam.update_access_key(UserName=user, AccessKeyId=key_id, Status=status)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchEntity" and status == "Inactive":
                return  # already deleted: nothing left to deactivate
            raise _error(f"marking a key of {user!r} {status}", exc) from None
        except BotoCoreError as exc:
            raise _error(f"marking a key of {user!r} {status}", exc) from None

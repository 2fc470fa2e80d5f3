"""The S3 audit sink: each batch of entries one object, under S3 Object Lock.

Objects are named `PREFIX/CELL/WRITER/<first seq>-<last seq>.jsonl` (zero-padded, so
a listing is in chain order) and written with a retention date (COMPLIANCE mode by
default: nobody, root included, can overwrite or delete them before it passes). The
bucket must have been created with object lock enabled; `check_bucket` says so
clearly when it was not.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3


class S3Sink:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        retention_days: int = 365,
        mode: str = "COMPLIANCE",
        client: Any = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.name = "s3"
        self.local = False  # a PUT over the network
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retention = timedelta(days=retention_days)
        self.mode = mode
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)

    def check_bucket(self) -> None:
        """Raise ValueError unless the bucket has object lock enabled."""
        config = self.client.get_object_lock_configuration(Bucket=self.bucket)
        enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        if enabled != "Enabled":
            raise ValueError(
                f"bucket {self.bucket!r} has no object lock; create it with ObjectLockEnabledForBucket"
            )

    def lock(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def object_key(self, entries: Sequence[Mapping[str, Any]]) -> str:
        first, last = entries[0], entries[-1]
        name = f"{first['cell']}/{first['writer']}/{int(first['seq']):020d}-{int(last['seq']):020d}.jsonl"
        return f"{self.prefix}/{name}" if self.prefix else name

    def write(self, lines: bytes, entries: Sequence[Mapping[str, Any]]) -> None:
        if not entries:
            return
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.object_key(entries),
            Body=lines,
            ContentType="application/x-ndjson",
            ContentMD5=base64.b64encode(hashlib.md5(lines).digest()).decode(),  # noqa: S324 - S3's integrity check
            ObjectLockMode=self.mode,
            ObjectLockRetainUntilDate=datetime.now(UTC) + self.retention,
        )

    def close(self) -> None:
        pass

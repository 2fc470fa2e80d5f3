"""The S3 audit sink on the session's moto server: one object per batch, under object
lock retention, holding the chain's lines."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import boto3
import pytest

from keycell.adapters.audit.s3 import S3Sink
from keycell.control_plane.audit import Auditor, entry_hash
from tests.audit.conftest import CELL, call, open_router


def test_entries_land_in_s3_under_object_lock(tmp_path: Path, aws_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=aws_endpoint)
    bucket = f"keycell-audit-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    sink = S3Sink(bucket, "trail", retention_days=30, client=s3)
    sink.check_bucket()
    router = open_router(tmp_path, None)
    services = router.services
    router.auditor = Auditor(services.ledger, services.barrier, CELL, [sink])
    assert call(router, "POST", "secret/data/s3", {"data": {"v": "canary-s3-value"}}).status == 200
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"trail/{CELL}/")["Contents"]
    assert len(listed) == 2  # the request entry, then the response entry: one batch each
    entries = []
    for obj in sorted(listed, key=lambda o: o["Key"]):
        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
        entries += [json.loads(line) for line in body.splitlines()]
        head = s3.head_object(Bucket=bucket, Key=obj["Key"])
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"].timestamp() > time.time() + 29 * 86400
    assert [e["type"] for e in entries] == ["request", "response"]
    assert entries[1]["prev"] == entries[0]["hash"] == entry_hash(entries[0])
    assert "canary-s3-value" not in json.dumps(entries)


def test_a_bucket_without_object_lock_is_refused(aws_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=aws_endpoint)
    bucket = f"keycell-plain-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    with pytest.raises(Exception, match=r"object lock|ObjectLock"):
        S3Sink(bucket, client=s3).check_bucket()

"""An instance's EC2 tags, for AWS instance identity attestation (`aws_iid:tag:KEY:VALUE`).

The identity document says which instance is asking but carries no tags; the cell
reads them from EC2 (DescribeTags) in the document's region, with the cell's own AWS
credentials. `endpoint_url` points at a moto server or LocalStack in tests.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from keycell.control_plane.errors import PermissionDenied


class Ec2InstanceTags:
    def __init__(self, *, endpoint_url: str | None = None) -> None:
        self.endpoint_url = endpoint_url
        self._clients: dict[str, Any] = {}

    def __call__(self, region: str, instance_id: str) -> dict[str, str]:
        client = self._clients.get(region)
        if client is None:
            client = self._clients[region] = boto3.client(
                "ec2", region_name=region, endpoint_url=self.endpoint_url
            )
        try:
            pages = client.get_paginator("describe_tags").paginate(
                Filters=[{"Name": "resource-id", "Values": [instance_id]}]
            )
            return {t["Key"]: t["Value"] for page in pages for t in page["Tags"]}
        except (BotoCoreError, ClientError) as exc:
            raise PermissionDenied(
                f"the instance's tags could not be read from EC2 ({type(exc).__name__})"
            ) from None

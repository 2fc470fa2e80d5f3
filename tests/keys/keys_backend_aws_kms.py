"""Wiring of the aws_kms backend for the key-custody suites: the real boto3 client
over HTTP to the session's moto server (or whatever AWS_ENDPOINT_URL names)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keycell.adapters.keys.aws_kms import AwsKmsKeyBackend
from keycell.testing.key_backends import aws_kms_backend

REGION = "us-east-1"


@contextmanager
def open_backend(request: pytest.FixtureRequest, *, fips_mode: bool) -> Iterator[AwsKmsKeyBackend]:
    endpoint = request.getfixturevalue("aws_endpoint")
    backend = aws_kms_backend(endpoint, fips_mode=fips_mode)
    try:
        yield backend
    finally:
        backend.close()

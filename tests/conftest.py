"""Session-wide real components: a moto server over HTTP (or whatever
AWS_ENDPOINT_URL names, such as a LocalStack)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from keycell.testing.moto_server import FAKE_AWS_ENV, MotoServer


@pytest.fixture(scope="session")
def aws_endpoint() -> Iterator[str]:
    """The AWS endpoint the AWS-backed suites talk to, with fake credentials set."""
    saved = {k: os.environ.get(k) for k in FAKE_AWS_ENV}
    external = os.environ.get("AWS_ENDPOINT_URL")
    for k, v in FAKE_AWS_ENV.items():
        os.environ.setdefault(k, v)
    try:
        if external:
            yield external
        else:
            with MotoServer() as moto:
                yield moto.endpoint_url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

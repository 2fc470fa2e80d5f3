"""Rotation's real parts: credential targets built against the session's PostgreSQL
(tests/conftest.py) and against moto's IAM, and a cell's ledger store with real
envelopes."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import psycopg
import pytest

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.targets.aws_iam import AwsIamTarget
from keycell.adapters.targets.generic import GenericTarget, conforms
from keycell.adapters.targets.postgres import PostgresTarget, user_dsn
from keycell.control_plane.envelope import Envelopes
from keycell.control_plane.keys import KeySpec
from keycell.control_plane.rotation import CredentialTarget, LedgerVersionStore, Value
from keycell.testing.cells import Cell
from keycell.testing.postgres import PostgresServer

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}_{next(_names)}_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def pg_target(postgres: PostgresServer) -> Iterator[PostgresTarget]:
    target = PostgresTarget(postgres.dsn())
    yield target
    target.close()


def pg_login_works(value: Value) -> bool:
    try:
        with psycopg.connect(
            user_dsn(value["host"], value["port"], value["dbname"], value["username"], value["password"])
        ) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


@dataclass
class TargetCase:
    """A target, params for a fresh credential on it, and a probe: does a value work?"""

    name: str
    target: CredentialTarget
    make_params: Callable[[], dict[str, Any]]
    works: Callable[[Value], bool]
    revocable: bool  # a credential outside Keycell that revoke can stop


TARGETS = ["generic", "postgres", "aws_iam"]


@pytest.fixture(params=TARGETS)
def target_case(request: pytest.FixtureRequest) -> TargetCase:
    kind = request.param
    if kind == "generic":
        params = {"length": 24, "symbols": True}
        return TargetCase(
            kind,
            GenericTarget(),
            lambda: dict(params),
            lambda v: isinstance(v.get("password"), str) and conforms(v["password"], params),
            False,
        )
    if kind == "postgres":
        target = request.getfixturevalue("pg_target")
        return TargetCase(kind, target, lambda: {"username": unique("app")}, pg_login_works, True)
    endpoint = request.getfixturevalue("aws_endpoint")
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")

    def make_user() -> dict[str, Any]:
        user = unique("svc")
        iam.create_user(UserName=user)
        return {"user": user}

    def key_works(value: Value) -> bool:
        # moto does not authenticate requests, so a key "works" when IAM lists it Active.
        keys = iam.list_access_keys(UserName=value["user"])["AccessKeyMetadata"]
        return any(k["AccessKeyId"] == value["access_key_id"] and k["Status"] == "Active" for k in keys)

    return TargetCase(kind, AwsIamTarget(endpoint_url=endpoint), make_user, key_works, True)


@pytest.fixture
def envelopes() -> Envelopes:
    backend = SoftwareKeyBackend()
    backend.create_key("cell-kek", KeySpec.AES_256)
    return Envelopes("local", backend, "cell-kek")


@pytest.fixture
def store(sqlite_cell: Cell, envelopes: Envelopes) -> LedgerVersionStore:
    """The cell's own version store on a sqlite ledger (`any_store`: every ledger adapter)."""
    return LedgerVersionStore(sqlite_cell.barrier, envelopes)


@pytest.fixture
def any_store(cell: Cell, envelopes: Envelopes) -> LedgerVersionStore:
    return LedgerVersionStore(cell.barrier, envelopes)

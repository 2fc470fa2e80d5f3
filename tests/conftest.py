"""Session-wide real components and the `ledger` fixture.

- `aws_endpoint`: a moto server over HTTP (or whatever AWS_ENDPOINT_URL names, such
  as a LocalStack), with fake credentials in the environment.
- `softhsm`: one SoftHSM2 token for the whole session.
- `ledger` / `make_ledger`: a fresh ledger on each adapter (sqlite file, DynamoDB
  table on the AWS endpoint); tests using them run once per adapter.
- `postgres`: one real PostgreSQL server for the session (initdb in a temp folder).
- `sqlite_cell`: a cell on a fresh SQLite ledger file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keycell.adapters.ledgers.dynamodb import DynamoLedger
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.ledger import Ledger
from keycell.testing.cells import Cell, open_cell
from keycell.testing.clock import ManualClock
from keycell.testing.moto_server import FAKE_AWS_ENV, MotoServer
from keycell.testing.postgres import PostgresServer
from keycell.testing.softhsm import SoftHsmToken, create_token


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsmToken]:
    """The session's one SoftHSM2 token. SoftHSM2 lists its tokens once per process, so
    every suite shares this token (key names keep tests apart)."""
    token = create_token(label="keycell-tests")
    yield token
    token.close()


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


ADAPTERS = ["sqlite", "dynamodb"]


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_ledger(
    adapter: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], Ledger]]:
    """Opens another handle on the same fresh ledger each time it is called."""
    opened: list[Ledger] = []
    if adapter == "sqlite":
        path = tmp_path / "cell.db"

        def make() -> Ledger:
            ledger = SqliteLedger(path)
            opened.append(ledger)
            return ledger
    else:
        endpoint = request.getfixturevalue("aws_endpoint")
        table = f"keycell-test-{uuid.uuid4().hex[:12]}"
        owner = DynamoLedger(table, endpoint_url=endpoint, create=True)
        request.addfinalizer(lambda: owner.model.delete_table(wait=False))

        def make() -> Ledger:
            ledger = DynamoLedger(table, endpoint_url=endpoint)
            opened.append(ledger)
            return ledger

    yield make
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(make_ledger: Callable[[], Ledger]) -> Ledger:
    return make_ledger()


@pytest.fixture
def cell(ledger: Ledger) -> Cell:
    """An initialized, unsealed cell (Shamir 3/2) over `ledger`: its barrier is the
    plaintext view engines use."""
    return open_cell(ledger)


@pytest.fixture
def clock() -> ManualClock:
    """A clock the test moves by hand, for engines that take `clock=`."""
    return ManualClock()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def sqlite_cell(tmp_path: Path) -> Iterator[Cell]:
    ledger = SqliteLedger(tmp_path / "cell.db")
    yield open_cell(ledger)
    ledger.close()

"""One fixture, `ledger`, that runs every ledger test against each adapter."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keycell.adapters.ledgers.dynamodb import DynamoLedger
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.ledger import Ledger

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

"""The DynamoDB ledger's shared requests, against a moto server over HTTP: writers
released together send their conditional writes in shared TransactWriteItems
requests, and each hears exactly its own outcome (a conflict cancels only its own
writer's part: the others go again without it)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from keycell.adapters.ledgers.dynamodb import DynamoLedger
from keycell.control_plane.ledger import Check, ConflictError, Key, Kind, Put, TransactionConflictError

WRITERS = 24


@pytest.fixture
def dynamo(aws_endpoint: str) -> Iterator[DynamoLedger]:
    ledger = DynamoLedger(f"keycell-test-{uuid.uuid4().hex[:12]}", endpoint_url=aws_endpoint, create=True)
    yield ledger
    ledger.model.delete_table(wait=False)


def released_together(calls: list[Callable[[], Any]]) -> list[tuple[str, Any]]:
    outcomes: list[tuple[str, Any]] = [("pending", None)] * len(calls)
    gate = threading.Barrier(len(calls))

    def run(index: int) -> None:
        gate.wait(timeout=30)
        try:
            outcomes[index] = ("ok", calls[index]())
        except Exception as exc:
            outcomes[index] = ("error", exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return outcomes


def test_racing_creates_share_requests_and_each_writer_sees_its_own_outcome(dynamo: DynamoLedger) -> None:
    keys = [Key(Kind.SECRET_META, f"race/{n}") for n in range(6)]
    guard = Key(Kind.SECRET_META, "race/guard")
    untouched = Key(Kind.SECRET_META, "race/never-written")
    dynamo.put_if(guard, b"g", 0)

    def create(key: Key, value: bytes) -> Callable[[], Any]:
        return lambda: dynamo.put_if(key, value, 0)

    calls = [create(keys[n % len(keys)], f"w{n}".encode()) for n in range(WRITERS - 1)]
    # a transaction whose own check fails (the guard is at 1, not 5): only it is refused
    calls.append(lambda: dynamo.transact([Put(untouched, b"x", 0), Check(guard, 5)]))
    before = dynamo.requests_sent
    outcomes = released_together(calls)

    refused = outcomes[-1]
    assert refused[0] == "error" and isinstance(refused[1], TransactionConflictError)
    assert refused[1].index == 1 and refused[1].current_version == 1
    assert dynamo.get(untouched) is None
    for key in keys:
        mine = [outcomes[n] for n in range(WRITERS - 1) if n % len(keys) == keys.index(key)]
        won = [result for kind, result in mine if kind == "ok"]
        lost = [error for kind, error in mine if kind == "error"]
        assert len(won) == 1, f"exactly one create of {key.path} wins"
        assert all(isinstance(e, ConflictError) and e.key == key and e.current_version == 1 for e in lost)
        stored = dynamo.get(key)
        assert stored is not None and stored.value == won[0].value and stored.version == 1
    assert dynamo.requests_sent - before < WRITERS, "writers released together share requests"

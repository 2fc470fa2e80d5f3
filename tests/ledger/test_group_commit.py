"""Group commit in the SQLite ledger: writers that queue together share one
transaction (one fsync), and each one is told exactly its own outcome, with the
conditional-write semantics of a writer alone. The tests hold the ledger's writer
lock (its flock) from outside while the writers queue, so that they all land in one
batch for certain, then let go."""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.ledger import (
    Check,
    ConflictError,
    Key,
    Kind,
    Put,
    TransactionConflictError,
)
from keycell.testing.linearizability import Operation, check


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SqliteLedger]:
    opened = SqliteLedger(tmp_path / "cell.db")
    yield opened
    opened.close()


class HeldLock:
    """The ledger's writer lock, taken through a file description of our own (an
    flock excludes other descriptions, in this process too)."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self.fd = os.open(f"{ledger.path}.writers", os.O_RDWR)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def run_in_one_batch(ledger: SqliteLedger, calls: list[Callable[[], Any]]) -> list[tuple[str, Any]]:
    """Each call on its own thread, all queued behind the held lock before it is let go;
    returns each call's ("ok", result) or ("error", exception), in the calls' order."""
    held = HeldLock(ledger)
    outcomes: list[tuple[str, Any]] = [("pending", None)] * len(calls)

    def run(index: int) -> None:
        try:
            outcomes[index] = ("ok", calls[index]())
        except Exception as exc:
            outcomes[index] = ("error", exc)

    before = ledger.committed_batches
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        # One leader waits for the lock; every other writer waits in the queue behind it.
        while ledger.queued() < len(calls) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ledger.queued() == len(calls), "the writers should all be queued behind the lock"
        assert all(outcome[0] == "pending" for outcome in outcomes), "nobody is answered before the commit"
    finally:
        held.release()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert ledger.committed_batches == before + 1, "the queued writers share one commit"
    return outcomes


def test_queued_writers_share_one_commit_and_each_sees_its_own_outcome(ledger: SqliteLedger) -> None:
    keys = [Key(Kind.SECRET_META, f"race/{n}") for n in range(8)]
    # Four writers race to create each key: in the batch, the first wins, the others
    # conflict with the winner's version, exactly as if they had written one by one.
    calls: list[Callable[[], Any]] = []
    expected_value: dict[Key, bytes] = {}
    for round_ in range(4):
        for key in keys:
            value = f"{key.path}:{round_}".encode()
            calls.append(lambda key=key, value=value: ledger.put_if(key, value, 0))
            expected_value.setdefault(key, value)  # the first queued writer per key wins
    outcomes = run_in_one_batch(ledger, calls)

    winners = [result for kind, result in outcomes if kind == "ok"]
    losers = [error for kind, error in outcomes if kind == "error"]
    assert len(winners) == len(keys) and len(losers) == 3 * len(keys)
    assert all(isinstance(error, ConflictError) and error.current_version == 1 for error in losers)
    for item in winners:
        stored = ledger.get(item.key)
        assert stored is not None and stored.value == item.value and stored.version == 1
    # each key's winner is one of the writers that raced for it, and each loser's
    # conflict names its own key
    assert {item.key for item in winners} == set(keys)
    assert sorted(error.key.path for error in losers) == sorted([k.path for k in keys] * 3)


def test_a_conflicting_transaction_in_a_batch_leaves_the_others_committed(ledger: SqliteLedger) -> None:
    a, b, c = (Key(Kind.SECRET_META, f"mixed/{n}") for n in "abc")
    ledger.put_if(a, b"a1", 0)
    ledger.put_if(c, b"c1", 0)
    outcomes = run_in_one_batch(
        ledger,
        [
            lambda: ledger.put_if(a, b"a2", 1),  # ok: a is at 1
            lambda: ledger.transact([Put(b, b"b1", 0), Check(a, 1)]),  # a moved to 2 first: conflict
            lambda: ledger.transact([Put(b, b"b1-other", 0), Check(a, 2)]),  # ok
            lambda: ledger.delete_if(c, 1),  # ok
            lambda: ledger.delete_if(c, 1),  # c is gone: conflict
        ],
    )
    assert outcomes[0][0] == "ok" and outcomes[0][1].version == 2
    assert outcomes[1][0] == "error" and isinstance(outcomes[1][1], TransactionConflictError)
    assert outcomes[1][1].index == 1 and outcomes[1][1].current_version == 2
    assert outcomes[2][0] == "ok"
    assert outcomes[3] == ("ok", None)
    assert outcomes[4][0] == "error" and isinstance(outcomes[4][1], ConflictError)
    assert ledger.get(a).value == b"a2"  # type: ignore[union-attr]
    assert ledger.get(b).value == b"b1-other"  # type: ignore[union-attr]
    assert ledger.get(c) is None


def test_writers_in_a_batch_see_only_committed_reads_until_the_commit(ledger: SqliteLedger) -> None:
    key = Key(Kind.SECRET_META, "visible/after-commit")
    held = HeldLock(ledger)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (ledger.put_if(key, b"v", 0), done.set()))
    try:
        thread.start()
        deadline = time.monotonic() + 10
        while ledger.queued() < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ledger.get(key) is None and not done.is_set()
    finally:
        held.release()
    thread.join(timeout=10)
    assert done.is_set() and ledger.get(key).value == b"v"  # type: ignore[union-attr]


# --- linearizability over a mixed workload ---------------------------------------------------------

KEYS = (Key(Kind.ROTATION, "mixed/x"), Key(Kind.ROTATION, "mixed/y"))
THREADS = 12
OPS_PER_THREAD = 24


class TwoRegisters:
    """Two versioned registers (version, value); a delete puts a register back at
    (0, None); a transaction writes both at once, conditional on both versions."""

    def init(self) -> tuple[tuple[int, Any], tuple[int, Any]]:
        return ((0, None), (0, None))

    def step(self, state: Any, input: tuple[Any, ...], output: tuple[Any, ...]) -> Any:
        op = input[0]
        if op == "read":
            return state if state[input[1]] == output else None
        if op == "cas":
            _, k, expected, value = input
            version = state[k][0]
            if output[0] == "ok":
                return _set(state, k, (expected + 1, value)) if version == expected == output[1] - 1 else None
            return state if version != expected and output[1] == version else None
        if op == "delete":
            _, k, expected = input
            version = state[k][0]
            if output[0] == "ok":
                return _set(state, k, (0, None)) if version == expected != 0 else None
            return state if (version != expected or expected == 0) and output[1] == version else None
        if op == "both":
            _, ex, ey, value = input
            if output[0] == "ok":
                if (state[0][0], state[1][0]) != (ex, ey):
                    return None
                return ((ex + 1, value), (ey + 1, value))
            index, current = output[1], output[2]
            # the first op whose check fails is the one reported
            first = 0 if state[0][0] != ex else 1 if state[1][0] != ey else None
            return state if first == index and state[index][0] == current else None
        raise ValueError(f"unknown operation {input!r}")


def _set(state: Any, k: int, register: tuple[int, Any]) -> Any:
    return (register, state[1]) if k == 0 else (state[0], register)


def mixed_worker(ledger: SqliteLedger, worker: int, start_at: int, seed: int) -> list[Operation]:
    rng = random.Random(seed)
    while time.monotonic_ns() < start_at:
        time.sleep(0.0005)
    history: list[Operation] = []
    for n in range(OPS_PER_THREAD):
        k = rng.randrange(2)
        call = time.monotonic_ns()
        item = ledger.get(KEYS[k])
        seen = (0, None) if item is None else (item.version, item.value)
        history.append(Operation(worker, call, time.monotonic_ns(), ("read", k), seen))
        value = f"w{worker}-{n}".encode()
        choice = rng.random()
        call = time.monotonic_ns()
        if choice < 0.6:
            try:
                out: tuple[Any, ...] = ("ok", ledger.put_if(KEYS[k], value, seen[0]).version)
            except ConflictError as exc:
                out = ("fail", exc.current_version)
            op: tuple[Any, ...] = ("cas", k, seen[0], value)
        elif choice < 0.75:
            try:
                ledger.delete_if(KEYS[k], seen[0])
                out = ("ok",)
            except ConflictError as exc:
                out = ("fail", exc.current_version)
            op = ("delete", k, seen[0])
        else:
            other = ledger.get(KEYS[1 - k])
            versions = [seen[0], 0 if other is None else other.version]
            if k == 1:
                versions.reverse()
            try:
                ledger.transact([Put(KEYS[0], value, versions[0]), Put(KEYS[1], value, versions[1])])
                out = ("ok",)
            except TransactionConflictError as exc:
                out = ("fail", exc.index, exc.current_version)
            op = ("both", versions[0], versions[1], value)
        history.append(Operation(worker, call, time.monotonic_ns(), op, out))
    return history


def test_mixed_concurrent_workload_is_linearizable(ledger: SqliteLedger) -> None:
    start_at = time.monotonic_ns() + 200_000_000
    histories: list[list[Operation]] = [[] for _ in range(THREADS)]

    def run(n: int) -> None:
        histories[n] = mixed_worker(ledger, n, start_at, seed=n)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    history = [op for h in histories for op in h]
    assert len(history) == THREADS * OPS_PER_THREAD * 2
    writes = [op for op in history if op.input[0] != "read"]
    assert any(op.output[0] == "ok" for op in writes) and any(op.output[0] == "fail" for op in writes)
    result = check(history, TwoRegisters())
    assert result.ok, f"not linearizable; longest explainable prefix {len(result.longest_prefix)} ops"

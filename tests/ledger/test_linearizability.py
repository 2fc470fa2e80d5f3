"""Compare-and-set on one key is linearizable: 16 concurrent writers (threads on
both adapters, separate processes on sqlite) record every read and CAS with its
interval, and the checker finds one sequential order that explains them all."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger
from keycell.testing.linearizability import CasRegister, Operation, check

WRITERS = 16
ROUNDS = 12  # read + CAS per round: 16 * 12 * 2 = 384 operations per history
REGISTER = Key(Kind.ROTATION, "register/linearizability")


def run_writer(ledger: Ledger, writer: int, rounds: int, start_at: int) -> list[Operation]:
    """One writer's loop: read the register, then CAS it from the version read."""
    while time.monotonic_ns() < start_at:
        time.sleep(0.0005)
    history: list[Operation] = []
    for n in range(rounds):
        call = time.monotonic_ns()
        item = ledger.get(REGISTER, consistent=True)
        ret = time.monotonic_ns()
        seen = (0, None) if item is None else (item.version, item.value)
        history.append(Operation(writer, call, ret, ("read",), seen))

        value = f"w{writer}-{n}".encode()
        call = time.monotonic_ns()
        try:
            written = ledger.put_if(REGISTER, value, seen[0])
            outcome: tuple[object, ...] = ("ok", written.version)
        except ConflictError as exc:
            outcome = ("fail", exc.current_version)
        ret = time.monotonic_ns()
        history.append(Operation(writer, call, ret, ("cas", seen[0], value), outcome))
    return history


def _process_writer(args: tuple[str, int, int, int]) -> list[Operation]:
    path, writer, rounds, start_at = args
    ledger = SqliteLedger(path)
    try:
        return run_writer(ledger, writer, rounds, start_at)
    finally:
        ledger.close()


def assert_linearizable(history: list[Operation]) -> None:
    assert len(history) == WRITERS * ROUNDS * 2
    wins = [op for op in history if op.input[0] == "cas" and op.output[0] == "ok"]
    # Contention is real: many CAS operations lost.
    assert 0 < len(wins) < WRITERS * ROUNDS
    # Exactly once per version: the winning versions are 1..n with no gaps or repeats.
    assert sorted(op.output[1] for op in wins) == list(range(1, len(wins) + 1))
    result = check(history, CasRegister())
    assert result.ok, f"not linearizable; longest explainable prefix {len(result.longest_prefix)} ops"


def test_threads_doing_cas_on_one_key_are_linearizable(ledger: Ledger) -> None:
    start_at = time.monotonic_ns() + 200_000_000
    histories: list[list[Operation]] = [[] for _ in range(WRITERS)]

    def writer(n: int) -> None:
        histories[n] = run_writer(ledger, n, ROUNDS, start_at)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert_linearizable([op for h in histories for op in h])


@pytest.mark.slow
def test_processes_doing_cas_on_one_sqlite_file_are_linearizable(tmp_path: Path) -> None:
    path = str(tmp_path / "cell.db")
    SqliteLedger(path).close()  # create the schema before the race
    context = multiprocessing.get_context("spawn")
    with context.Pool(WRITERS) as pool:
        # Processes take a while to spawn; start everyone at the same instant.
        start_at = time.monotonic_ns() + 5_000_000_000
        results = pool.map_async(_process_writer, [(path, n, ROUNDS, start_at) for n in range(WRITERS)])
        histories = results.get(timeout=120)
    assert_linearizable([op for h in histories for op in h])


class RacyLedger:
    """A deliberately broken ledger: it checks the version, then writes without a
    condition. The same test must catch it, or the test proves nothing."""

    def __init__(self, inner: SqliteLedger) -> None:
        self.inner = inner

    def get(self, key: Key, *, consistent: bool = True) -> object:
        return self.inner.get(key, consistent=consistent)

    def put_if(self, key: Key, value: bytes, expected_version: int) -> object:
        current = self.inner.get(key)
        found = 0 if current is None else current.version
        if found != expected_version:
            raise ConflictError(key, expected_version, found)
        time.sleep(0.001)  # the window a real race falls into
        return _unconditional(self.inner, key, value, found + 1)


def _unconditional(inner: SqliteLedger, key: Key, value: bytes, version: int) -> object:
    db = inner._db()
    db.execute(
        "INSERT OR REPLACE INTO items (kind, path, version, value) VALUES (?, ?, ?, ?)",
        (key.kind.value, key.path, version, value),
    )
    return type("Written", (), {"version": version})()


def test_the_same_test_catches_a_ledger_without_conditional_writes(tmp_path: Path) -> None:
    racy = RacyLedger(SqliteLedger(tmp_path / "racy.db"))
    start_at = time.monotonic_ns() + 100_000_000
    histories: list[list[Operation]] = [[] for _ in range(WRITERS)]

    def writer(n: int) -> None:
        histories[n] = run_writer(racy, n, ROUNDS, start_at)  # type: ignore[arg-type]

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    result = check([op for h in histories for op in h], CasRegister())
    assert not result.ok

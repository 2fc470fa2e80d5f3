"""Writes to a secret are linearizable at its home cell, whichever cell they are sent
to: writers in all three cells (forwarded to the home over the relay mesh) and reads
bounded at zero staleness (answered from the home), checked with the WGL checker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from keycell.cells.mesh import Mesh
from keycell.testing.linearizability import Operation, check

SECRET = "lin/register"
MOVING = "lin/moving"
OPS_PER_THREAD = 10
THREADS_PER_CELL = 2


class KvRegister:
    """A KV v2 secret as a versioned register. Inputs and outputs:
    ("write", v) -> ("ok", n); ("cas", expected, v) -> ("ok", n) | ("fail",);
    ("read",) -> (n, v)."""

    def init(self) -> tuple[int, Any]:
        return (0, None)

    def step(
        self, state: tuple[int, Any], input: tuple[Any, ...], output: tuple[Any, ...]
    ) -> tuple[int, Any] | None:
        version, _ = state
        if input[0] == "read":
            return state if output == state else None
        if input[0] == "write":
            return (version + 1, input[1]) if output == ("ok", version + 1) else None
        if input[0] == "cas":
            _, expected, value = input
            if output[0] == "ok":
                return (version + 1, value) if version == expected and output[1] == version + 1 else None
            return state if version != expected else None
        raise ValueError(input)


def run_writers(
    mesh: Mesh,
    secret: str,
    during: Callable[[], None] | None = None,
    *,
    ops: int = OPS_PER_THREAD,
    pause: float = 0.0,
) -> tuple[list[Operation], list[str]]:
    """Writers and zero-staleness readers in every cell on `secret` (homed in a), while
    `during` runs on this thread. Refusals that say nothing happened (a fenced secret,
    a bound that cannot be met) are left out of the history; anything else is a failure."""
    history: list[Operation] = []
    lock = threading.Lock()
    call = time.monotonic_ns()
    first = mesh.write("a", secret, {"v": "init"})
    assert first.status == 200, first.body
    history.append(Operation(0, call, time.monotonic_ns(), ("write", "init"), ("ok", 1)))
    failures: list[str] = []

    def worker(process: int, cell: str) -> None:
        known = 1
        for i in range(ops):
            time.sleep(pause)
            value = f"p{process}-{i}"
            kind = ("read", "cas", "write")[i % 3]
            started = time.monotonic_ns()
            if kind == "read":
                reply = mesh.read(cell, secret, max_staleness="0")
                ended = time.monotonic_ns()
                if reply.status == 412:
                    continue  # refused: nothing was read
                if reply.status != 200:
                    failures.append(f"{cell} read: {reply.status} {reply.body}")
                    continue
                data = reply.body["data"]  # type: ignore[index]
                known = data["metadata"]["version"]
                op = Operation(process, started, ended, ("read",), (known, data["data"]["v"]))
            else:
                cas = known if kind == "cas" else None
                reply = mesh.write(cell, secret, {"v": value}, cas=cas)
                ended = time.monotonic_ns()
                if reply.status == 200:
                    known = reply.body["data"]["version"]  # type: ignore[index]
                    output: tuple[Any, ...] = ("ok", known)
                elif reply.status == 400 and kind == "cas" and "check-and-set" in reply.body["errors"][0]:  # type: ignore[index]
                    output = ("fail",)
                elif reply.status == 503 and "is moving from cell" in reply.body["errors"][0]:  # type: ignore[index]
                    continue  # fenced for the handover: refused, nothing written
                else:
                    failures.append(f"{cell} {kind}: {reply.status} {reply.body}")
                    continue
                op = Operation(
                    process,
                    started,
                    ended,
                    ("cas", cas, value) if kind == "cas" else ("write", value),
                    output,
                )
            with lock:
                history.append(op)

    threads = [
        threading.Thread(target=worker, args=(1 + n * THREADS_PER_CELL + t, cell))
        for n, cell in enumerate(("a", "b", "c"))
        for t in range(THREADS_PER_CELL)
    ]
    for thread in threads:
        thread.start()
    if during is not None:
        during()
    for thread in threads:
        thread.join(timeout=120)
    return history, failures


def test_writes_from_every_cell_are_linearizable_at_the_home(mesh: Mesh) -> None:
    history, failures = run_writers(mesh, SECRET)
    assert not failures, failures
    assert len(history) == 1 + 3 * THREADS_PER_CELL * OPS_PER_THREAD
    assert {op.input[0] for op in history} == {"read", "cas", "write"}
    # every cell's writers got writes through (b's and c's were forwarded to the home, a)
    for n in range(3):
        processes = range(1 + n * THREADS_PER_CELL, 1 + (n + 1) * THREADS_PER_CELL)
        assert any(op.process in processes and op.output[0] == "ok" for op in history)
    result = check(history, KvRegister())
    assert result.ok, f"not linearizable; longest linearizable prefix {result.longest_prefix}"


def test_writes_stay_linearizable_while_the_home_moves(mesh: Mesh) -> None:
    """Two homes never take writes at once: a history spanning a handover a -> b is
    still linearizable."""
    moved: list[int] = []
    handover_started = handover_done = 0

    def move() -> None:
        nonlocal handover_started, handover_done
        time.sleep(0.2)
        handover_started = time.monotonic_ns()
        reply = mesh.request("a", "POST", f"sys/homes/secret/{MOVING}", {"to": "b"})
        moved.append(reply.status)
        handover_done = time.monotonic_ns()

    # writers span the handover: about 0.2 s before it, its 0.5 s fence, and after
    history, failures = run_writers(mesh, MOVING, during=move, ops=45, pause=0.03)
    assert moved == [200]
    assert not failures, failures
    assert mesh.fronts["b"].replicas.home(f"secret/{MOVING}").home == "b"  # type: ignore[union-attr]
    writes = [op for op in history if op.output[0] == "ok"]
    assert any(op.call < handover_started for op in writes), "no write before the handover"
    assert any(op.call > handover_done for op in writes), "no write after the handover"
    result = check(history, KvRegister())
    assert result.ok, f"not linearizable; longest linearizable prefix {result.longest_prefix}"


def test_a_history_with_a_lost_write_is_caught_by_the_same_check() -> None:
    """The model is not vacuous: a read that misses an acknowledged write fails it."""
    history = [
        Operation(0, 0, 10, ("write", "x"), ("ok", 1)),
        Operation(1, 20, 30, ("write", "y"), ("ok", 2)),
        Operation(2, 40, 50, ("read",), (1, "x")),
    ]
    assert not check(history, KvRegister()).ok

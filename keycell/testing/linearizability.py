"""A small linearizability checker (Wing & Gong's search with Lowe's memoisation).

A history is a list of completed operations, each with the wall-clock interval in
which it ran (`call` and `ret` from `time.monotonic_ns()`, which is system-wide on
Linux, so histories recorded in several processes merge), its input and its
output. The history is linearizable if the operations can be put in one order that
respects real time (an operation that returned before another was called comes
first) and in which every output is what a sequential object would have answered.

The search linearizes the earliest pending call that the model accepts, backtracks
when it meets a return whose call is still pending, and caches (linearized set,
state) pairs it has already explored: Lowe, "Testing for linearizability" (2017).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

S = TypeVar("S", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Operation:
    process: int
    call: int
    ret: int
    input: tuple[Any, ...]
    output: tuple[Any, ...]


class Model(Protocol[S]):
    def init(self) -> S: ...

    def step(self, state: S, input: tuple[Any, ...], output: tuple[Any, ...]) -> S | None:
        """The state after the operation, or None if `output` is impossible from `state`."""
        ...


@dataclass(slots=True)
class Result:
    ok: bool
    operations: int
    explored: int
    # When not linearizable: the longest prefix of operations that could be ordered.
    longest_prefix: list[int] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Entry:
    op: int
    is_call: bool
    prev: _Entry | None = None
    next: _Entry | None = None
    match: _Entry | None = None


class CasRegister(Generic[S]):
    """A versioned register: state is (version, value), starting at (0, None).

    Inputs and outputs:
      ("read",)                     -> (version, value)
      ("cas", expected, new_value)  -> ("ok", new_version) | ("fail", version_found)
    """

    def init(self) -> tuple[int, Any]:
        return (0, None)

    def step(
        self, state: tuple[int, Any], input: tuple[Any, ...], output: tuple[Any, ...]
    ) -> tuple[int, Any] | None:
        version, value = state
        if input[0] == "read":
            return state if output == (version, value) else None
        if input[0] == "cas":
            _, expected, new_value = input
            if output[0] == "ok":
                if version == expected and output[1] == expected + 1:
                    return (expected + 1, new_value)
                return None
            if output[0] == "fail":
                return state if version != expected and output[1] == version else None
        raise ValueError(f"unknown operation {input!r}")


def check(history: Sequence[Operation], model: Model[Any], *, max_explored: int = 5_000_000) -> Result:
    """Is `history` linearizable with respect to `model`? Raises RuntimeError if the
    search exceeds `max_explored` steps (a bounded check never passes by timing out)."""
    events: list[tuple[int, int, int]] = []
    for index, op in enumerate(history):
        if op.ret < op.call:
            raise ValueError(f"operation {index} returns before it is called")
        # At equal times, calls sort before returns: touching intervals count as
        # concurrent, the lenient reading of a clock tie.
        events.append((op.call, 0, index))
        events.append((op.ret, 1, index))
    events.sort()

    head = _Entry(op=-1, is_call=False)
    calls: dict[int, _Entry] = {}
    tail = head
    for _time, kind, index in events:
        event = _Entry(op=index, is_call=kind == 0, prev=tail)
        tail.next = event
        tail = event
        if kind == 0:
            calls[index] = event
        else:
            calls[index].match = event

    def lift(call: _Entry) -> None:
        for e in (call, call.match):
            assert e is not None and e.prev is not None
            e.prev.next = e.next
            if e.next is not None:
                e.next.prev = e.prev

    def unlift(call: _Entry) -> None:
        for e in (call.match, call):
            assert e is not None and e.prev is not None
            e.prev.next = e
            if e.next is not None:
                e.next.prev = e

    state: Any = model.init()
    linearized = 0
    stack: list[tuple[_Entry, Any]] = []
    seen: set[tuple[int, Any]] = set()
    longest: list[int] = []
    explored = 0
    entry: _Entry | None = head.next
    while head.next is not None:
        explored += 1
        if explored > max_explored:
            raise RuntimeError(f"linearizability search gave up after {max_explored} steps")
        assert entry is not None
        if entry.is_call:
            op = history[entry.op]
            new_state = model.step(state, op.input, op.output)
            if new_state is not None:
                new_linearized = linearized | (1 << entry.op)
                if (new_linearized, new_state) not in seen:
                    seen.add((new_linearized, new_state))
                    stack.append((entry, state))
                    state, linearized = new_state, new_linearized
                    lift(entry)
                    if len(stack) > len(longest):
                        longest = [e.op for e, _ in stack]
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return Result(False, len(history), explored, longest)
            entry, state = stack.pop()
            linearized &= ~(1 << entry.op)
            unlift(entry)
            entry = entry.next
    return Result(True, len(history), explored, [e.op for e, _ in stack])

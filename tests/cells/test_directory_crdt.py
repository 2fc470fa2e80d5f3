"""The cell directory is a CRDT: merge is commutative, associative and idempotent, so
every relay that heard the same updates holds the same directory, whatever the order
or repetition of gossip; the hybrid logical clock never goes backwards."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from keycell.control_plane.directory import (
    CellRecord,
    Directory,
    Entry,
    HybridClock,
    Timestamp,
    merge,
)

CELLS = ("a", "b", "c", "d")

timestamps = st.builds(
    Timestamp,
    wall=st.integers(0, 5),
    logical=st.integers(0, 3),
    node=st.sampled_from(CELLS),
)
records = st.builds(
    CellRecord,
    cell=st.sampled_from(CELLS),
    api=st.sampled_from(("", "http://127.0.0.1:8200", "http://127.0.0.1:8201")),
    health=st.sampled_from(("ok", "degraded", "sealed")),
)
entries = st.builds(Entry, ts=timestamps, record=records, removed=st.booleans())
states = st.lists(entries, max_size=8).map(lambda es: _state(es))


def _state(es: list[Entry]) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for e in es:
        out = merge(out, {e.record.cell: e})
    return out


@settings(max_examples=150, deadline=None)
@given(states, states)
def test_merge_is_commutative(a: dict[str, Entry], b: dict[str, Entry]) -> None:
    assert merge(a, b) == merge(b, a)


@settings(max_examples=150, deadline=None)
@given(states, states, states)
def test_merge_is_associative(a: dict[str, Entry], b: dict[str, Entry], c: dict[str, Entry]) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@settings(max_examples=150, deadline=None)
@given(states, states)
def test_merge_is_idempotent(a: dict[str, Entry], b: dict[str, Entry]) -> None:
    assert merge(a, a) == a
    once = merge(a, b)
    assert merge(once, b) == once


@settings(max_examples=100, deadline=None)
@given(st.lists(entries, max_size=10), st.randoms())
def test_any_delivery_order_gives_the_same_directory(updates: list[Entry], rng) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(updates) + list(updates[: len(updates) // 2])  # with repeats
    rng.shuffle(shuffled)
    assert _state(shuffled) == _state(updates)


def test_a_newer_entry_replaces_an_older_one_and_a_removal_stays_removed() -> None:
    clock_time = [1000.0]
    mine = Directory(HybridClock("a", clock=lambda: clock_time[0]))
    theirs = Directory(HybridClock("b", clock=lambda: clock_time[0]))
    mine.put(CellRecord("c", api="http://old"))
    theirs.absorb(mine.entries)
    clock_time[0] += 1
    theirs.put(CellRecord("c", api="http://new"))
    mine.absorb(theirs.entries)
    assert mine.cells()["c"].api == "http://new"
    clock_time[0] += 1
    mine.remove("c")
    stale = {"c": Entry(Timestamp(1000_000, 0, "a"), CellRecord("c", api="http://old"))}
    mine.absorb(stale)  # an old rumour arriving late does not bring the cell back
    theirs.absorb(mine.entries)
    assert "c" not in mine.cells() and "c" not in theirs.cells()


def test_the_hybrid_clock_never_goes_backwards_even_when_wall_time_does() -> None:
    wall = [2000.0]
    clock = HybridClock("a", clock=lambda: wall[0])
    first = clock.now()
    wall[0] = 1000.0  # the machine's clock steps back
    second = clock.now()
    clock.observe(Timestamp(5_000_000, 7, "b"))  # a peer far ahead
    third = clock.now()
    assert first < second < third
    assert third.wall == 5_000_000 and third.logical > 7

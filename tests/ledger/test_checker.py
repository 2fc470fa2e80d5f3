"""The linearizability checker finds violations; it is not a rubber stamp."""

from __future__ import annotations

import pytest

from keycell.testing.linearizability import CasRegister, Operation, check


def op(process: int, call: int, ret: int, inp: tuple[object, ...], out: tuple[object, ...]) -> Operation:
    return Operation(process, call, ret, inp, out)


def test_sequential_history_is_linearizable() -> None:
    history = [
        op(0, 0, 1, ("cas", 0, b"a"), ("ok", 1)),
        op(1, 2, 3, ("read",), (1, b"a")),
        op(1, 4, 5, ("cas", 0, b"b"), ("fail", 1)),
        op(0, 6, 7, ("cas", 1, b"c"), ("ok", 2)),
    ]
    assert check(history, CasRegister()).ok


def test_concurrent_operations_may_take_effect_in_either_order() -> None:
    # The read overlaps the write, so it may see either the old or the new value.
    for seen in [(0, None), (1, b"a")]:
        history = [op(0, 0, 10, ("cas", 0, b"a"), ("ok", 1)), op(1, 1, 9, ("read",), seen)]
        assert check(history, CasRegister()).ok


def test_two_winners_of_one_version_are_a_lost_update() -> None:
    history = [
        op(0, 0, 10, ("cas", 0, b"a"), ("ok", 1)),
        op(1, 1, 9, ("cas", 0, b"b"), ("ok", 1)),
    ]
    assert not check(history, CasRegister()).ok


def test_stale_read_after_a_completed_write_is_caught() -> None:
    history = [
        op(0, 0, 1, ("cas", 0, b"a"), ("ok", 1)),
        op(1, 2, 3, ("read",), (0, None)),
    ]
    assert not check(history, CasRegister()).ok


def test_read_of_a_value_never_written_is_caught() -> None:
    history = [
        op(0, 0, 1, ("cas", 0, b"a"), ("ok", 1)),
        op(1, 2, 3, ("read",), (1, b"forged")),
    ]
    assert not check(history, CasRegister()).ok


def test_failed_cas_must_report_a_version_that_existed_during_it() -> None:
    history = [
        op(0, 0, 1, ("cas", 0, b"a"), ("ok", 1)),
        op(1, 2, 3, ("cas", 0, b"b"), ("fail", 2)),
    ]
    assert not check(history, CasRegister()).ok


def test_a_failed_cas_that_should_have_won_is_caught() -> None:
    history = [
        op(0, 0, 1, ("cas", 0, b"a"), ("ok", 1)),
        op(1, 2, 3, ("cas", 1, b"b"), ("fail", 1)),
    ]
    assert not check(history, CasRegister()).ok


def test_a_history_with_time_running_backwards_is_refused() -> None:
    with pytest.raises(ValueError, match="returns before"):
        check([op(0, 5, 1, ("read",), (0, None))], CasRegister())

"""Response wrapping over a real cell (sqlite and DynamoDB-on-moto ledgers).

Time: the engine reads a fake clock that starts at real time and jumps forward, which
shows the engine refusing an expired token while the ledger (which judges expiry by
real time) still holds it. One test waits in real time, under 2 s, for the ledger itself
to hide a 1-second token while the fake clock stands still: both clocks are honoured.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

import pytest

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.ledger import Key, Kind, iter_prefix, now
from keycell.control_plane.seal import token_path
from keycell.control_plane.wrapping import Wrapping, is_wrapping_token, parse_duration
from keycell.testing.cells import Cell
from keycell.testing.clock import ManualClock

RESPONSE: dict[str, Any] = {
    "request_id": "",
    "lease_id": "",
    "renewable": False,
    "lease_duration": 0,
    "data": {"data": {"password": "correct-horse"}, "metadata": {"version": 3}},
}
INVALID = "wrapping token is not valid or does not exist"


@pytest.fixture
def wrapping(cell: Cell, clock: ManualClock) -> Wrapping:
    return Wrapping(cell.barrier, clock=clock)


def wrap(wrapping: Wrapping, ttl: int | str = 300) -> dict[str, Any]:
    return wrapping.wrap(RESPONSE, ttl=ttl, creation_path="secret/data/app")


# --- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300", 300),
        (300, 300),
        ("0", 0),
        ("300s", 300),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1h30m15s", 5415),
        ("1.5h", 5400),
        ("0.3m", 18),
        ("2d", 172800),
        ("1500ms", 1),
        (" 5m ", 300),
    ],
)
def test_parse_duration_reads_vault_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "  ", "-5", "-5m", "5x", "m5", "5m-3s", "1h 30m", "abc", "5 m", "٣", "9" * 40, True, None, 1.5, -1],
)
def test_parse_duration_refuses_anything_else(text: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_duration(text)


def test_parse_duration_refuses_what_go_cannot_hold() -> None:
    with pytest.raises(InvalidRequest, match="out of range"):
        parse_duration("9999999999999h")


def test_is_wrapping_token_checks_the_shape_only() -> None:
    assert is_wrapping_token("kc.w." + "A" * 43)
    for other in ["kc." + "A" * 43, "kc.w." + "A" * 42, "kc.w." + "A" * 42 + "!", "", None, 5]:
        assert not is_wrapping_token(other)


# --- wrap and unwrap ------------------------------------------------------------------


def test_wrap_answers_vault_wrap_info(wrapping: Wrapping, clock: ManualClock) -> None:
    info = wrap(wrapping)
    assert set(info) == {"token", "accessor", "ttl", "creation_time", "creation_path"}  # nothing to name
    assert is_wrapping_token(info["token"])
    assert info["accessor"] and info["accessor"] != info["token"]
    assert (info["ttl"], info["creation_path"]) == (300, "secret/data/app")
    assert info["creation_time"].endswith("Z")
    assert datetime.fromisoformat(info["creation_time"]).timestamp() == pytest.approx(clock.now)


def test_unwrap_returns_the_original_response(wrapping: Wrapping) -> None:
    assert wrapping.unwrap(wrap(wrapping)["token"]) == RESPONSE


def test_a_second_unwrap_is_refused(wrapping: Wrapping) -> None:
    token = wrap(wrapping)["token"]
    wrapping.unwrap(token)
    with pytest.raises(InvalidRequest, match=INVALID):
        wrapping.unwrap(token)


def test_concurrent_unwraps_exactly_one_wins(wrapping: Wrapping) -> None:
    token = wrap(wrapping)["token"]
    won: list[dict[str, Any]] = []
    refused: list[InvalidRequest] = []
    start = threading.Barrier(6)

    def unwrap() -> None:
        start.wait()
        try:
            won.append(wrapping.unwrap(token))
        except InvalidRequest as exc:
            refused.append(exc)

    threads = [threading.Thread(target=unwrap) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert won == [RESPONSE]
    assert len(refused) == 5


def test_unwrap_removes_the_record_and_its_accessor_index(wrapping: Wrapping, cell: Cell) -> None:
    wrapping.unwrap(wrap(wrapping)["token"])
    assert list(iter_prefix(cell.barrier, Kind.CUBBYHOLE)) == []


def test_the_token_is_stored_only_as_a_digest(wrapping: Wrapping, cell: Cell) -> None:
    info = wrap(wrapping)
    paths = {item.key.path for item in iter_prefix(cell.ledger, Kind.CUBBYHOLE)}
    assert paths == {token_path(info["token"]), f"accessor/{info['accessor']}"}
    for item in iter_prefix(cell.ledger, Kind.CUBBYHOLE):
        assert b"correct-horse" not in item.value and info["token"].encode() not in item.value


def test_unknown_and_malformed_tokens_are_refused_alike(wrapping: Wrapping) -> None:
    for token in ["kc.w." + "A" * 43, "not-a-token", "", None]:
        with pytest.raises(InvalidRequest, match=INVALID):
            wrapping.unwrap(token)  # type: ignore[arg-type]


def test_wrap_data_unwraps_to_the_data(wrapping: Wrapping) -> None:
    info = wrapping.wrap_data({"foo": "bar"}, "60")
    assert (info["creation_path"], info["ttl"]) == ("sys/wrapping/wrap", 60)
    assert wrapping.unwrap(info["token"]) == {"data": {"foo": "bar"}}


def test_wrap_data_without_a_ttl_is_refused(wrapping: Wrapping) -> None:
    with pytest.raises(InvalidRequest, match="requires response wrapping"):
        wrapping.wrap_data({"foo": "bar"}, 0)


def test_wrap_ttl_takes_duration_strings_and_stays_in_range(wrapping: Wrapping) -> None:
    assert wrap(wrapping, "5m")["ttl"] == 300
    for bad in ["0", "33d", "-1s", "soon"]:
        with pytest.raises(InvalidRequest):
            wrap(wrapping, bad)


def test_an_unserializable_response_is_refused(wrapping: Wrapping, cell: Cell) -> None:
    with pytest.raises(InvalidRequest, match="JSON"):
        wrapping.wrap({"data": {1, 2}}, ttl=60, creation_path="x")
    assert list(iter_prefix(cell.barrier, Kind.CUBBYHOLE)) == []


# --- lookup and rewrap ----------------------------------------------------------------


def test_lookup_does_not_consume_the_token(wrapping: Wrapping) -> None:
    info = wrap(wrapping)
    found = wrapping.lookup(info["token"])
    assert found == {
        "creation_path": "secret/data/app",
        "creation_time": info["creation_time"],
        "creation_ttl": 300,
    }
    assert wrapping.lookup(info["token"]) == found
    assert wrapping.unwrap(info["token"]) == RESPONSE


def test_rewrap_invalidates_the_old_token_and_keeps_the_response(wrapping: Wrapping, cell: Cell) -> None:
    old = wrap(wrapping)
    new = wrapping.rewrap(old["token"])
    assert new["token"] != old["token"] and new["accessor"] != old["accessor"]
    assert (new["ttl"], new["creation_path"]) == (300, "secret/data/app")
    with pytest.raises(InvalidRequest, match=INVALID):
        wrapping.unwrap(old["token"])
    assert cell.barrier.get(Key(Kind.CUBBYHOLE, f"accessor/{old['accessor']}")) is None
    assert wrapping.unwrap(new["token"]) == RESPONSE


def test_rewrap_restarts_the_ttl(wrapping: Wrapping, clock: ManualClock) -> None:
    old = wrap(wrapping, 60)
    clock.advance(50)
    new = wrapping.rewrap(old["token"])
    clock.advance(50)  # 100 s after the first wrap, 50 s after the rewrap
    assert wrapping.unwrap(new["token"]) == RESPONSE


# --- expiry ---------------------------------------------------------------------------


def test_an_expired_token_is_refused_by_the_engine_clock(wrapping: Wrapping, clock: ManualClock) -> None:
    token = wrap(wrapping, 60)["token"]
    clock.advance(60)
    for use in (wrapping.unwrap, wrapping.lookup, wrapping.rewrap):
        with pytest.raises(InvalidRequest, match=INVALID):
            use(token)


def test_an_expired_token_is_refused_once_the_ledger_expires_it(wrapping: Wrapping, cell: Cell) -> None:
    token = wrap(wrapping, 1)["token"]
    expires_at = cell.ledger.get(Key(Kind.CUBBYHOLE, token_path(token))).expires_at  # type: ignore[union-attr]
    assert expires_at is not None
    deadline = time.monotonic() + 3
    while now() < expires_at and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(InvalidRequest, match=INVALID):
        wrapping.unwrap(token)  # the fake clock has not moved: the ledger refused it

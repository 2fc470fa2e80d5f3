"""Issue 18 §1, the third path: a revocation minted in one cell is put, sealed, into each
other cell's ledger (one DynamoDB table per cell on a moto server over HTTP) and
drained there, so it arrives, and freshness advances, with the relay mesh and the
peers' APIs cut. Each of the three paths alone delivers; nothing is lost or doubled.

One mesh serves the module (starting three cells on DynamoDB costs seconds); every
test heals what it cut and uses its own accessors."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keycell.adapters.ledgers.dynamodb import DynamoLedger
from keycell.cells.mesh import Mesh
from keycell.control_plane.freshness import Mint
from keycell.control_plane.ledger import Kind, LedgerUnavailableError, iter_prefix
from keycell.control_plane.revocations import RevocationLog, RevocationRecord
from keycell.functions.wiring import peer_ledgers_from_environment
from tests.cells.test_revocation_paths import _freshness, _held_by, _revoke, _worst_staleness

CELLS = ("a", "b", "c")


@pytest.fixture(scope="module")
def mesh(aws_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    run = uuid.uuid4().hex[:8]
    urls: dict[str, str] = {}
    for cell in CELLS:
        table = f"keycell-{cell}-{run}"
        DynamoLedger(table, endpoint_url=aws_endpoint, create=True).close()
        urls[cell] = f"dynamodb://{table}?endpoint={aws_endpoint}&region=us-east-1"
    folder: Path = tmp_path_factory.mktemp("ledger-path")
    started = Mesh(folder, CELLS, direct=True, ledger_path=True, ledgers=urls, heartbeat_every=0.3).start()
    try:
        assert started.wait_for(started.directory_complete, 30), "the cell directory did not converge"
        assert started.wait_for(lambda: all(len(started.direct_paths[c].peers()) == 2 for c in CELLS), 30), (
            "API URLs not in the directory"
        )
        yield started
    finally:
        started.stop()


@pytest.fixture(autouse=True)
def healed(mesh: Mesh) -> Iterator[None]:
    yield
    mesh.heal()


def _cut(mesh: Mesh, path: str) -> None:
    for cell in CELLS:
        {"relay": mesh.cut_relays, "direct": mesh.cut_direct, "ledger": mesh.cut_ledger}[path](cell)


def _settle(mesh: Mesh) -> None:
    """Let deliveries and beats already in flight when a cut was made land."""
    mesh.wait_for(lambda: False, 0.5)


@pytest.mark.parametrize("alone", ["relay", "direct", "ledger"])
def test_each_path_alone_delivers_with_the_other_two_cut(mesh: Mesh, alone: str) -> None:
    for other in {"relay", "direct", "ledger"} - {alone}:
        _cut(mesh, other)
    _settle(mesh)
    accessor = f"acc-only-{alone}"
    rid = _revoke(mesh, "a", accessor)["id"]
    for cell in ("b", "c"):
        assert mesh.wait_for(lambda c=cell: _held_by(mesh, c, rid) is not None, 20), cell
        assert _held_by(mesh, cell, rid)["path"] == alone  # type: ignore[index]
        assert mesh.api_services[cell].revocations.is_revoked(f"token:{accessor}")


def test_freshness_advances_through_the_ledger_path_alone(mesh: Mesh) -> None:
    _cut(mesh, "relay")
    _cut(mesh, "direct")
    _settle(mesh)
    cut_at = time.time()
    for cell in CELLS:
        for peer in set(CELLS) - {cell}:
            assert mesh.wait_for(
                lambda c=cell, p=peer: (_freshness(mesh, c)["peers"][p]["watermark"] or 0) > cut_at + 0.5, 10
            ), f"{cell}'s watermark of {peer}"
            mark = _freshness(mesh, cell)["peers"][peer]
            assert mark["path"] == "ledger", mark
            # and it keeps advancing: each new heartbeat proves a later time
            assert mesh.wait_for(
                lambda c=cell, p=peer, w=mark["watermark"]: _freshness(mesh, c)["peers"][p]["watermark"] > w,
                10,
            ), f"{cell}'s watermark of {peer} stalled"


def test_a_revocation_minted_in_a_cell_cut_off_from_relays_and_apis_arrives_by_ledger(mesh: Mesh) -> None:
    mesh.cut_relays("a")
    mesh.cut_direct("a")
    _settle(mesh)
    rid = _revoke(mesh, "a", "acc-minted-while-cut")["id"]
    for cell in ("b", "c"):
        assert mesh.wait_for(lambda c=cell: _held_by(mesh, c, rid) is not None, 20), cell
        assert _held_by(mesh, cell, rid)["path"] == "ledger"  # type: ignore[index]
    # the cut-off cell stays fresh, and so does the others' view of it: heartbeats
    # minted after the cut reach each cell's own table
    cut_at = time.time()
    views = [("a", "b"), ("a", "c"), ("b", "a"), ("c", "a")]
    for cell, peer in views:
        assert mesh.wait_for(
            lambda c=cell, p=peer: (_freshness(mesh, c)["peers"][p]["watermark"] or 0) > cut_at, 10
        ), f"{cell}'s watermark of {peer}"


class _Hanging:
    """A peer table that takes every call and does not answer until `release` (then
    fails as an unreachable table would): what a peer region whose DynamoDB endpoint
    black-holes packets looks like to boto, whose timeouts are long."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        def hang(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.release.wait(30)
            raise LedgerUnavailableError("test fault: this peer's table never answered")

        return hang


def test_a_peer_table_that_never_answers_delays_neither_deliveries_nor_heartbeats_to_the_others(
    mesh: Mesh,
) -> None:
    """Cell a's ledger path gains a peer z whose table never answers. With the relays
    and the APIs cut (the ledger path is all there is), b and c must still get a's
    revocations at once and keep a fresh watermark of a: each peer has its own lane."""
    path = mesh.ledger_paths["a"]
    hanging = _Hanging()
    real_keys = path._public_keys
    path._public_keys = lambda: {**real_keys(), "z": real_keys()["a"]}  # type: ignore[method-assign]
    path._backlog["z"] = {}
    path.ledgers["z"] = hanging  # type: ignore[assignment]
    try:
        _cut(mesh, "relay")
        _cut(mesh, "direct")
        _settle(mesh)
        rids = [_revoke(mesh, "a", f"acc-beside-a-silent-table-{i}")["id"] for i in range(12)]
        for cell in ("b", "c"):
            assert mesh.wait_for(lambda c=cell: all(_held_by(mesh, c, r) for r in rids), 10), cell
        worst = _worst_staleness(mesh, "b", "a")
        assert worst < 2.0, f"b's view of a went {worst:.2f} s stale while z's table was silent"
        assert hanging.calls > 0  # z was tried, and hung
    finally:
        del path.ledgers["z"]
        path._public_keys = real_keys  # type: ignore[method-assign]
        hanging.release.set()


def test_nothing_is_lost_and_nothing_is_doubled_across_the_three_paths(mesh: Mesh) -> None:
    minted = {
        origin: [_revoke(mesh, origin, f"acc-many-{origin}-{i}")["id"] for i in range(6)] for origin in "ab"
    }
    ids = [rid for rids in minted.values() for rid in rids]
    first: dict[tuple[str, str], dict[str, Any]] = {}

    def all_held() -> bool:  # reads only what is not held yet: the moto server is serial
        for cell in CELLS:
            for rid in ids:
                if (cell, rid) not in first and (held := _held_by(mesh, cell, rid)) is not None:
                    first[(cell, rid)] = held
        return len(first) == len(CELLS) * len(ids)

    assert mesh.wait_for(all_held, 30, step=0.2)

    # Every revocation of a goes again through the ledger path (as a backlog retry would).
    recs = [_record(mesh, "a", rid) for rid in minted["a"]]
    for peer in ("b", "c"):
        assert mesh.ledger_paths["a"].deliver_to(peer, recs)
    assert mesh.wait_for(lambda: all(not _inbox_revocations(mesh, c) for c in CELLS), 20, step=0.2)

    for (cell, rid), held in first.items():
        assert _held_by(mesh, cell, rid) == held  # one receipt per cell; the first path and time stay
    for cell in CELLS:
        for origin in set("ab") - {cell}:
            minted_there = Mint(mesh.api_services[origin].barrier, origin).read()[0]
            # every seq the origin minted is held, none beyond: nothing lost, no phantom
            assert mesh.wait_for(
                lambda c=cell, o=origin, n=minted_there: (
                    _freshness(mesh, c)["peers"][o]["contiguous_seq"] == n
                ),
                10,
                step=0.2,
            ), (cell, origin)


def _record(mesh: Mesh, cell: str, rid: str) -> RevocationRecord:
    found = RevocationLog(mesh.api_services[cell].revocations).describe(rid)
    assert found is not None
    return found[0]


def _inbox_revocations(mesh: Mesh, cell: str) -> list[str]:
    items = iter_prefix(mesh.api_services[cell].ledger, Kind.REVOCATION_INBOX)
    return [i.key.path for i in items if not i.key.path.endswith("/heartbeat")]


# --- KEYCELL_PEER_LEDGERS ------------------------------------------------------------------


def test_peer_ledgers_configure_dynamodb_tables_per_cell() -> None:
    env = {
        "KEYCELL_PEER_LEDGERS": '{"eu-west-1": {"table": "keycell-eu-west-1", "region": "eu-west-1"},'
        ' "ap-southeast-1": {"table": "kc-ap", "region": "ap-southeast-1", "endpoint": "http://127.0.0.1:5000"},'
        ' "dev": "sqlite:///tmp/dev/cell.db"}'
    }
    assert peer_ledgers_from_environment(env) == {
        "eu-west-1": "dynamodb://keycell-eu-west-1?region=eu-west-1",
        "ap-southeast-1": "dynamodb://kc-ap?region=ap-southeast-1&endpoint=http%3A%2F%2F127.0.0.1%3A5000",
        "dev": "sqlite:///tmp/dev/cell.db",
    }
    assert peer_ledgers_from_environment({}) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"a b": {"table": "tbl", "region": "eu-west-1"}}', "not a cell id"),
        ('{"b": 5}', "object {table, region, endpoint} or a URL"),
        ('{"b": {"table": "x", "region": "eu-west-1"}}', "'table' is a DynamoDB table name"),
        ('{"b": {"table": "tbl", "region": "Europe"}}', "'region' is an AWS region"),
        ('{"b": {"table": "tbl", "region": "eu-west-1", "colour": 1}}', "unknown field(s) colour"),
        ('{"b": {"table": "tbl", "region": "eu-west-1", "endpoint": "ftp://h"}}', "http(s)://HOST"),
        ('{"b": "postgres://h/db"}', "sqlite:// or dynamodb://"),
        ('{"b": "dynamodb://t?create=1"}', "never created from here"),
    ],
)
def test_bad_peer_ledgers_are_refused_with_a_clear_error(value: str, message: str) -> None:
    with pytest.raises(ValueError, match="KEYCELL_PEER_LEDGERS") as caught:
        peer_ledgers_from_environment({"KEYCELL_PEER_LEDGERS": value})
    assert message in str(caught.value)


def test_an_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    env = {
        "KEYCELL_PEER_LEDGERS": '{"b": {"table": "tbl", "region": "eu-west-1", "endpoint": "https://AKIA:s3cr3t@h"}}'
    }
    with pytest.raises(ValueError, match="without credentials") as caught:
        peer_ledgers_from_environment(env)
    assert "s3cr3t" not in str(caught.value)


def test_the_wiring_starts_a_ledger_path_over_the_peers_it_names(tmp_path: Path) -> None:
    from keycell.cells.mesh import open_cell
    from keycell.cells.paths import LedgerPath
    from keycell.functions.wiring import peer_ledger_path

    services = open_cell(tmp_path / "a", "a")
    peers = json.dumps({"a": f"sqlite://{tmp_path}/a.db", "b": f"sqlite://{tmp_path}/b.db"})
    path = peer_ledger_path(services, {"KEYCELL_PEER_LEDGERS": peers, "KEYCELL_HEARTBEAT_S": "0.1"})
    try:
        assert isinstance(path, LedgerPath)
        assert set(path.ledgers) == {"b"}  # its own entry skipped
        assert path.every == 0.1
        assert path.drain().applied == 0  # an empty inbox drains to nothing
    finally:
        path.close()
        for ledger in path.ledgers.values():
            ledger.close()
        services.ledger.close()
    assert peer_ledger_path(services, {}) is None

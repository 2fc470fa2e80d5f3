"""The broadcast model (keycell/relay/simulate.py): the tree of keycell/relay/tree.py
reaches every relay with one push each when nothing is lost, resends repair lost
pushes, relays missing from their senders' views are reached by graft, and a seed
gives the same run every time."""

from __future__ import annotations

import math

import pytest

from keycell.relay.profiles import LAN, LOCAL
from keycell.relay.simulate import report, simulate

# No anti-entropy: what the tree, its resends and its grafts reach on their own.
TREE_ONLY = LAN.with_(push_pull_interval=0.0)


@pytest.mark.parametrize("nodes,cells", [(1, 1), (2, 1), (30, 3), (1000, 3)])
def test_without_loss_the_tree_reaches_every_relay_with_one_push_each(nodes: int, cells: int) -> None:
    result = simulate(nodes, cells, loss=0.0, seed=3, profile=TREE_ONLY)
    assert result.covered and result.reached == nodes
    assert result.pushes == nodes - 1 == result.acks
    assert result.resends == result.grafts == result.repairs == 0
    assert result.reached_by["first_push"] == nodes - 1


def test_without_loss_the_depth_is_the_heaps_plus_the_cross_link() -> None:
    nodes, cells = 3000, 3
    result = simulate(nodes, cells, loss=0.0, seed=0, profile=TREE_ONLY)
    per_cell, fanout = nodes // cells, TREE_ONLY.eager_fanout
    assert result.hops <= math.ceil(math.log(per_cell, fanout)) + 1
    assert result.hops >= math.floor(math.log(per_cell, fanout))  # a tree, not a star


def test_lost_pushes_are_resent_and_every_relay_is_reached() -> None:
    nodes = 3000
    result = simulate(nodes, 3, loss=0.05, seed=1, profile=TREE_ONLY)
    assert result.covered
    assert result.resends > 0 and result.reached_by["resend"] > 0
    assert result.reached_by["first_push"] > 0.8 * nodes
    # one push per relay, plus what the losses cost: resends, and acks of both
    assert nodes - 1 <= result.messages <= 3 * nodes


def test_relays_missing_from_their_senders_views_are_reached_by_graft() -> None:
    full = simulate(600, 3, loss=0.0, seed=2, profile=TREE_ONLY)
    differing = simulate(600, 3, loss=0.0, view_miss=0.05, seed=2, profile=TREE_ONLY)
    assert full.grafts == 0
    assert differing.covered
    assert differing.grafts > 0 and differing.reached_by["graft"] > 0
    assert differing.seconds >= TREE_ONLY.graft_timeout  # a graft waits for the push first


def test_anti_entropy_alone_reaches_every_relay_without_a_tree() -> None:
    no_tree = LOCAL.with_(eager_fanout=0, graft_timeout=1e6)  # (ids on pings, never grafted)
    result = simulate(200, 2, profile=no_tree, loss=0.0, seed=4)
    assert result.covered
    assert result.reached_by["anti_entropy"] == 200 - 2  # all but the origin and its cross link


def test_the_same_seed_gives_the_same_run() -> None:
    first = simulate(1000, 3, loss=0.05, view_miss=0.02, seed=7)
    assert simulate(1000, 3, loss=0.05, view_miss=0.02, seed=7) == first
    assert simulate(1000, 3, loss=0.05, view_miss=0.02, seed=8) != first


def test_a_run_cut_off_by_its_bounds_says_so() -> None:
    no_repair = LAN.with_(eager_fanout=0, push_pull_interval=0.0, graft_timeout=1e6)
    result = simulate(100, 2, profile=no_repair, loss=0.0, seed=0, max_seconds=5.0)
    assert not result.covered and result.reached == 2 and result.rounds == -1


def test_a_report_of_runs_cut_off_gives_no_rounds_or_times() -> None:
    no_repair = LAN.with_(eager_fanout=0, push_pull_interval=0.0, graft_timeout=1e6)
    (row,) = report([60], cells=2, loss=0.0, trials=2, profile=no_repair)
    assert row["covered"] == 0
    assert row["rounds_median"] is row["rounds_max"] is row["coverage_ms_max"] is None


def test_the_report_gives_rounds_hops_messages_and_how_relays_were_reached() -> None:
    (row,) = report([300], loss=0.05, trials=2, profile=LAN)
    assert row["nodes"] == 300 and row["covered"] == 2
    assert 1 <= row["rounds_median"] <= row["rounds_max"]
    assert 1 <= row["hops_median"] <= row["hops_max"]
    assert row["pushes_per_revocation"] <= row["messages_per_revocation"]
    assert sum(row["reached_by"].values()) == pytest.approx(1.0, abs=1e-3)  # (each share rounded to 4 places)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="relay per cell"):
        simulate(2, 3)
    with pytest.raises(ValueError, match="fractions"):
        simulate(10, 1, loss=1.0)

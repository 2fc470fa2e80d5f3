"""Partition tests on real network namespaces (keycell/testing/netns.py): three cells,
each a `keycell server` and a `keycell relay` process in its own namespace, cut by
taking veth links down. One set of cells serves the whole directory (starting them
takes about ten seconds); every test starts from a healed, fresh mesh."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keycell.testing.netns import PartitionedCells, wait_for

CELLS = ("us-east-1", "eu-west-1", "ap-southeast-1")
CUT = "ap-southeast-1"


@pytest.fixture(scope="package")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PartitionedCells]:
    # NetnsError (no `ip`, not root) fails the tests with its reason: CI has both.
    with PartitionedCells(tmp_path_factory.mktemp("netns"), CELLS, heartbeat_seconds=0.1) as started:
        yield started


@pytest.fixture
def healed(cells: PartitionedCells) -> Iterator[PartitionedCells]:
    cells.heal()
    assert wait_for(lambda: all(cells.fresh(c, 0.5) for c in CELLS), 20), "the cells did not get fresh"
    yield cells
    cells.heal()

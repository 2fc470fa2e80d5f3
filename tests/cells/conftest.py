"""Cells tests: three dev cells in this process (keycell.cells.mesh), each with a relay
and its cell agent on real loopback gRPC, and an API router on its own services."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keycell.cells.mesh import Mesh


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """Three cells, one relay each (or `relays_per_cell` from an indirect parameter)."""
    relays = getattr(request, "param", 1)
    started = Mesh(tmp_path, relays_per_cell=relays).start()
    try:
        assert started.wait_for(started.directory_complete, 15), "the cell directory did not converge"
        yield started
    finally:
        started.stop()

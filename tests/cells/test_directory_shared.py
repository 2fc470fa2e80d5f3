"""The relays of a cell in one process share its directory, so they exchange it with
the other cells once an interval between them, not once each: the directory's gossip
costs a cell the same whatever its number of relays, and the directory still converges
and stays complete."""

from __future__ import annotations

import time
from pathlib import Path

from keycell.cells.agent import CELL_TIMINGS
from keycell.cells.mesh import Mesh

RELAYS = 4


def exchanges(mesh: Mesh, cell: str) -> tuple[int, int]:
    agents = mesh.agents[cell]
    made = sum(a.counters.get("directory_exchanges", 0) for a in agents)
    shared = sum(a.counters.get("directory_shared", 0) for a in agents)
    return made, shared


def test_relays_sharing_a_directory_exchange_it_once_an_interval(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path, relays_per_cell=RELAYS).start()
    try:
        assert mesh.wait_for(mesh.directory_complete, 30), "the cell directory did not converge"
        interval = CELL_TIMINGS["local"].directory_interval
        window = 8 * interval
        before = {cell: exchanges(mesh, cell) for cell in mesh.agents}
        started = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - started
        for cell in mesh.agents:
            made = exchanges(mesh, cell)[0] - before[cell][0]
            shared = exchanges(mesh, cell)[1] - before[cell][1]
            # Exchanges are at least half an interval apart; one each would make about
            # RELAYS a directory interval (32 in this window).
            assert 1 <= made <= elapsed / (interval / 2) + 1, (cell, made)
            assert shared >= made, (cell, made, shared)  # the other relays' rounds passed
        assert mesh.directory_complete()
    finally:
        mesh.stop()

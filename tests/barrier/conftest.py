"""An unsealed cell on each ledger adapter, for the barrier and envelope suites."""

from __future__ import annotations

import pytest

from keycell.control_plane.ledger import Ledger
from keycell.testing.cells import Cell, open_cell


@pytest.fixture
def cell(ledger: Ledger) -> Cell:
    return open_cell(ledger)

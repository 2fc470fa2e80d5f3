"""Relay tests: relays on one event loop, each with its own gRPC server on a loopback
port (real streams over real sockets), over real dev cells (SQLite ledger, barrier)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keycell.relay.cell import LedgerSink
from keycell.relay.cluster import open_dev_cell

CELLS = ("a", "b", "c")


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[dict[str, LedgerSink]]:
    opened = {}
    for cell in CELLS:
        folder = tmp_path / cell
        folder.mkdir()
        opened[cell] = LedgerSink(open_dev_cell(str(folder), cell))
    yield opened
    for sink in opened.values():
        sink.close()

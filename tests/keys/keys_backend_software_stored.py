"""Wiring of the software backend persisting its keys in a ledger (a development
server's workers share keys this way): the same contract, across two instances."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger


@contextmanager
def open_backend(request: pytest.FixtureRequest, *, fips_mode: bool) -> Iterator[SoftwareKeyBackend]:
    tmp = request.getfixturevalue("tmp_path")
    store = SqliteLedger(tmp / "software-keys.db")
    backend = SoftwareKeyBackend(fips_mode=fips_mode, store=store)
    try:
        yield backend
    finally:
        backend.close()
        store.close()

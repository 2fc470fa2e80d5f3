"""Wiring of the software backend for the key-custody suites."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keycell.adapters.keys.software import SoftwareKeyBackend


@contextmanager
def open_backend(request: pytest.FixtureRequest, *, fips_mode: bool) -> Iterator[SoftwareKeyBackend]:
    backend = SoftwareKeyBackend(fips_mode=fips_mode)
    try:
        yield backend
    finally:
        backend.close()

"""Wiring of the pkcs11 backend for the key-custody suites: one throwaway SoftHSM2
token per test session, created on first use and removed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keycell.adapters.keys.pkcs11 import Pkcs11KeyBackend
from keycell.testing.key_backends import pkcs11_backend
from keycell.testing.softhsm import SoftHsmToken


def session_token(request: pytest.FixtureRequest) -> SoftHsmToken:
    """The session's SoftHSM2 token (tests/conftest.py `softhsm`)."""
    token: SoftHsmToken = request.getfixturevalue("softhsm")
    return token


@contextmanager
def open_backend(request: pytest.FixtureRequest, *, fips_mode: bool) -> Iterator[Pkcs11KeyBackend]:
    token = session_token(request)
    backend = pkcs11_backend(token, fips_mode=fips_mode)
    try:
        yield backend
    finally:
        backend.close()

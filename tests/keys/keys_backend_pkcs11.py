"""Wiring of the pkcs11 backend for the key-custody suites: one throwaway SoftHSM2
token per test session, created on first use and removed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keycell.adapters.keys.pkcs11 import Pkcs11KeyBackend
from keycell.testing.softhsm import SoftHsmToken, create_token

_token: SoftHsmToken | None = None


def session_token(request: pytest.FixtureRequest) -> SoftHsmToken:
    """The session's SoftHSM2 token (the cloudhsm wiring and the token tests share it:
    SoftHSM2 lists its tokens once per process)."""
    global _token
    if _token is None:
        _token = create_token(label="keycell-tests")
        request.config.add_cleanup(_drop_token)
    return _token


def _drop_token() -> None:
    global _token
    if _token is not None:
        _token.close()
        _token = None


@contextmanager
def open_backend(request: pytest.FixtureRequest, *, fips_mode: bool) -> Iterator[Pkcs11KeyBackend]:
    token = session_token(request)
    backend = Pkcs11KeyBackend(token.module, token.label, token.pin, fips_mode=fips_mode)
    try:
        yield backend
    finally:
        backend.close()

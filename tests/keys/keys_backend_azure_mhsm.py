"""Wiring of the Azure Managed HSM backend: the real azure-keyvault-keys SDK against the
local Managed HSM emulator over HTTPS (one emulator process per test session)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keycell.adapters.keys.azure_mhsm import AzureManagedHsmKeyBackend
from keycell.testing.azure_mhsm_server import AzureManagedHsmServer
from keycell.testing.key_backends import azure_backend

_server: AzureManagedHsmServer | None = None


def session_server(request: pytest.FixtureRequest) -> AzureManagedHsmServer:
    """The session's emulator, started on first use and stopped at session end."""
    global _server
    if _server is None:
        server = AzureManagedHsmServer().start()
        _server = server

        def stop() -> None:
            global _server
            server.stop()
            _server = None

        request.config.add_cleanup(stop)
    return _server


def new_backend(server: AzureManagedHsmServer, *, fips_mode: bool = False) -> AzureManagedHsmKeyBackend:
    return azure_backend(server, fips_mode=fips_mode)


@contextmanager
def open_backend(request: pytest.FixtureRequest, *, fips_mode: bool) -> Iterator[AzureManagedHsmKeyBackend]:
    backend = new_backend(session_server(request), fips_mode=fips_mode)
    try:
        yield backend
    finally:
        backend.close()

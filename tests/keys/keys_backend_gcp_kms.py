"""Wiring of the gcp_kms backend for the key-custody suites: the real google-cloud-kms
client over gRPC to one local Cloud KMS server (keycell.testing.gcp_kms_server) per session."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from keycell.adapters.keys.gcp_kms import GcpKmsKeyBackend
from keycell.testing.gcp_kms_server import GcpKmsServer
from keycell.testing.key_backends import gcp_backend

_server: GcpKmsServer | None = None
_lock = threading.Lock()


def kms_endpoint(request: pytest.FixtureRequest) -> str:
    """The session's server, started on first use and stopped at session end."""
    global _server
    with _lock:
        if _server is None:
            server = GcpKmsServer().start()
            request.config.add_cleanup(_stop)
            _server = server
        return _server.endpoint


def _stop() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server.stop()
            _server = None


def make_backend(endpoint: str, *, fips_mode: bool = False, key_ring: str | None = None) -> GcpKmsKeyBackend:
    return gcp_backend(endpoint, fips_mode=fips_mode, key_ring=key_ring)


@contextmanager
def open_backend(request: pytest.FixtureRequest, *, fips_mode: bool) -> Iterator[GcpKmsKeyBackend]:
    backend = make_backend(kms_endpoint(request), fips_mode=fips_mode)
    try:
        yield backend
    finally:
        backend.close()

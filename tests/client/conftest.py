"""Real `keycell server --dev` processes for the client tests: one shared (two
workers, default admission limits) and one with tight limits (one worker, so the
per-process buckets are the whole server's)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keycell.client import Client
from keycell.testing.processes import ServerProcess, keycell_server

ROOT = "kc.client-tests-root-token"


def dev_server(folder: str, *, workers: int = 2, env: dict[str, str] | None = None) -> ServerProcess:
    return keycell_server(folder, dev_root_token=ROOT, workers=workers, env=env)


@pytest.fixture(scope="session")
def cell_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = dev_server(str(tmp_path_factory.mktemp("client-cell")))
    port = server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def limited_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Per identity: one request per 5 s (a burst of 1); global: 4 a second."""
    env = {"KEYCELL_RATE_PER_IDENTITY": "0.2", "KEYCELL_RATE_GLOBAL": "4"}
    server = dev_server(str(tmp_path_factory.mktemp("limited-cell")), workers=1, env=env)
    port = server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def root_token() -> str:
    return ROOT


@pytest.fixture
def root(cell_url: str) -> Client:
    return Client(cell_url, token=ROOT)

"""One fixture, `backend`, that runs every key-custody test against each backend.

Each backend's wiring lives in `keys_backend_<name>.py` beside this file: a module
with `open_backend(request, *, fips_mode) -> ContextManager[KeyBackend]`. Servers a
backend needs (SoftHSM2 token, moto, the Azure and GCP wire-API servers) start once
per session inside that module and stop at the end (`request.config.add_cleanup`).
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest

from keycell.control_plane.keys import KeyBackend

BACKENDS = ["software", "software_stored", "pkcs11", "cloudhsm", "aws_kms", "azure_mhsm", "gcp_kms"]

OpenBackend = Callable[..., AbstractContextManager[KeyBackend]]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_backend(
    backend_name: str, request: pytest.FixtureRequest
) -> Callable[[bool], AbstractContextManager[KeyBackend]]:
    module = importlib.import_module(f"keys_backend_{backend_name}")

    def opener(fips_mode: bool = False) -> AbstractContextManager[KeyBackend]:
        return module.open_backend(request, fips_mode=fips_mode)  # type: ignore[no-any-return]

    return opener


@pytest.fixture
def backend(open_backend: Callable[[bool], AbstractContextManager[KeyBackend]]) -> Iterator[KeyBackend]:
    with open_backend(False) as opened:
        yield opened


@pytest.fixture
def key_name() -> str:
    """A fresh key name, so tests sharing a server never collide."""
    return f"t-{uuid.uuid4().hex[:16]}"

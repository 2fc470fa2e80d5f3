"""Secrets engines, one package each: its logic (`backend`), its HTTP routes and their
OpenAPI documents (`routes`). Tests mirror them under tests/engines/.

`outages` is what every engine's error guard starts from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from keycell.control_plane.barrier import SealedError
from keycell.control_plane.errors import Unavailable
from keycell.control_plane.keys import BackendUnavailableError
from keycell.control_plane.ledger import LedgerUnavailableError


@contextlib.contextmanager
def outages() -> Iterator[None]:
    """The failures below an engine that are outages, not the client's doing, as the
    API's 503s: nothing a client sends, and no outage, may surface as a 500. An engine's
    own guard wraps this with the errors of its own domain. Messages name no secret."""
    try:
        yield
    except BackendUnavailableError:
        raise Unavailable("the cell's key backend (HSM) is unavailable; retry shortly") from None
    except SealedError:
        raise Unavailable("the cell is sealed") from None
    except LedgerUnavailableError:
        raise Unavailable("the cell's ledger is unavailable; retry shortly") from None

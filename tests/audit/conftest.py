"""Cells with an auditor: a router over a fresh sqlite cell (HSM seal mode with the
software backend, so a second process opens it by itself), auditing to files."""

from __future__ import annotations

from pathlib import Path

from keycell.control_plane.router import Request, Response, Router
from keycell.functions.wiring import router_from_environment

ROOT = "kc.audit-root-token-for-tests"
CELL = "audit-cell"


def cell_env(folder: Path, audit_file: Path | None, cell: str = CELL) -> dict[str, str]:
    env = {
        "KEYCELL_LEDGER": f"sqlite://{folder / 'cell.db'}",
        "KEYCELL_KEY_BACKEND": "software",
        "KEYCELL_SOFTWARE_KEYS": f"sqlite://{folder / 'keys.db'}",
        "KEYCELL_SEAL": "hsm",
        "KEYCELL_CELL": cell,
    }
    if audit_file is not None:
        env["KEYCELL_AUDIT_FILE"] = str(audit_file)
    return env


def open_router(folder: Path, audit_file: Path | None, *, init: bool = True, cell: str = CELL) -> Router:
    """A router on the cell in `folder` (initialized with root token ROOT when `init`)."""
    router = router_from_environment(cell_env(folder, audit_file, cell))
    if init:
        router.services.seal.init(1, 1, root_token=ROOT)
        router.services.after_unseal()
    return router


def call(router: Router, method: str, path: str, data: dict[str, object] | None = None) -> Response:
    return router.handle(Request(method, path, data=data or {}, token=ROOT))

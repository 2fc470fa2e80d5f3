"""Vault's HTTP API, one module per endpoint family; `build_router` assembles them."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.router import Router


def build_router(services: Any) -> Router:
    from keycell.control_plane.routes import audit, auth, metrics, openapi, secrets, system
    from keycell.control_plane.routes import sys as seal_routes
    from keycell.control_plane.routes.identity import register as register_identity

    router = Router(services, clock=services.clock)
    seal_routes.register(router, services)
    system.register(router, services)
    auth.register(router, services)
    secrets.register(router, services)
    metrics.register(router, services)
    audit.register(router, services)
    register_identity(router, services)
    from keycell.control_plane.routes import database

    database.register(router, services)  # database/ and rotation/
    from keycell.control_plane.routes import revocations

    revocations.register(router, services)
    openapi.register(router, services)  # last: documents every route above
    return router

"""Vault's HTTP API: `build_router` assembles the routes of the core (one module per
endpoint family here) and of each engine and auth method (each package's `routes`),
at their default mounts: `secret/` (KV v2), `transit/`, `database/`, `auth/token/`,
`auth/jwt/`; and, through `mounts`, each mount enabled at sys/mounts or sys/auth."""

from __future__ import annotations

import uuid
from typing import Any

from keycell.control_plane.router import Result, Router


def with_top_level(data: dict[str, Any]) -> Result:
    """Vault's envelope with `data`'s fields copied to the top of the body as well, as
    Vault answers its older sys reads (mounts, auth methods, tune, sys/policy/:name) for
    clients that predate the envelope: hvac reads `list_mounted_secrets_engines()["kv/"]`
    and `read_mount_configuration(path)["max_lease_ttl"]` there."""
    return Result(raw={**data, **Router._envelope(str(uuid.uuid4()), Result(data=data))})


def build_router(services: Any) -> Router:
    from keycell.control_plane.auth.jwt import routes as jwt_routes
    from keycell.control_plane.auth.token import routes as token_routes
    from keycell.control_plane.engines.database import routes as database_routes
    from keycell.control_plane.engines.kv import routes as kv_routes
    from keycell.control_plane.engines.transit import routes as transit_routes
    from keycell.control_plane.routes import audit, metrics, mounts, openapi, revocations, rotation, system
    from keycell.control_plane.routes import sys as seal_routes
    from keycell.control_plane.routes.identity import register as register_identity

    router = Router(services, clock=services.clock)
    seal_routes.register(router, services)
    system.register(router, services)
    token_routes.register(router, services)
    jwt_routes.register(router, services)
    kv_routes.register(router, services.kv, "secret", getattr(services, "freshness", None))
    transit_routes.register(router, services.transit, "transit")
    metrics.register(router, services)
    audit.register(router, services)
    register_identity(router, services)
    database_routes.register(router, services)
    rotation.register(router, services)
    revocations.register(router, services)
    mounts.register(router, services)  # sys/mounts, sys/auth, and the enabled mounts' routes
    openapi.register(router, services)  # last: documents every route above
    return router

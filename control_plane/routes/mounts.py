"""sys/mounts and sys/auth (Vault's mount tables: list, enable, read, tune, disable),
and `MountedRoutes`, which gives the router each enabled mount's own routes."""

from __future__ import annotations

import threading
from typing import Any

from keycell.control_plane.mounts import AUTH, SECRETS, Mount, MountTable
from keycell.control_plane.router import Context, Operation, OperationDoc, RouteDoc, Router
from keycell.control_plane.routes.openapi import ANY_OBJECT, NO_CONTENT, STR, obj, ok

_MAX_BUILT = 512


class MountedRoutes:
    """The route set of each enabled mount, built the first time a request reaches it
    in this process and kept by the mount's uuid (a re-enabled path is a new mount; a
    disabled one is never resolved again). `router_for` is the router's `mounted`."""

    def __init__(self, services: Any, tables: dict[str, MountTable]) -> None:
        self.services = services
        self.tables = tables
        self._built: dict[str, Router] = {}
        self._lock = threading.Lock()

    def router_for(self, path: str) -> Router | None:
        if path.startswith("auth/"):
            mount, auth = self.tables[AUTH].resolve(path[len("auth/") :]), True
        else:
            mount, auth = self.tables[SECRETS].resolve(path), False
        if mount is None:
            return None
        with self._lock:
            built = self._built.get(mount.uuid)
            if built is None:
                if len(self._built) >= _MAX_BUILT:
                    self._built.clear()
                built = self._built[mount.uuid] = self._build(mount, auth)
        return built

    def _build(self, mount: Mount, auth: bool) -> Router:
        """A router holding only this mount's routes, over an engine bound to its path."""
        from keycell.control_plane.auth.approle import routes as approle_routes
        from keycell.control_plane.auth.approle.backend import AppRoleAuth
        from keycell.control_plane.auth.kubernetes import routes as kubernetes_routes
        from keycell.control_plane.auth.kubernetes.backend import KubernetesAuth
        from keycell.control_plane.engines.kv import routes as kv_routes
        from keycell.control_plane.engines.kv.backend import KvV2
        from keycell.control_plane.engines.pki import routes as pki_routes
        from keycell.control_plane.engines.pki.backend import Pki
        from keycell.control_plane.engines.transit import routes as transit_routes
        from keycell.control_plane.engines.transit.backend import Transit

        s, name = self.services, mount.name
        router = Router(s, clock=s.clock)
        if auth and mount.type == "approle":
            approle_routes.register(router, s, AppRoleAuth(s.barrier, s.tokens, mount=name, clock=s.clock))
        elif auth and mount.type == "kubernetes":
            kubernetes_routes.register(
                router, s, KubernetesAuth(s.barrier, s.tokens, mount=name, clock=s.clock)
            )
        elif not auth and mount.type == "kv":
            kv = KvV2(s.barrier, s.envelopes, mount=name, clock=s.clock)
            kv_routes.register(router, kv, name, getattr(s, "freshness", None))
        elif not auth and mount.type == "transit":
            transit_routes.register(
                router, Transit(s.barrier, s.key_backend, mount=name, clock=s.clock), name
            )
        elif not auth and mount.type == "pki":
            pki_routes.register(router, Pki(s.barrier, s.key_backend, mount=name, clock=s.clock), name)
        return router


def register(router: Router, services: Any) -> None:
    tables = {SECRETS: MountTable(services.barrier, SECRETS), AUTH: MountTable(services.barrier, AUTH)}
    router.mounted = MountedRoutes(services, tables).router_for

    for table, what in ((SECRETS, "secrets engine"), (AUTH, "auth method")):
        mounts = tables[table]

        def listing(ctx: Context, mounts: MountTable = mounts) -> dict[str, Any]:
            return {path: m.as_json() for path, m in mounts.all().items()}

        def enable(ctx: Context, mounts: MountTable = mounts) -> None:
            reserved = {seg + "/" for seg in router.static_mounts()} if mounts.table == SECRETS else set()
            mounts.enable(ctx.params["path"], ctx.data, reserved=reserved)

        def read(ctx: Context, mounts: MountTable = mounts) -> dict[str, Any]:
            return mounts.get(ctx.params["path"]).as_json()

        def disable(ctx: Context, mounts: MountTable = mounts) -> None:
            mounts.disable(ctx.params["path"])

        def tune_read(ctx: Context, mounts: MountTable = mounts) -> dict[str, Any]:
            return mounts.get(ctx.params["path"]).tune_json()

        def tune_write(ctx: Context, mounts: MountTable = mounts) -> None:
            mounts.tune(ctx.params["path"], ctx.data)

        params = {"path": f"The {what}'s mount path."}
        router.add(
            table,
            {Operation.READ: listing},
            family="sys",
            doc=RouteDoc(
                f"/{table}",
                f"Every {what} mounted, by path.",
                operations={Operation.READ: OperationDoc(f"List {what}s", responses=ok(ANY_OBJECT))},
            ),
        )
        router.add(
            table + r"/(?P<path>.+)/tune",
            {Operation.READ: tune_read, Operation.UPDATE: tune_write},
            family="sys",
            doc=RouteDoc(
                f"/{table}/{{path}}/tune",
                f"A mounted {what}'s tunables: lease TTLs, description, options.",
                params=params,
                operations={
                    Operation.READ: OperationDoc("Read the tune", responses=ok(ANY_OBJECT)),
                    Operation.UPDATE: OperationDoc("Tune the mount", body=_TUNE, responses=NO_CONTENT),
                },
            ),
        )
        router.add(
            table + r"/(?P<path>.+)",
            {Operation.READ: read, Operation.UPDATE: enable, Operation.DELETE: disable},
            family="sys",
            doc=RouteDoc(
                f"/{table}/{{path}}",
                f"Enable, read or disable a {what} at a path.",
                params=params,
                operations={
                    Operation.READ: OperationDoc("Read the mount", responses=ok(ANY_OBJECT)),
                    Operation.UPDATE: OperationDoc(
                        f"Enable a {what}", body=_ENABLE, body_required=True, responses=NO_CONTENT
                    ),
                    Operation.DELETE: OperationDoc(
                        f"Disable the {what} (its data goes with it)", responses=NO_CONTENT
                    ),
                },
            ),
        )


_TTL = {"anyOf": [{"type": "integer", "minimum": 0}, STR]}
_TUNE = obj(
    {
        "default_lease_ttl": _TTL,
        "max_lease_ttl": _TTL,
        "description": STR,
        "options": {"type": "object", "additionalProperties": STR},
    }
)
_ENABLE = obj(
    {
        "type": STR,
        "description": STR,
        "config": obj({"default_lease_ttl": _TTL, "max_lease_ttl": _TTL}),
        "options": {"type": "object", "additionalProperties": STR},
        "local": {"type": "boolean"},
        "seal_wrap": {"type": "boolean"},
    },
    ("type",),
)

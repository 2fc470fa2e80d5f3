"""sys/mounts and sys/auth (Vault's mount tables: list, enable, read, tune, disable),
and `MountedRoutes`, which gives the router each enabled mount's own routes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from keycell.control_plane.errors import PermissionDenied
from keycell.control_plane.mounts import AUTH, CORE_TYPES, SECRETS, Mount, MountTable
from keycell.control_plane.router import Context, Operation, OperationDoc, Result, RouteDoc, Router
from keycell.control_plane.routes import with_top_level
from keycell.control_plane.routes.openapi import ANY_OBJECT, NO_CONTENT, STR, obj, ok

if TYPE_CHECKING:
    from keycell.control_plane.engines.pki.backend import Pki
    from keycell.control_plane.engines.transit.backend import Transit

_MAX_BUILT = 512


class MountedRoutes:
    """The route set of each enabled mount, built the first time a request reaches it
    in this process and kept by the mount's uuid and lease TTLs (a re-enabled path is a
    new mount, a tuned one is built again with its new TTLs; a disabled one is never
    resolved again). `router_for` is the router's `mounted`."""

    def __init__(self, services: Any, tables: dict[str, MountTable]) -> None:
        self.services = services
        self.tables = tables
        self._built: dict[tuple[str, int, int], Router] = {}
        self._lock = threading.Lock()

    def router_for(self, path: str) -> Router | None:
        if path.startswith("auth/"):
            mount, auth = self.tables[AUTH].resolve(path[len("auth/") :]), True
        else:
            mount, auth = self.tables[SECRETS].resolve(path), False
        return None if mount is None else self._router(mount, auth)

    def every_router(self) -> list[Router]:
        """The route set of every enabled mount (sys/openapi documents them, as Vault's does)."""
        return [
            self._router(mount, table == AUTH)
            for table in (SECRETS, AUTH)
            for mount in self.tables[table].enabled()
        ]

    def _router(self, mount: Mount, auth: bool) -> Router:
        key = (mount.uuid, mount.default_lease_ttl, mount.max_lease_ttl)
        with self._lock:
            built = self._built.get(key)
            if built is None:
                if len(self._built) >= _MAX_BUILT:
                    self._built.clear()
                built = self._built[key] = self.build(mount, auth)
        return built

    def retire_keys(self, mount: Mount) -> None:
        """Disable the key-backend keys a secrets mount's engine holds, before its items
        are deleted (MountTable.disable): a disabled mount's keys never work again."""
        engine = self._key_engine(mount)
        if engine is not None:
            engine.retire_keys()

    def _key_engine(self, mount: Mount) -> Transit | Pki | None:
        """The engine of a secrets mount whose keys the key backend holds (transit, PKI),
        bound to the mount's path; None for any other type."""
        from keycell.control_plane.engines.pki.backend import Pki
        from keycell.control_plane.engines.transit.backend import Transit

        s = self.services
        if mount.type == "transit":
            return Transit(s.barrier, s.key_backend, mount=mount.name, clock=s.clock)
        if mount.type == "pki":
            return Pki(s.barrier, s.key_backend, mount=mount.name, clock=s.clock)
        return None

    def build(self, mount: Mount, auth: bool) -> Router:
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

        s, name = self.services, mount.name
        ttls = (mount.default_lease_ttl, mount.max_lease_ttl)
        router = Router(s, clock=s.clock)
        if auth and mount.type == "approle":
            approle = AppRoleAuth(s.barrier, s.tokens, mount=name, clock=s.clock, lease_ttls=ttls)
            approle_routes.register(router, s, approle)
        elif auth and mount.type == "kubernetes":
            kubernetes = KubernetesAuth(s.barrier, s.tokens, mount=name, clock=s.clock, lease_ttls=ttls)
            kubernetes_routes.register(router, s, kubernetes)
        elif not auth and mount.type == "kv":
            kv = KvV2(s.barrier, s.envelopes, mount=name, clock=s.clock)
            kv_routes.register(router, kv, name, getattr(s, "freshness", None))
        elif not auth and (engine := self._key_engine(mount)) is not None:
            if isinstance(engine, Pki):
                pki_routes.register(router, engine, name)
            else:
                transit_routes.register(router, engine, name)
        return router


def register(router: Router, services: Any) -> None:
    tables = {SECRETS: MountTable(services.barrier, SECRETS), AUTH: MountTable(services.barrier, AUTH)}
    mounted = MountedRoutes(services, tables)
    router.mounted, router.mounted_routers = mounted.router_for, mounted.every_router
    _register_ui_mounts(router, services, tables)

    for table, what in ((SECRETS, "secrets engine"), (AUTH, "auth method")):
        mounts = tables[table]

        def listing(ctx: Context, mounts: MountTable = mounts) -> Result:
            return with_top_level({path: _row(m, mounts.table) for path, m in mounts.all().items()})

        def enable(ctx: Context, mounts: MountTable = mounts) -> None:
            reserved = {seg + "/" for seg in router.static_mounts()} if mounts.table == SECRETS else set()
            mounts.enable(ctx.params["path"], ctx.data, reserved=reserved)

        def read(ctx: Context, mounts: MountTable = mounts) -> Result:
            return with_top_level(_row(mounts.get(ctx.params["path"]), mounts.table))

        def disable(ctx: Context, mounts: MountTable = mounts) -> None:
            mounts.disable(ctx.params["path"], retire=mounted.retire_keys)

        def tune_read(ctx: Context, mounts: MountTable = mounts) -> Result:
            mount = mounts.get(ctx.params["path"])
            tune = mount.tune_json()
            if mounts.table == AUTH:
                tune["token_type"] = _TOKEN_TYPE
            return with_top_level(tune)

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


# The tokens an auth method issues: service tokens (batch tokens do not exist here).
_TOKEN_TYPE = "default-service"  # noqa: S105 - the name of a token type, not a secret


def _row(mount: Mount, table: str) -> dict[str, Any]:
    """A mount as sys/mounts or sys/auth lists it; an auth method's config also names the
    type of token it issues, and its options are an empty object when it has none."""
    row = mount.as_json()
    if table == AUTH:
        row["config"]["token_type"] = _TOKEN_TYPE
        row["options"] = row["options"] if mount.type in CORE_TYPES else row["options"] or {}
    return row


def _longest_mount(table: MountTable, path: str) -> Mount | None:
    """The mount, built-in or enabled, whose path is the longest prefix of `path` (which
    ends with "/"): `secret/` for "secret/app/db/", `kv-apps/` for "kv-apps/"."""
    rows = table.all()
    for mount_path in sorted(rows, key=len, reverse=True):
        if path.startswith(mount_path):
            return rows[mount_path]
    return None


def _register_ui_mounts(router: Router, services: Any, tables: dict[str, MountTable]) -> None:
    """sys/internal/ui/mounts/:path: which mount serves a path, and its type and options.
    Vault's CLI (`kv get`) and Vault Agent's templates ask it to tell KV version 2 from
    version 1 before they read. Any token may ask about a mount it has some capability
    under (as Vault answers); the answer names the mount, never a secret."""

    def ui_mount(ctx: Context) -> dict[str, Any]:
        token = ctx.request.token
        if not token:
            raise PermissionDenied("permission denied: no token; send X-Vault-Token")
        entry = services.tokens.lookup(token)  # not a use: a use-limited token keeps its uses
        asked = ctx.params["path"].strip("/") + "/"
        if asked.startswith("auth/"):
            mount, prefix = _longest_mount(tables[AUTH], asked[len("auth/") :]), "auth/"
        else:
            mount, prefix = _longest_mount(tables[SECRETS], asked), ""
        if mount is None or not services.policies.acl_for(entry.policies).reaches_under(prefix + mount.path):
            # the same answer for "no such mount" and "not yours": a token learns nothing
            raise PermissionDenied(f"permission denied: no mount the token may use at {asked!r}")
        return {**_row(mount, AUTH if prefix else SECRETS), "path": prefix + mount.path}

    router.add(
        r"sys/internal/ui/mounts/(?P<path>.+)",
        {Operation.READ: ui_mount},
        authenticated=False,  # the token is checked above, against the mount, not this path
        family="sys",
        pure_reads=True,
        doc=RouteDoc(
            "/sys/internal/ui/mounts/{path}",
            "The mount that serves a path: type, options (KV's version), accessor.",
            params={"path": "A path under a mount (kv-apps/app/db); may span segments."},
            operations={Operation.READ: OperationDoc("Find a path's mount", responses=ok(ANY_OBJECT))},
            token_accepted=True,
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

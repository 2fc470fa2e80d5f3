"""The rotation engine at rotation/ (Keycell's own: enrol, read, rotate, revoke, sweep)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.rotation import Stage, sweep, validate_name
from keycell.control_plane.router import (
    Context,
    Operation,
    OperationDoc,
    RouteDoc,
    Router,
    add_refusing_bad_input,
    field_int,
)
from keycell.control_plane.routes.openapi import (
    ANY_OBJECT,
    DURATION,
    KEYS,
    NO_CONTENT,
    STR,
    obj,
    ok,
)
from keycell.control_plane.wrapping import parse_duration

_NAME = {"name": "A connection, role or secret name."}


_SPANS = {"name": "A rotated secret's name; it may span several segments (`team/app/db`)."}


def _doc(
    path: str, summary: str, ops: dict[Operation, OperationDoc], params: dict[str, str] | None = None
) -> RouteDoc:
    return RouteDoc(path, summary, params=params if params is not None else _NAME, operations=ops)


def register(router: Router, services: Any) -> None:
    store, rotator = services.rotation_store, services.rotator

    def enrol(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        target = d.get("target", "generic")
        params = d.get("params") or {}
        if not isinstance(target, str) or not isinstance(params, dict):
            raise InvalidRequest("'target' is a string and 'params' an object")
        interval = parse_duration(d.get("interval", 0) or 0)
        created = rotator.enroll(store, ctx.params["name"], target=target, params=params, interval=interval)
        return {"created": created}

    def read(ctx: Context) -> dict[str, Any]:
        s = store.state(ctx.params["name"])
        return {
            "target": s.target,
            "params": s.params,
            "current_version": s.current,
            "previous_version": s.previous,
            "pending_version": s.pending,
            "in_flight": s.in_flight,
            "progress": s.progress,
            "rotations": s.rotations,
            "interval": s.interval,
            "next_due": s.next_due,
            "last_rotated": s.last_rotated,
            "revoked_versions": list(s.revoked),
        }

    def creds(ctx: Context) -> dict[str, Any]:
        name = validate_name(ctx.params["name"])
        stage = str(ctx.request.query.get("stage", "CURRENT")).upper()
        if stage not in ("CURRENT", "PREVIOUS"):
            raise InvalidRequest("stage is CURRENT or PREVIOUS")
        s = store.state(name)
        version = s.current if stage == "CURRENT" else s.previous
        if version is None:
            raise InvalidRequest(f"secret {name!r} has no {stage} version")
        return {**store.value(name, version), "_version": version, "_stage": stage}

    def rotate(ctx: Context) -> dict[str, Any]:
        token = ctx.data.get("token")
        return rotator.rotate(ctx.params["name"], token).to_dict()  # type: ignore[no-any-return]

    def revoke(ctx: Context) -> None:
        stage = ctx.data.get("stage", "PREVIOUS")
        if stage not in ("CURRENT", "PREVIOUS", "PENDING"):
            raise InvalidRequest("stage is CURRENT, PREVIOUS or PENDING")
        rotator.revoke(ctx.params["name"], Stage(stage))

    def list_names(ctx: Context) -> dict[str, Any]:
        prefix = ctx.params.get("name", "")
        return {"keys": list(store.names(prefix))}

    def run_sweep(ctx: Context) -> dict[str, Any]:
        window = field_int(ctx.data, "window", 60) or 0
        if not 0 <= window <= 3600:
            raise InvalidRequest("window is 0 to 3600 seconds")
        limit = field_int(ctx.data, "limit", 1000) or 1
        if not 1 <= limit <= 10000:
            raise InvalidRequest("limit is 1 to 10000")
        prefix = ctx.data.get("prefix", "")
        if not isinstance(prefix, str):
            raise InvalidRequest("prefix is a string")
        full = ctx.data.get("full", False)
        if not isinstance(full, bool):
            raise InvalidRequest("full is true or false")
        return sweep(
            rotator, store, services.clock(), window=window, prefix=prefix, limit=limit, full=full
        ).to_dict()

    name = r"(?P<name>.+)"
    add_refusing_bad_input(
        router,
        rf"rotation/secrets/{name}",
        {
            Operation.UPDATE: enrol,
            Operation.READ: read,
            Operation.DELETE: lambda ctx: store.delete(validate_name(ctx.params["name"])),
            Operation.LIST: list_names,
        },
        family="rotation",
        doc=_doc(
            "/rotation/secrets/{name}",
            "A rotated secret.",
            {
                Operation.UPDATE: OperationDoc(
                    "Enrol a credential: generate, set and test its first value",
                    body=obj({"target": STR, "params": ANY_OBJECT, "interval": DURATION}),
                    responses=ok(obj({"created": {"type": "boolean"}})),
                ),
                Operation.READ: OperationDoc("Its stages and schedule (no values)", responses=ok(ANY_OBJECT)),
                Operation.DELETE: OperationDoc(
                    "Stop managing it (the target is untouched)", responses=NO_CONTENT
                ),
                Operation.LIST: OperationDoc("Names under a prefix", responses=ok(KEYS)),
            },
            _SPANS,
        ),
    )
    add_refusing_bad_input(
        router,
        rf"rotation/creds/{name}",
        {Operation.READ: creds},
        family="rotation",
        doc=_doc(
            "/rotation/creds/{name}",
            "The value a client should use now.",
            {
                Operation.READ: OperationDoc(
                    "The CURRENT (or ?stage=PREVIOUS) value", query={"stage": STR}, responses=ok(ANY_OBJECT)
                )
            },
            _SPANS,
        ),
    )
    add_refusing_bad_input(
        router,
        rf"rotation/rotate/{name}",
        {Operation.UPDATE: rotate},
        family="rotation",
        doc=_doc(
            "/rotation/rotate/{name}",
            "Rotate now.",
            {
                Operation.UPDATE: OperationDoc(
                    "Run (or resume) a rotation; the same token rotates once",
                    body=obj({"token": STR}),
                    responses=ok(ANY_OBJECT),
                )
            },
            _SPANS,
        ),
    )
    add_refusing_bad_input(
        router,
        rf"rotation/revoke/{name}",
        {Operation.UPDATE: revoke},
        family="rotation",
        doc=_doc(
            "/rotation/revoke/{name}",
            "Revoke a stage's credential on its target.",
            {
                Operation.UPDATE: OperationDoc(
                    "Make it stop working now", body=obj({"stage": STR}), responses=NO_CONTENT
                )
            },
            _SPANS,
        ),
    )
    add_refusing_bad_input(
        router,
        r"rotation/sweep",
        {Operation.UPDATE: run_sweep},
        family="rotation",
        doc=RouteDoc(
            "/rotation/sweep",
            "Rotate what is due, spread across a splay window.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Rotate every due secret whose splay slot has come",
                    body=obj({"window": {"type": "integer"}, "prefix": STR, "limit": {"type": "integer"}}),
                    responses=ok(ANY_OBJECT),
                )
            },
        ),
    )

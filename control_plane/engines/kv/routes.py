"""KV v2's HTTP routes (Vault's paths under a KV mount: data, metadata, delete, undelete, destroy, subkeys, config)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.freshness import enforce
from keycell.control_plane.router import Context, Operation, OperationDoc, RouteDoc, Router
from keycell.control_plane.routes.openapi import (
    ANY_OBJECT,
    BOOL,
    DURATION,
    INT,
    KEYS,
    NO_CONTENT,
    RFC3339,
    STR,
    nullable,
    obj,
    ok,
)


def register(router: Router, kv: Any, mount: str, freshness: Any = None) -> None:
    def guard(ctx: Context) -> dict[str, Any] | None:
        """The mount's revocation freshness bound (issue 18): checked before any work.
        The mount settings it read, for a write of the same request to reuse (None when
        there was no check)."""
        if freshness is None or ctx.entry is None:
            return None
        config: dict[str, Any] = kv.mount_config()
        enforce(freshness, kv.stale_bound(config), ctx.entry.cell, f"{mount}/")
        return config

    def options(ctx: Context) -> dict[str, Any]:
        opts = ctx.data.get("options") or {}
        if not isinstance(opts, dict):
            raise InvalidRequest("'options' must be a map")
        return opts

    def data_of(ctx: Context) -> Any:
        if "data" not in ctx.data:
            raise InvalidRequest("no data provided")
        return ctx.data["data"]

    def read(ctx: Context) -> dict[str, Any]:
        guard(ctx)
        return kv.read(ctx.params["path"], ctx.request.query.get("version"))  # type: ignore[no-any-return]

    def write(ctx: Context) -> dict[str, Any]:
        config = guard(ctx)
        return kv.write(ctx.params["path"], data_of(ctx), cas=options(ctx).get("cas"), config=config)  # type: ignore[no-any-return]

    def patch(ctx: Context) -> dict[str, Any]:
        config = guard(ctx)
        return kv.patch(ctx.params["path"], data_of(ctx), cas=options(ctx).get("cas"), config=config)  # type: ignore[no-any-return]

    def delete_latest(ctx: Context) -> None:
        kv.delete_latest(ctx.params["path"])

    def delete_versions(ctx: Context) -> None:
        kv.delete_versions(ctx.params["path"], ctx.data.get("versions"))

    def undelete_versions(ctx: Context) -> None:
        kv.undelete_versions(ctx.params["path"], ctx.data.get("versions"))

    def destroy_versions(ctx: Context) -> None:
        kv.destroy_versions(ctx.params["path"], ctx.data.get("versions"))

    def metadata_args(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        return {
            "max_versions": d.get("max_versions"),
            "cas_required": d.get("cas_required"),
            "delete_version_after": d.get("delete_version_after"),
            "custom_metadata": d.get("custom_metadata"),
            "metadata_cas_required": d.get("metadata_cas_required"),
            "metadata_cas": d.get("metadata_cas"),
        }

    def read_metadata(ctx: Context) -> dict[str, Any]:
        return kv.read_metadata(ctx.params["path"])  # type: ignore[no-any-return]

    def write_metadata(ctx: Context) -> None:
        kv.write_metadata(ctx.params["path"], **metadata_args(ctx))

    def patch_metadata(ctx: Context) -> None:
        kv.patch_metadata(ctx.params["path"], **metadata_args(ctx))

    def delete_metadata(ctx: Context) -> None:
        kv.delete_metadata(ctx.params["path"])

    def list_metadata(ctx: Context) -> dict[str, Any]:
        return kv.list(ctx.params.get("path", ""))  # type: ignore[no-any-return]

    def read_config(ctx: Context) -> dict[str, Any]:
        return kv.read_config()  # type: ignore[no-any-return]

    def write_config(ctx: Context) -> None:
        d = ctx.data
        kv.write_config(
            d.get("max_versions"),
            d.get("cas_required"),
            d.get("delete_version_after"),
            d,
            metadata_cas_required=d.get("metadata_cas_required"),
        )

    def data_exists(ctx: Context) -> Operation:
        try:
            kv.read_metadata(ctx.params["path"])
        except NotFound:
            return Operation.CREATE
        return Operation.UPDATE

    def kv_doc(area: str, summary: str, operations: dict[Operation, OperationDoc]) -> RouteDoc:
        return RouteDoc(
            f"/{mount}/{area}/{{path}}",
            summary,
            params={"path": _KV_PATH},
            param_schemas={"path": _KV_SEGMENT},
            operations=operations,
        )

    versions_body = obj({"versions": _VERSIONS}, ("versions",))
    path = r"(?P<path>.+)"
    router.add(
        rf"{mount}/config",
        {Operation.READ: read_config, Operation.UPDATE: write_config},
        family="kv",
        pure_reads=True,
        doc=RouteDoc(
            f"/{mount}/config",
            "KV v2 mount settings.",
            operations={
                Operation.READ: OperationDoc("Read the KV settings", responses=ok(_KV_CONFIG)),
                Operation.UPDATE: OperationDoc(
                    "Change the KV settings", body=_KV_CONFIG_REQUEST, responses=NO_CONTENT
                ),
            },
        ),
    )
    router.add(
        rf"{mount}/data/{path}",
        {
            Operation.READ: read,
            Operation.UPDATE: write,
            Operation.PATCH: patch,
            Operation.DELETE: delete_latest,
        },
        family="kv",
        pure_reads=True,
        write_capability=data_exists,
        doc=kv_doc(
            "data",
            "A KV v2 secret's versions.",
            {
                Operation.READ: OperationDoc(
                    "Read a secret version",
                    "A deleted or destroyed version answers 404 with its metadata.",
                    query={"version": {"type": "integer", "minimum": 0}},
                    responses=ok(
                        obj({"data": nullable(ANY_OBJECT), "metadata": _VERSION}, ("data", "metadata"))
                    ),
                ),
                Operation.UPDATE: OperationDoc(
                    "Write a new version",
                    "`options.cas`: 0 writes only if the secret does not exist, n only if n is current.",
                    body=_KV_WRITE,
                    body_required=True,
                    responses=ok(_VERSION),
                ),
                Operation.PATCH: OperationDoc(
                    "Patch the current version (JSON merge patch)",
                    body=_KV_WRITE,
                    body_required=True,
                    responses=ok(_VERSION),
                ),
                Operation.DELETE: OperationDoc("Soft-delete the current version", responses=NO_CONTENT),
            },
        ),
    )
    router.add(
        rf"{mount}/delete/{path}",
        {Operation.UPDATE: delete_versions},
        family="kv",
        pure_reads=True,
        doc=kv_doc(
            "delete",
            "Soft-delete versions.",
            {Operation.UPDATE: OperationDoc("Delete versions", body=versions_body, responses=NO_CONTENT)},
        ),
    )
    router.add(
        rf"{mount}/undelete/{path}",
        {Operation.UPDATE: undelete_versions},
        family="kv",
        pure_reads=True,
        doc=kv_doc(
            "undelete",
            "Undelete versions.",
            {Operation.UPDATE: OperationDoc("Undelete versions", body=versions_body, responses=NO_CONTENT)},
        ),
    )
    router.add(
        rf"{mount}/destroy/{path}",
        {Operation.UPDATE: destroy_versions},
        family="kv",
        pure_reads=True,
        doc=kv_doc(
            "destroy",
            "Destroy versions for good.",
            {Operation.UPDATE: OperationDoc("Destroy versions", body=versions_body, responses=NO_CONTENT)},
        ),
    )
    router.add(
        rf"{mount}/metadata/?",
        {Operation.LIST: list_metadata},
        family="kv",
        pure_reads=True,
        doc=RouteDoc(
            f"/{mount}/metadata",
            "Top-level secrets.",
            operations={Operation.LIST: OperationDoc("List secrets at the top", responses=ok(KEYS))},
        ),
    )
    router.add(
        rf"{mount}/metadata/{path}",
        {
            Operation.READ: read_metadata,
            Operation.UPDATE: write_metadata,
            Operation.PATCH: patch_metadata,
            Operation.DELETE: delete_metadata,
            Operation.LIST: list_metadata,
        },
        family="kv",
        pure_reads=True,
        doc=kv_doc(
            "metadata",
            "A KV v2 secret's metadata and settings.",
            {
                Operation.READ: OperationDoc("Read a secret's metadata", responses=ok(_METADATA)),
                Operation.LIST: OperationDoc("List secrets under a folder", responses=ok(KEYS)),
                Operation.UPDATE: OperationDoc(
                    "Change a secret's settings", body=_METADATA_REQUEST, responses=NO_CONTENT
                ),
                Operation.PATCH: OperationDoc(
                    "Patch a secret's settings", body=_METADATA_REQUEST, responses=NO_CONTENT
                ),
                Operation.DELETE: OperationDoc("Delete the secret, every version", responses=NO_CONTENT),
            },
        ),
    )


_KV_PATH = (
    "The secret's path below the mount. It may span segments (`app/db`): send it unescaped, "
    "`/` included; OpenAPI cannot express that, so generated clients see one segment."
)


# One segment of a secret path (the note above says more); Vault allows any printable text.
_KV_SEGMENT = {"type": "string", "pattern": r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$"}


_VERSIONS = {"type": "array", "items": {"type": "integer", "minimum": 1}}


_VERSION = obj(
    {
        "created_time": RFC3339,
        "custom_metadata": nullable({"type": "object", "additionalProperties": STR}),
        "deletion_time": STR,
        "destroyed": BOOL,
        "version": INT,
    },
    ("created_time", "deletion_time", "destroyed", "version"),
)


_KV_WRITE = obj(
    {"data": ANY_OBJECT, "options": obj({"cas": {"type": "integer", "minimum": 0}})},
    ("data",),
)


_KV_CONFIG = obj(
    {"cas_required": BOOL, "delete_version_after": STR, "max_versions": INT},
    ("cas_required", "delete_version_after", "max_versions"),
)


_KV_CONFIG_REQUEST = obj(
    {
        "max_versions": {"type": "integer", "minimum": 0},
        "cas_required": BOOL,
        "metadata_cas_required": BOOL,
        "delete_version_after": DURATION,
    }
)


_METADATA = obj(
    {
        "cas_required": BOOL,
        "created_time": RFC3339,
        "current_version": INT,
        "current_metadata_version": INT,
        "metadata_cas_required": BOOL,
        "custom_metadata": nullable({"type": "object", "additionalProperties": STR}),
        "delete_version_after": STR,
        "max_versions": INT,
        "oldest_version": INT,
        "updated_time": RFC3339,
        "versions": {
            "type": "object",
            "additionalProperties": obj(
                {"created_time": RFC3339, "deletion_time": STR, "destroyed": BOOL},
                ("created_time", "deletion_time", "destroyed"),
            ),
        },
    },
    ("cas_required", "created_time", "current_version", "max_versions", "oldest_version", "versions"),
)


_METADATA_REQUEST = obj(
    {
        "max_versions": {"type": "integer", "minimum": 0},
        "cas_required": BOOL,
        "delete_version_after": DURATION,
        "custom_metadata": {"type": "object", "additionalProperties": STR},
        "metadata_cas_required": BOOL,
        "metadata_cas": {"type": "integer", "minimum": 0},
    }
)

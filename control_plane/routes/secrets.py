"""Secrets engines: KV v2 at secret/, Transit at transit/."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.router import Context, Operation, Router


def register(router: Router, services: Any) -> None:
    register_kv(router, services.kv, "secret")
    register_transit(router, services.transit, "transit")


def register_kv(router: Router, kv: Any, mount: str) -> None:
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
        return kv.read(ctx.params["path"], ctx.request.query.get("version"))  # type: ignore[no-any-return]

    def write(ctx: Context) -> dict[str, Any]:
        return kv.write(ctx.params["path"], data_of(ctx), cas=options(ctx).get("cas"))  # type: ignore[no-any-return]

    def patch(ctx: Context) -> dict[str, Any]:
        return kv.patch(ctx.params["path"], data_of(ctx), cas=options(ctx).get("cas"))  # type: ignore[no-any-return]

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
        kv.write_config(d.get("max_versions"), d.get("cas_required"), d.get("delete_version_after"))

    def data_exists(ctx: Context) -> Operation:
        try:
            kv.read_metadata(ctx.params["path"])
        except NotFound:
            return Operation.CREATE
        return Operation.UPDATE

    path = r"(?P<path>.+)"
    router.add(rf"{mount}/config", {Operation.READ: read_config, Operation.UPDATE: write_config}, family="kv")
    router.add(
        rf"{mount}/data/{path}",
        {
            Operation.READ: read,
            Operation.UPDATE: write,
            Operation.PATCH: patch,
            Operation.DELETE: delete_latest,
        },
        family="kv",
        write_capability=data_exists,
    )
    router.add(rf"{mount}/delete/{path}", {Operation.UPDATE: delete_versions}, family="kv")
    router.add(rf"{mount}/undelete/{path}", {Operation.UPDATE: undelete_versions}, family="kv")
    router.add(rf"{mount}/destroy/{path}", {Operation.UPDATE: destroy_versions}, family="kv")
    router.add(rf"{mount}/metadata/?", {Operation.LIST: list_metadata}, family="kv")
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
    )


def register_transit(router: Router, transit: Any, mount: str) -> None:
    def name(ctx: Context) -> str:
        return ctx.params["name"]

    def create_key(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        return transit.create_key(  # type: ignore[no-any-return]
            name(ctx),
            d.get("type") or "aes256-gcm96",
            derived=d.get("derived", False),
            convergent_encryption=d.get("convergent_encryption", False),
            exportable=d.get("exportable", False),
            allow_plaintext_backup=d.get("allow_plaintext_backup", False),
        )

    def read_key(ctx: Context) -> dict[str, Any]:
        return transit.read_key(name(ctx))  # type: ignore[no-any-return]

    def list_keys(ctx: Context) -> dict[str, Any]:
        return transit.list_keys()  # type: ignore[no-any-return]

    def delete_key(ctx: Context) -> None:
        transit.delete_key(name(ctx))

    def rotate(ctx: Context) -> dict[str, Any]:
        return transit.rotate(name(ctx))  # type: ignore[no-any-return]

    def config(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        return transit.update_config(  # type: ignore[no-any-return]
            name(ctx),
            d.get("min_decryption_version"),
            d.get("min_encryption_version"),
            d.get("deletion_allowed"),
            exportable=d.get("exportable"),
            allow_plaintext_backup=d.get("allow_plaintext_backup"),
        )

    def may_create(ctx: Context) -> bool:
        return bool(ctx.acl is not None and ctx.acl.allows(ctx.request.path, "create"))

    def encrypt(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        if "batch_input" in d:
            return transit.encrypt_batch(  # type: ignore[no-any-return]
                name(ctx),
                d["batch_input"],
                type=d.get("type") or "aes256-gcm96",
                create_missing=may_create(ctx),
            )
        return transit.encrypt(  # type: ignore[no-any-return]
            name(ctx),
            d.get("plaintext"),
            context_b64=d.get("context"),
            key_version=d.get("key_version"),
            type=d.get("type") or "aes256-gcm96",
            create_missing=may_create(ctx),
        )

    def decrypt(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        if "batch_input" in d:
            return transit.decrypt_batch(name(ctx), d["batch_input"])  # type: ignore[no-any-return]
        return transit.decrypt(name(ctx), d.get("ciphertext"), context_b64=d.get("context"))  # type: ignore[no-any-return]

    def rewrap(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        return transit.rewrap(  # type: ignore[no-any-return]
            name(ctx), d.get("ciphertext"), d.get("context"), key_version=d.get("key_version")
        )

    def sign(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        return transit.sign(  # type: ignore[no-any-return]
            name(ctx),
            d.get("input"),
            key_version=d.get("key_version"),
            hash_algorithm=ctx.params.get("hash") or d.get("hash_algorithm") or "sha2-256",
            prehashed=d.get("prehashed", False),
            signature_algorithm=d.get("signature_algorithm"),
            marshaling_algorithm=d.get("marshaling_algorithm") or "asn1",
        )

    def verify(ctx: Context) -> dict[str, Any]:
        d = ctx.data
        return transit.verify(  # type: ignore[no-any-return]
            name(ctx),
            d.get("input"),
            d.get("signature"),
            hash_algorithm=ctx.params.get("hash") or d.get("hash_algorithm") or "sha2-256",
            prehashed=d.get("prehashed", False),
            signature_algorithm=d.get("signature_algorithm"),
            marshaling_algorithm=d.get("marshaling_algorithm") or "asn1",
        )

    def encrypt_capability(ctx: Context) -> Operation:
        return Operation.UPDATE if transit.key_exists(name(ctx)) else Operation.CREATE

    key = r"(?P<name>[^/]+)"
    hash_part = r"(?:/(?P<hash>sha2-[0-9]+))?"
    router.add(rf"{mount}/keys/?", {Operation.LIST: list_keys}, family="transit")
    router.add(
        rf"{mount}/keys/{key}",
        {Operation.UPDATE: create_key, Operation.READ: read_key, Operation.DELETE: delete_key},
        family="transit",
    )
    router.add(rf"{mount}/keys/{key}/rotate", {Operation.UPDATE: rotate}, family="transit")
    router.add(rf"{mount}/keys/{key}/config", {Operation.UPDATE: config}, family="transit")
    router.add(
        rf"{mount}/encrypt/{key}",
        {Operation.UPDATE: encrypt},
        family="transit",
        write_capability=encrypt_capability,
    )
    router.add(rf"{mount}/decrypt/{key}", {Operation.UPDATE: decrypt}, family="transit")
    router.add(rf"{mount}/rewrap/{key}", {Operation.UPDATE: rewrap}, family="transit")
    router.add(rf"{mount}/sign/{key}{hash_part}", {Operation.UPDATE: sign}, family="transit")
    router.add(rf"{mount}/verify/{key}{hash_part}", {Operation.UPDATE: verify}, family="transit")

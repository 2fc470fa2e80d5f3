"""Transit's HTTP routes (Vault's paths under a transit mount: keys, encrypt, decrypt, rewrap, datakey, sign, verify, hmac)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.engines.transit.backend import MAX_NAME_CHARS
from keycell.control_plane.router import Context, Operation, OperationDoc, RouteDoc, Router
from keycell.control_plane.routes.openapi import (
    ANY_OBJECT,
    BOOL,
    INT,
    KEYS,
    NO_CONTENT,
    STR,
    obj,
    ok,
)


def register(router: Router, transit: Any, mount: str) -> None:
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

    def transit_doc(path: str, summary: str, operations: dict[Operation, OperationDoc]) -> RouteDoc:
        more = (f"/{mount}/{path}/{{name}}/{{hash}}",) if path in ("sign", "verify") else ()
        return RouteDoc(
            f"/{mount}/{path}/{{name}}" if "/" not in path else f"/{mount}/{path}",
            summary,
            params={"name": "The key's name.", "hash": "The hash algorithm (sha2-256)."},
            param_schemas={"name": _KEY_NAME, "hash": {"type": "string", "enum": ["sha2-256"]}},
            operations=operations,
            more_paths=more,
        )

    key = r"(?P<name>[^/]+)"
    hash_part = r"(?:/(?P<hash>sha2-[0-9]+))?"
    router.add(
        rf"{mount}/keys/?",
        {Operation.LIST: list_keys},
        family="transit",
        doc=RouteDoc(
            f"/{mount}/keys",
            "Transit keys.",
            operations={Operation.LIST: OperationDoc("List transit keys", responses=ok(KEYS))},
        ),
    )
    router.add(
        rf"{mount}/keys/{key}",
        {Operation.UPDATE: create_key, Operation.READ: read_key, Operation.DELETE: delete_key},
        family="transit",
        doc=transit_doc(
            "keys",
            "A transit key (material in the cell's key backend, never exported).",
            {
                Operation.UPDATE: OperationDoc("Create a key", body=_KEY_CREATE, responses=ok(_KEY)),
                Operation.READ: OperationDoc("Read a key", responses=ok(_KEY)),
                Operation.DELETE: OperationDoc("Delete a key (needs deletion_allowed)", responses=NO_CONTENT),
            },
        ),
    )
    router.add(
        rf"{mount}/keys/{key}/rotate",
        {Operation.UPDATE: rotate},
        family="transit",
        doc=transit_doc(
            "keys/{name}/rotate",
            "Key rotation.",
            {Operation.UPDATE: OperationDoc("Rotate a key", responses=ok(_KEY))},
        ),
    )
    router.add(
        rf"{mount}/keys/{key}/config",
        {Operation.UPDATE: config},
        family="transit",
        doc=transit_doc(
            "keys/{name}/config",
            "Key settings.",
            {Operation.UPDATE: OperationDoc("Configure a key", body=_KEY_CONFIG, responses=ok(_KEY))},
        ),
    )
    router.add(
        rf"{mount}/encrypt/{key}",
        {Operation.UPDATE: encrypt},
        family="transit",
        write_capability=encrypt_capability,
        doc=transit_doc(
            "encrypt",
            "Encryption.",
            {
                Operation.UPDATE: OperationDoc(
                    "Encrypt (one plaintext or a batch)",
                    "A missing key is created when the caller may create it.",
                    body=_ENCRYPT,
                    body_required=True,
                    responses=ok({"anyOf": [_CIPHERTEXT, _batch(_CIPHERTEXT)]}),
                )
            },
        ),
    )
    router.add(
        rf"{mount}/decrypt/{key}",
        {Operation.UPDATE: decrypt},
        family="transit",
        doc=transit_doc(
            "decrypt",
            "Decryption.",
            {
                Operation.UPDATE: OperationDoc(
                    "Decrypt (one ciphertext or a batch)",
                    body=_DECRYPT,
                    body_required=True,
                    responses=ok({"anyOf": [_PLAINTEXT, _batch(_PLAINTEXT)]}),
                )
            },
        ),
    )
    router.add(
        rf"{mount}/rewrap/{key}",
        {Operation.UPDATE: rewrap},
        family="transit",
        doc=transit_doc(
            "rewrap",
            "Re-encryption under the latest key version.",
            {
                Operation.UPDATE: OperationDoc(
                    "Rewrap a ciphertext",
                    body=obj({"ciphertext": STR, "context": STR, "key_version": INT}, ("ciphertext",)),
                    body_required=True,
                    responses=ok(_CIPHERTEXT),
                )
            },
        ),
    )
    router.add(
        rf"{mount}/sign/{key}{hash_part}",
        {Operation.UPDATE: sign},
        family="transit",
        doc=transit_doc(
            "sign",
            "Signing.",
            {
                Operation.UPDATE: OperationDoc(
                    "Sign (ECDSA P-256 or RSA-3072 keys)",
                    body=_SIGN,
                    body_required=True,
                    responses=ok(obj({"signature": STR, "key_version": INT}, ("signature", "key_version"))),
                )
            },
        ),
    )
    router.add(
        rf"{mount}/verify/{key}{hash_part}",
        {Operation.UPDATE: verify},
        family="transit",
        doc=transit_doc(
            "verify",
            "Signature verification.",
            {
                Operation.UPDATE: OperationDoc(
                    "Verify a signature",
                    body=obj({**_SIGN["properties"], "signature": STR}, ("input", "signature")),
                    body_required=True,
                    responses=ok(obj({"valid": BOOL}, ("valid",))),
                )
            },
        ),
    )


_KEY_NAME = {"type": "string", "pattern": rf"^[A-Za-z0-9][A-Za-z0-9-]{{0,{MAX_NAME_CHARS - 1}}}$"}


_KEY_TYPE = {"type": "string", "enum": ["aes256-gcm96", "ecdsa-p256", "rsa-3072"]}


_KEY_CREATE = obj({"type": _KEY_TYPE})


_KEY = obj(
    {
        "name": STR,
        "type": STR,
        "keys": {"type": "object", "additionalProperties": {"anyOf": [INT, ANY_OBJECT]}},
        "latest_version": INT,
        "min_available_version": INT,
        "min_decryption_version": INT,
        "min_encryption_version": INT,
        "deletion_allowed": BOOL,
        "soft_deleted": BOOL,
        "derived": BOOL,
        "exportable": BOOL,
        "allow_plaintext_backup": BOOL,
        "supports_encryption": BOOL,
        "supports_decryption": BOOL,
        "supports_derivation": BOOL,
        "supports_signing": BOOL,
    },
    ("name", "type", "keys", "latest_version", "min_decryption_version", "deletion_allowed"),
)


_KEY_CONFIG = obj(
    {
        "min_decryption_version": {"type": "integer", "minimum": 0},
        "min_encryption_version": {"type": "integer", "minimum": 0},
        "deletion_allowed": BOOL,
    }
)


_BASE64 = {
    "type": "string",
    "contentEncoding": "base64",
    "pattern": r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
}


_CIPHERTEXT = obj({"ciphertext": STR, "key_version": INT}, ("ciphertext", "key_version"))


_PLAINTEXT = obj({"plaintext": _BASE64}, ("plaintext",))


_ENCRYPT = obj(
    {
        "plaintext": _BASE64,
        "context": _BASE64,
        "key_version": INT,
        "type": _KEY_TYPE,
        "batch_input": {
            "type": "array",
            "items": obj({"plaintext": _BASE64, "context": _BASE64, "key_version": INT, "reference": STR}),
        },
    }
)


_DECRYPT = obj(
    {
        "ciphertext": STR,
        "context": _BASE64,
        "batch_input": {
            "type": "array",
            "items": obj({"ciphertext": STR, "context": _BASE64, "reference": STR}),
        },
    }
)


_SIGN = obj(
    {
        "input": _BASE64,
        "key_version": INT,
        "hash_algorithm": {"type": "string", "enum": ["sha2-256"]},
        "prehashed": {"type": "boolean", "enum": [False]},
        "signature_algorithm": STR,
        "marshaling_algorithm": {"type": "string", "enum": ["asn1", "jws"]},
    },
    ("input",),
)


def _batch(item: dict[str, object]) -> dict[str, object]:
    one = {"anyOf": [item, obj({"error": STR}, ("error",))]}
    return obj({"batch_results": {"type": "array", "items": one}}, ("batch_results",))

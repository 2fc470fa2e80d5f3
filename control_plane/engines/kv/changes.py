"""Every KV v2 change as one named operation with JSON arguments, so that a cell can
carry any change to a secret's home cell (keycell/cells) and the home can apply it
exactly as its own API would.

`OPS` names them; `check` refuses bad arguments before anything travels (the home
checks again, it trusts no sender); `run` applies one to a KV mount. The arguments are
what the HTTP routes take (control_plane/engines/kv/routes.py and control_plane/engines/transit/routes.py), already pulled out of the
request body:

    write, patch                     {"data": {...}, "cas": n | null}
    delete_latest, delete_metadata   {}
    delete_versions, undelete_versions, destroy_versions   {"versions": [n, ...]}
    write_metadata, patch_metadata   {"max_versions", "cas_required",
                                      "delete_version_after", "custom_metadata",
                                      "metadata_cas_required", "metadata_cas"}

A result is the route's answer: the version written (write, patch) or None (204).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keycell.control_plane.engines.kv.backend import (
    KvV2,
    _cas,
    _custom_metadata,
    _encode_data,
    _metadata_cas,
    _metadata_changes,
    _versions,
)
from keycell.control_plane.errors import InvalidRequest

_METADATA_ARGS = (
    "max_versions",
    "cas_required",
    "delete_version_after",
    "custom_metadata",
    "metadata_cas_required",
    "metadata_cas",
)
_ARGS: dict[str, tuple[str, ...]] = {
    "write": ("data", "cas"),
    "patch": ("data", "cas"),
    "delete_latest": (),
    "delete_versions": ("versions",),
    "undelete_versions": ("versions",),
    "destroy_versions": ("versions",),
    "write_metadata": _METADATA_ARGS,
    "patch_metadata": _METADATA_ARGS,
    "delete_metadata": (),
}
OPS = tuple(_ARGS)
# Changes that may create a secret (its home is claimed first); the others need one.
CREATES = frozenset({"write", "write_metadata"})


def check(kv: KvV2, secret: str, op: str, args: Mapping[str, Any]) -> None:
    """InvalidRequest for an unknown operation or arguments the home would refuse
    whatever it holds (what depends on the secret's state is for the home to say)."""
    if op not in _ARGS:
        raise InvalidRequest(f"unknown KV change {op!r}")
    if not isinstance(args, Mapping) or set(args) - set(_ARGS[op]):
        raise InvalidRequest(f"bad arguments for the KV change {op!r}")
    kv._secret_path(secret)
    if op in ("write", "patch"):
        _cas(args.get("cas"))
        data = args.get("data")
        if op == "write":
            _encode_data(data)
        elif data is None:
            raise InvalidRequest("no data provided")
        elif not isinstance(data, Mapping):
            raise InvalidRequest("data must be a JSON object")
    elif op in ("delete_versions", "undelete_versions", "destroy_versions"):
        # the texts Vault (and kv.py) answer with
        missing = "no version number provided" if op == "destroy_versions" else "No version number provided"
        _versions(args.get("versions"), missing)
    elif op in ("write_metadata", "patch_metadata"):
        _metadata_changes(
            args.get("max_versions"),
            args.get("cas_required"),
            args.get("delete_version_after"),
            args.get("metadata_cas_required"),
        )
        _metadata_cas(args.get("metadata_cas"))
        if args.get("custom_metadata") is not None:
            _custom_metadata(args["custom_metadata"], patch=op == "patch_metadata")


def changes_nothing(op: str, args: Mapping[str, Any]) -> bool:
    """A metadata write that sets nothing: Vault answers 204 and changes nothing (so
    no home is claimed for it either)."""
    return op == "write_metadata" and all(args.get(name) is None for name in _METADATA_ARGS)


def run(kv: KvV2, secret: str, op: str, args: Mapping[str, Any]) -> dict[str, Any] | None:
    """Apply one change to `kv` (this cell's ledger; CP there)."""
    check(kv, secret, op, args)
    if op == "write":
        return kv.write(secret, args.get("data"), cas=args.get("cas"))
    if op == "patch":
        return kv.patch(secret, args.get("data"), cas=args.get("cas"))
    if op == "delete_latest":
        kv.delete_latest(secret)
    elif op == "delete_versions":
        kv.delete_versions(secret, args.get("versions"))
    elif op == "undelete_versions":
        kv.undelete_versions(secret, args.get("versions"))
    elif op == "destroy_versions":
        kv.destroy_versions(secret, args.get("versions"))
    elif op == "write_metadata":
        kv.write_metadata(secret, **{name: args.get(name) for name in _METADATA_ARGS})
    elif op == "patch_metadata":
        kv.patch_metadata(secret, **{name: args.get(name) for name in _METADATA_ARGS})
    else:
        kv.delete_metadata(secret)
    return None

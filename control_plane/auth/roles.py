"""What every auth method's roles share: the role name rule, the refusal of fields a
write does not know, and listing the roles stored under a prefix."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.ledger import Kind, Ledger, iter_prefix

ROLE_NAME = re.compile(r"\w(?:[\w.@-]*\w)?")
MAX_ROLE_NAME = 128


def is_role_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_ROLE_NAME and ROLE_NAME.fullmatch(name) is not None


def checked_role_name(name: object) -> str:
    """`name` when it is a valid role name; InvalidRequest otherwise."""
    if not is_role_name(name):
        raise InvalidRequest("a role name is letters, digits, '_', '-', '.' and '@' (at most 128)")
    return str(name)


def refuse_unknown(data: Mapping[str, Any], known: Iterable[str], what: str = "role") -> None:
    """InvalidRequest naming the fields of `data` outside `known` (before anything is written)."""
    unknown = set(data) - set(known)
    if unknown:
        raise InvalidRequest(f"unknown {what} field(s): {', '.join(sorted(map(str, unknown)))[:200]}")


def names_under(ledger: Ledger, kind: Kind, prefix: str) -> list[str]:
    """The names of the items of `kind` under `prefix` (the prefix cut off), in order."""
    return [item.key.path[len(prefix) :] for item in iter_prefix(ledger, kind, prefix)]

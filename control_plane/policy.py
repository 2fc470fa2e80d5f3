"""ACL policies: Vault's path rules, how they combine, and where they are kept.

A policy is HCL or JSON, as in Vault:

    path "secret/data/*"      { capabilities = ["read", "list"] }
    path "secret/data/+/conf" { capabilities = ["update"] }

Capabilities: create, read, update, patch, delete, list, sudo, deny. `*` is a glob
and only the last character of a path; `+` stands for exactly one path segment,
never an empty one ("+*" is refused, as Vault refuses it). A leading "/" is dropped.

How a token's policies decide (Vault's rules, `ACL`):

- Deny by default: no matching rule, no access.
- The same path pattern in several policies merges: capabilities add up, and `deny`
  anywhere makes that pattern deny everything.
- For a request path, an exact rule wins outright. Otherwise, of the glob and `+`
  rules that match, the highest-priority one alone decides. P1 has lower priority
  than P2 when, in order: its first `+` or `*` comes earlier; it ends in `*` and P2
  does not; it has more `+` segments; it is shorter; it sorts lower. (Among plain
  globs that is the longest prefix.) So "secret/foo" read beats "secret/*" deny.
- A list request on "path/" also matches an exact rule for "path".
- The "root" policy allows everything. The built-in "default" policy lets a token
  manage itself (lookup-self, renew-self, revoke-self, capabilities-self, its
  cubbyhole, response wrapping, lease renew/lookup); it can be rewritten, not deleted.

Not supported (refused with a clear error rather than silently not enforced):
allowed/denied/required_parameters, min/max_wrapping_ttl, and templated paths.

`PolicyStore` keeps policies under `Kind.POLICY` (path: the lowercased name, value:
{"name", "policy": text, "version", "modified", "cas_required"}) and serves:

- `read(name)`   GET sys/policies/acl/:name (and sys/policy/:name) -> {"name", "policy",
  and OpenBao's check-and-set fields: "version" (1 at the first write, +1 at each
  next), "modified" (RFC 3339), "cas_required"; "allow_slashes_in_identity_templates"
  and "allow_wildcards_in_identity_templates" are always false, as templated paths are
  refused}
- `write(name, text, cas=, cas_required=)`  PUT sys/policies/acl/:name -> None (204);
  with `cas` the write happens only if the policy is at that version (0: absent), and
  a policy written with `cas_required` takes no write without `cas`
- `delete(name)` DELETE sys/policies/acl/:name -> None (204)
- `list()`       LIST sys/policies/acl -> names (the response's "keys"; root included)
- `acl_for(names)` the ACL a token with those policies gets (every authenticated request).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import hcl

from keycell.control_plane.errors import InvalidRequest, NotFound
from keycell.control_plane.ledger import ConflictError, Key, Kind, Ledger, iter_prefix
from keycell.control_plane.storage import delete_current, get_json, put_json_if
from keycell.control_plane.timefmt import rfc3339

CAPABILITIES = frozenset({"create", "read", "update", "patch", "delete", "list", "sudo", "deny"})
ROOT = "root"
DEFAULT = "default"
MAX_POLICY_CHARS = 64 * 1024
MAX_NAME_CHARS = 128

# Vault's old single-word policies, still accepted as `policy = "read"`.
_LEGACY = {
    "deny": ["deny"],
    "read": ["read", "list"],
    "write": ["create", "read", "update", "delete", "list"],
    "sudo": ["create", "read", "update", "delete", "list", "sudo"],
}
_UNSUPPORTED = frozenset(
    {"allowed_parameters", "denied_parameters", "required_parameters", "min_wrapping_ttl", "max_wrapping_ttl"}
)

# Vault's built-in default policy, less the identity rules (templated on the entity,
# which Keycell does not have yet) and the Enterprise-only control groups.
DEFAULT_POLICY = """\
# Allow tokens to look up their own properties
path "auth/token/lookup-self" {
    capabilities = ["read"]
}

# Allow tokens to renew themselves
path "auth/token/renew-self" {
    capabilities = ["update"]
}

# Allow tokens to revoke themselves
path "auth/token/revoke-self" {
    capabilities = ["update"]
}

# Allow a token to look up its own capabilities on a path
path "sys/capabilities-self" {
    capabilities = ["update"]
}

# Allow a token to look up its resultant ACL from all policies
path "sys/internal/ui/resultant-acl" {
    capabilities = ["read"]
}

# Allow a token to renew a lease via lease_id in the request body
path "sys/renew" {
    capabilities = ["update"]
}
path "sys/leases/renew" {
    capabilities = ["update"]
}

# Allow looking up lease properties (the lease id must be known)
path "sys/leases/lookup" {
    capabilities = ["update"]
}

# Allow a token to manage its own cubbyhole
path "cubbyhole/*" {
    capabilities = ["create", "read", "update", "delete", "list"]
}

# Allow a token to wrap arbitrary values in a response-wrapping token
path "sys/wrapping/wrap" {
    capabilities = ["update"]
}

# Allow a token to look up the creation time and TTL of a response-wrapping token
path "sys/wrapping/lookup" {
    capabilities = ["update"]
}

# Allow a token to unwrap a response-wrapping token
path "sys/wrapping/unwrap" {
    capabilities = ["update"]
}

# Allow general purpose tools
path "sys/tools/hash" {
    capabilities = ["update"]
}
path "sys/tools/hash/*" {
    capabilities = ["update"]
}
"""


@dataclass(frozen=True)
class Rule:
    path: str  # as written, leading "/" dropped
    capabilities: frozenset[str]


@dataclass(frozen=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]
    text: str = ""


def parse_policy(name: str, text: str) -> Policy:
    """A policy from HCL or JSON text. InvalidRequest says what is wrong."""
    if not isinstance(text, str):
        raise InvalidRequest("the policy must be HCL or JSON text")
    if len(text) > MAX_POLICY_CHARS:
        raise InvalidRequest(f"a policy is at most {MAX_POLICY_CHARS} characters")
    try:
        body = hcl.loads(text)
    except Exception as exc:  # pyhcl raises ValueError, and others on odd input
        raise InvalidRequest(f"failed to parse policy: {str(exc)[:200]}") from None
    if not isinstance(body, Mapping):
        raise InvalidRequest("failed to parse policy: expected path blocks at the top level")
    unknown = set(body) - {"path", "name"}
    if unknown:
        raise InvalidRequest(f"failed to parse policy: invalid key(s) {', '.join(sorted(map(str, unknown)))}")
    paths = body.get("path", {})
    if isinstance(paths, list):  # JSON may give a list of single-path objects
        merged: dict[str, Any] = {}
        for block in paths:
            if not isinstance(block, Mapping):
                raise InvalidRequest("failed to parse policy: a path entry must be an object")
            merged.update(block)
        paths = merged
    if not isinstance(paths, Mapping):
        raise InvalidRequest('failed to parse policy: "path" must hold path blocks')
    rules = [_parse_rule(str(path), block) for path, block in paths.items()]
    return Policy(name, tuple(rules), text)


def _parse_rule(path: str, block: object) -> Rule:
    if isinstance(block, list) and len(block) == 1:
        block = block[0]
    if not isinstance(block, Mapping):
        raise InvalidRequest(f"path {path!r}: expected a block with capabilities")
    unsupported = _UNSUPPORTED & set(block)
    if unsupported:
        raise InvalidRequest(f"path {path!r}: {', '.join(sorted(unsupported))} not supported by Keycell")
    unknown = set(block) - {"capabilities", "policy"} - _UNSUPPORTED
    if unknown:
        raise InvalidRequest(f"path {path!r}: invalid key(s) {', '.join(sorted(map(str, unknown)))}")
    path = path.removeprefix("/")
    if "+*" in path:
        raise InvalidRequest(f"path {path!r}: invalid use of wildcards ('+*' is forbidden)")
    if "*" in path[:-1]:
        raise InvalidRequest(f"path {path!r}: '*' is a glob only as the last character of a path")
    if "{{" in path:
        raise InvalidRequest(f"path {path!r}: templated policy paths are not supported by Keycell")
    if not path.isprintable():
        raise InvalidRequest(f"path {path[:60]!r}: paths are printable text")
    caps: list[object] = []
    if "capabilities" in block:
        given = block["capabilities"]
        if isinstance(given, str):
            given = [given]
        if not isinstance(given, list):
            raise InvalidRequest(f"path {path!r}: capabilities must be a list of strings")
        caps.extend(given)
    if "policy" in block:
        legacy = block["policy"]
        if not isinstance(legacy, str) or legacy not in _LEGACY:
            raise InvalidRequest(f"path {path!r}: policy must be one of deny, read, write, sudo")
        caps.extend(_LEGACY[legacy])
    for cap in caps:
        if not isinstance(cap, str) or cap not in CAPABILITIES:
            shown = cap if isinstance(cap, str) else type(cap).__name__
            raise InvalidRequest(
                f"path {path!r}: invalid capability {str(shown)[:40]!r}; "
                f"use {', '.join(sorted(CAPABILITIES))}"
            )
    chosen = frozenset(str(c) for c in caps)
    if "deny" in chosen:
        chosen = frozenset({"deny"})  # deny takes everything else away
    return Rule(path, chosen)


# --- the ACL ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    """A glob or `+` rule, with what Vault's priority order looks at."""

    text: str  # without the trailing "*"
    segments: tuple[str, ...]
    glob: bool
    wildcard: bool  # has a "+" segment
    first_wildcard: int  # index of the first "+" segment or of the glob
    wildcards: int
    capabilities: frozenset[str]

    def priority(self) -> tuple[int, int, int, int, str]:
        # Greater is higher priority; one term per rule of Vault's documented order.
        return (self.first_wildcard, 0 if self.glob else 1, -self.wildcards, len(self.text), self.text)

    def matches(self, path: str, parts: list[str]) -> bool:
        if not self.wildcard:  # a plain glob: a prefix
            return path.startswith(self.text)
        if len(parts) < len(self.segments) or (not self.glob and len(parts) != len(self.segments)):
            return False
        last = len(self.segments) - 1
        for i, segment in enumerate(self.segments):
            if segment == "+":
                if parts[i]:  # one segment, never an empty one ("a//b" or a list's "a/")
                    continue
                return False
            if segment == parts[i]:
                continue
            if self.glob and i == last and parts[i].startswith(segment):
                continue
            return False
        return True


def _pattern(path: str, capabilities: frozenset[str]) -> _Pattern:
    glob = path.endswith("*")
    text = path[:-1] if glob else path
    segments = tuple(text.split("/"))
    plus = [i for i, s in enumerate(segments) if s == "+"]
    first = len("/".join(segments[: plus[0]])) + (1 if plus[0] else 0) if plus else len(text)
    return _Pattern(text, segments, glob, bool(plus), first, len(plus), capabilities)


def _merge(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    merged = a | b
    return frozenset({"deny"}) if "deny" in merged else merged


class ACL:
    """The union of a token's policies, answering what it may do on a path."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.root = False
        exact: dict[str, frozenset[str]] = {}
        globbed: dict[str, frozenset[str]] = {}
        for policy in policies:
            if policy.name == ROOT:
                self.root = True
                continue
            for rule in policy.rules:
                if rule.path.endswith("*") or "+" in rule.path.split("/"):
                    globbed[rule.path] = _merge(globbed.get(rule.path, frozenset()), rule.capabilities)
                else:
                    exact[rule.path] = _merge(exact.get(rule.path, frozenset()), rule.capabilities)
        self._exact = exact
        self._patterns = [_pattern(p, c) for p, c in globbed.items()]

    def capabilities(self, path: str) -> set[str]:
        """What sys/capabilities(-self) answers for `path`: {"root"} for a root token,
        {"deny"} when no rule matches or the deciding rule denies, else the capabilities."""
        if self.root:
            return {"root"}
        path = path.removeprefix("/")
        found = self._decide(path, listing=False)
        granted = set() if found is None or "deny" in found else set(found)
        # `list` as a LIST on this path is decided (an exact rule for "foo" lists "foo/").
        granted.discard("list")
        if self.allows(path, "list"):
            granted.add("list")
        return granted or {"deny"}

    def reaches_under(self, prefix: str) -> bool:
        """Does any rule grant something (not only `deny`) on a path under `prefix` (a
        mount's path, "kv-apps/")? What Vault asks before sys/internal/ui/mounts tells a
        token which engine serves a mount: a rule for "kv-apps/data/app/*" is enough."""
        if self.root:
            return True

        def grants(capabilities: frozenset[str]) -> bool:
            return bool(capabilities) and "deny" not in capabilities

        if any(path.startswith(prefix) and grants(c) for path, c in self._exact.items()):
            return True
        for pattern in self._patterns:
            # The literal part before the first `+` or the glob: under the prefix, or (a
            # glob such as "kv-*") a start the prefix itself goes on from.
            literal = pattern.text[: pattern.first_wildcard]
            if grants(pattern.capabilities) and (literal.startswith(prefix) or prefix.startswith(literal)):
                return True
        return False

    def allows(self, path: str, capability: str) -> bool:
        """May a token with these policies do `capability` on `path`?"""
        if capability not in CAPABILITIES or capability == "deny":
            raise ValueError(f"unknown capability {capability!r}")
        if self.root:
            return True
        found = self._decide(path.removeprefix("/"), listing=capability == "list")
        return found is not None and "deny" not in found and capability in found

    def _decide(self, path: str, *, listing: bool) -> frozenset[str] | None:
        exact = self._exact.get(path)
        if exact is not None:
            return exact
        if listing and path.endswith("/"):
            # Listing "foo/" is allowed by a rule for "foo", as Vault does.
            exact = self._exact.get(path[:-1])
            if exact is not None:
                return exact
        parts = path.split("/")
        best: _Pattern | None = None
        for pattern in self._patterns:
            if pattern.matches(path, parts) and (best is None or pattern.priority() > best.priority()):
                best = pattern
        return None if best is None else best.capabilities


ROOT_POLICY = Policy(ROOT, ())


# --- the store -------------------------------------------------------------------------


def _policy_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidRequest("a policy name is a string")
    cleaned = name.strip().lower()
    if not cleaned:
        raise InvalidRequest("a policy name must not be empty")
    if len(cleaned) > MAX_NAME_CHARS or not cleaned.isprintable():
        raise InvalidRequest(f"a policy name is printable and at most {MAX_NAME_CHARS} characters")
    return cleaned


class PolicyStore:
    """ACL policies in the cell's ledger (see the module docstring)."""

    def __init__(self, ledger: Ledger, *, clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.clock = clock
        # Parsed policies by (name, text): parsing is the cost worth saving, and a
        # cache keyed by the text just read can never answer for an older version.
        self._parsed: dict[tuple[str, str], Policy] = {}
        # ACLs by the exact parsed policies they combine: a token's ACL is built on
        # every request, and the same few policy sets recur.
        self._acls: dict[tuple[Policy, ...], ACL] = {}
        self._lock = threading.Lock()

    def _key(self, name: str) -> Key:
        return Key(Kind.POLICY, name)

    def _text(self, name: str) -> str | None:
        found = get_json(self.ledger, self._key(name))
        if found is not None:
            return str(found[0]["policy"])
        if name == DEFAULT:
            return DEFAULT_POLICY
        return None

    def read(self, name: str) -> dict[str, Any]:
        """GET sys/policies/acl/:name -> {"name", "policy", "version", "modified",
        "cas_required", "allow_*_in_identity_templates"}; NotFound if absent. The built-in
        root and default policies, never written, are at version 0 with no `modified`."""
        cleaned = _policy_name(name)
        found = None if cleaned == ROOT else get_json(self.ledger, self._key(cleaned))
        record = found[0] if found is not None else {}
        text = "" if cleaned == ROOT else self._text(cleaned)
        if text is None:
            raise NotFound(f"no policy named {cleaned!r}")
        modified = record.get("modified")
        return {
            "name": cleaned,
            "policy": text,
            "version": int(record.get("version", 1 if record else 0)),
            "modified": "" if modified is None else rfc3339(float(modified)),
            "cas_required": bool(record.get("cas_required", False)),
            "allow_slashes_in_identity_templates": False,
            "allow_wildcards_in_identity_templates": False,
        }

    def write(
        self, name: str, text: str, *, cas: int | None = None, cas_required: bool | None = None
    ) -> None:
        """PUT sys/policies/acl/:name. The text must parse; "root" cannot be changed.
        `cas`: the version the policy must be at (0: absent); `cas_required`: from now
        on every write of this policy must give `cas` (None: keep what it was)."""
        cleaned = _policy_name(name)
        if cleaned == ROOT:
            raise InvalidRequest("cannot update root policy")
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("'policy' parameter not supplied or empty")
        if cas is not None and cas < 0:
            raise InvalidRequest("'cas' is a version: 0 (the policy must not exist) or more")
        parse_policy(cleaned, text)
        for _ in range(8):
            found = get_json(self.ledger, self._key(cleaned))
            old, ledger_version = found if found is not None else ({}, 0)
            version = int(old.get("version", 1)) if found is not None else 0
            required = bool(old.get("cas_required", False))
            if cas is None and required:
                raise InvalidRequest("check-and-set parameter required for this policy: send 'cas'")
            if cas is not None and cas != version:
                raise InvalidRequest(
                    f"check-and-set parameter did not match the current version ({version}); read and retry"
                )
            record = {
                "name": cleaned,
                "policy": text,
                "version": version + 1,
                "modified": self.clock(),
                "cas_required": required if cas_required is None else cas_required,
            }
            try:
                put_json_if(self.ledger, self._key(cleaned), record, ledger_version)
                return
            except ConflictError:
                if cas is not None:  # someone else wrote the version this write was checked against
                    raise InvalidRequest(
                        "check-and-set parameter did not match the current version; read and retry"
                    ) from None
                continue  # a concurrent write: the last writer wins, as in Vault
        raise InvalidRequest("the policy is being written concurrently; retry")

    def delete(self, name: str) -> None:
        """DELETE sys/policies/acl/:name. "root" and "default" cannot be deleted."""
        cleaned = _policy_name(name)
        if cleaned in (ROOT, DEFAULT):
            raise InvalidRequest(f"cannot delete {cleaned} policy")
        delete_current(self.ledger, self._key(cleaned))

    def list(self) -> list[str]:
        """LIST sys/policies/acl -> the sorted names, "default" and "root" included."""
        names = {DEFAULT, ROOT}
        names.update(item.key.path for item in iter_prefix(self.ledger, Kind.POLICY))
        return sorted(names)

    def get(self, name: str) -> Policy | None:
        """The parsed policy, or None if there is none by that name."""
        cleaned = _policy_name(name)
        if cleaned == ROOT:
            return ROOT_POLICY
        text = self._text(cleaned)
        if text is None:
            return None
        with self._lock:
            cached = self._parsed.get((cleaned, text))
        if cached is not None:
            return cached
        try:
            parsed = parse_policy(cleaned, text)
        except InvalidRequest:
            return None  # stored before a rule became unsupported: grants nothing
        with self._lock:
            if len(self._parsed) > 1024:
                self._parsed.clear()
            self._parsed[(cleaned, text)] = parsed
        return parsed

    def acl_for(self, names: Iterable[str]) -> ACL:
        """The ACL for a token's policies. Unknown names grant nothing, as in Vault."""
        policies = tuple(p for p in (self.get(n) for n in names) if p is not None)
        acl = self._acls.get(policies)
        if acl is None:
            acl = ACL(policies)
            with self._lock:
                if len(self._acls) > 1024:
                    self._acls.clear()
                self._acls[policies] = acl
        return acl

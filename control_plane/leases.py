"""The lease manager (Vault's expiration manager): every leased thing a cell hands out.

An engine that issues something with a lifetime (a token from an auth method, later a
database credential) registers a lease for it, naming a *revoker*: the function, which
that engine registered here, that destroys what the lease stands for. Revoking a lease
calls its revoker, adds `lease:<lease id>` to the cell's revocation set, and deletes the
lease. Lease ids are `<prefix>/<random id>` (`auth/jwt/login/<id>`,
`database/creds/<role>/<id>`), so operators can revoke everything one mount or role
issued at once.

Storage (all under Kind.LEASE, through the barrier):

- the lease record at its lease id, with the ledger expiry set to the lease expiry, so an
  expired lease vanishes from every read by itself;
- an *expiry index* item per lease at `/expiry/<expiry, 12 digits>/<lease id>`, holding a
  copy of the record and no ledger expiry. Tidy needs it: once a lease expires its record
  is invisible, yet its revoker must still run (a database user does not drop itself).
  The index sorts by expiry, so `tidy_expired` scans it from the start and stops at the
  first lease still alive. Lease ids never start with "/" (they have no empty segment),
  so index paths can never be lease ids, and only a listing of the root sees them (and
  skips them). Register writes both items in one transaction; renew moves the index item
  in the same transaction as its compare-and-set on the record; revoke deletes both.

Expiry is judged twice: by the ledger (real time, hides expired items) and by this
engine's `clock` (expire_time <= clock() reads as expired), so tests can move time.

Concurrency: renew is a compare-and-set on the record (and on the index item), retried
on conflict; it also refuses a lease already in the revocation set. Revoke runs the
revoker, then adds the revocation, then deletes the records at whatever version they
have reached; a renew racing it either loses its compare-and-set or is undone. Tidy
*claims* an expired lease before calling its revoker: one transaction deletes the record
and marks the index item, so no renew can revive a lease whose revoker is running; a
revoker failure leaves the marked index item for the next tidy. Tidy adds no revocation
entry: an expired lease can no longer be renewed or looked up, and the revocation set is
gossiped to every cell, so entries that protect nothing are not worth their cost.

Endpoints served (the HTTP layer maps Vault's request onto these):

- PUT sys/leases/lookup {lease_id}: `lookup(lease_id)` -> {id, issue_time, expire_time,
  last_renewal_time (None until renewed), renewable, ttl (seconds left)}; an unknown or
  expired lease is InvalidRequest("invalid lease"), as Vault answers.
- LIST sys/leases/lookup/:prefix: `list(prefix)` -> {"keys": [...]}: the lease ids and
  sub-prefixes ("creds/") directly under `prefix`, like a Vault LIST. Vault answers an
  empty LIST with 404; this returns {"keys": []} and leaves that to the HTTP layer, which
  does it for every LIST.
- PUT sys/leases/renew {lease_id, increment}: `renew(lease_id, increment)` -> {lease_id,
  renewable, lease_duration, warnings}: the HTTP layer puts the first three at the top
  level of Vault's response (data is null) and `warnings` in Vault's warnings (empty
  unless the max TTL capped the renewal).
- PUT sys/leases/revoke {lease_id}: `revoke(lease_id)` -> None (Vault: 204). An unknown
  lease is a no-op, as in Vault.
- PUT sys/leases/revoke-prefix/:prefix: `revoke_prefix(prefix)` -> {"revoked": n}
  (Vault: 204). Stops at the first revoker failure with InvalidRequest saying how many
  were revoked; the failed lease and those after it remain.
- PUT sys/leases/revoke-force/:prefix: `revoke_force(prefix)` -> {"revoked": n,
  "revoker_errors": m} (Vault: 204). Every lease under the prefix is deleted and revoked
  even when its revoker fails.
- `tidy_expired(limit)` (the revocation function's schedule; Vault revokes expired leases
  on timers) -> {"revoked": n, "revoker_errors": m}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from keycell.control_plane.errors import InvalidRequest, RequestError, Unavailable
from keycell.control_plane.ledger import (
    ConflictError,
    Delete,
    Item,
    Key,
    Kind,
    Ledger,
    Op,
    Put,
    iter_prefix,
)
from keycell.control_plane.revocations import RevocationSet
from keycell.control_plane.storage import encode_json, get_json
from keycell.control_plane.timefmt import rfc3339
from keycell.control_plane.wrapping import parse_duration

log = logging.getLogger(__name__)

DEFAULT_MAX_TTL = 32 * 24 * 3600  # Vault's default system max lease TTL
INDEX_PREFIX = "/expiry/"
_BUCKET_DIGITS = 12  # epoch seconds, zero-padded so path order is expiry order
# Room for the index prefix and bucket inside the ledger's 1024-byte path limit.
MAX_LEASE_ID_BYTES = 900
_ID_BYTES = 18  # secrets.token_urlsafe(18): 24 characters, 144 bits
_SEGMENT = re.compile(r"[^\s/]+")
# A lease changing this many times while one request works on it is contention no
# client should cause; give up rather than spin.
_ATTEMPTS = 8
SUBJECT_PREFIX = "lease:"

Revoker = Callable[["Lease"], None]
# Called on renewal with the lease and its new expiry, before the renewal is stored:
# extends what the lease stands for (a database role's VALID UNTIL).
Renewer = Callable[["Lease", float], None]


@dataclass(frozen=True)
class Lease:
    lease_id: str
    issue_time: float
    expire_time: float
    last_renewal_time: float | None
    renewable: bool
    ttl: int  # the TTL granted at issue: what a renewal without an increment asks for
    max_ttl: int  # counted from issue_time; no renewal goes past it
    revoker: str
    revoker_data: dict[str, Any] = field(default_factory=dict)

    @property
    def max_expire_time(self) -> float:
        return self.issue_time + self.max_ttl

    def to_record(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "issue_time": self.issue_time,
            "expire_time": self.expire_time,
            "last_renewal_time": self.last_renewal_time,
            "renewable": self.renewable,
            "ttl": self.ttl,
            "max_ttl": self.max_ttl,
            "revoker": self.revoker,
            "revoker_data": self.revoker_data,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Lease:
        renewed = record.get("last_renewal_time")
        return cls(
            lease_id=str(record["lease_id"]),
            issue_time=float(record["issue_time"]),
            expire_time=float(record["expire_time"]),
            last_renewal_time=None if renewed is None else float(renewed),
            renewable=bool(record["renewable"]),
            ttl=int(record["ttl"]),
            max_ttl=int(record["max_ttl"]),
            revoker=str(record["revoker"]),
            revoker_data=dict(record.get("revoker_data") or {}),
        )


def _ledger_expiry(epoch: float) -> int:
    # Whole seconds, rounded up: the ledger never hides a lease before it expires.
    return math.ceil(epoch)


def index_path(lease_id: str, expire_time: float) -> str:
    return f"{INDEX_PREFIX}{_ledger_expiry(expire_time):0{_BUCKET_DIGITS}d}/{lease_id}"


def _check_segments(text: str, what: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_LEASE_ID_BYTES:
        raise InvalidRequest(f"{what} is longer than {MAX_LEASE_ID_BYTES} bytes")
    for segment in text.split("/"):
        if not segment:
            raise InvalidRequest(f"{what} must not have empty segments (leading, trailing or double '/')")
        if segment in (".", ".."):
            raise InvalidRequest(f"{what} must not contain '.' or '..' segments")
        if not _SEGMENT.fullmatch(segment) or not segment.isprintable():
            raise InvalidRequest(f"{what} must not contain whitespace or control characters")


def validate_lease_id(lease_id: object) -> str:
    if not isinstance(lease_id, str):
        raise InvalidRequest("lease_id must be a string")
    if not lease_id:
        raise InvalidRequest("missing lease_id")
    _check_segments(lease_id, "a lease id")
    return lease_id


def validate_prefix(prefix: object, *, allow_empty: bool = False) -> str:
    """A prefix as given (a trailing '/' kept); `allow_empty` for listing the root."""
    if not isinstance(prefix, str):
        raise InvalidRequest("a lease prefix must be a string")
    if not prefix:
        if allow_empty:
            return prefix
        raise InvalidRequest("a lease prefix is required")
    _check_segments(prefix.removesuffix("/"), "a lease prefix")
    return prefix


class Leases:
    """Leases over a cell's barrier. Stateless but for the revoker table, which is wiring
    (each process registers the same revokers at start), not request state."""

    def __init__(
        self,
        ledger: Ledger,
        revocations: RevocationSet,
        *,
        clock: Callable[[], float] = time.time,
        max_ttl: int = DEFAULT_MAX_TTL,
    ) -> None:
        if isinstance(max_ttl, bool) or not isinstance(max_ttl, int) or max_ttl < 1:
            raise ValueError("max_ttl is a positive number of seconds")
        self.ledger = ledger
        self.revocations = revocations
        self.clock = clock
        self.max_ttl = max_ttl
        self._revokers: dict[str, Revoker] = {}
        self._renewers: dict[str, Renewer] = {}

    def register_revoker(self, name: str, fn: Revoker) -> None:
        """`fn(lease)` destroys what the lease stands for. It must be idempotent: after a
        crash between it and the lease's deletion, it runs again."""
        if not isinstance(name, str) or not name:
            raise ValueError("a revoker needs a name")
        self._revokers[name] = fn

    def register_renewer(self, name: str, fn: Renewer) -> None:
        """`fn(lease, new_expire_time)` extends what a lease with revoker `name` stands
        for. Idempotent; a failure fails the renewal and leaves the lease as it was."""
        if not isinstance(name, str) or not name:
            raise ValueError("a renewer needs the name of its revoker")
        self._renewers[name] = fn

    # --- issue ------------------------------------------------------------------------

    def register(
        self,
        prefix: str,
        *,
        ttl: int,
        max_ttl: int | None = None,
        renewable: bool = True,
        revoker: str,
        revoker_data: dict[str, Any],
    ) -> Lease:
        """A new lease `<prefix>/<random id>` lasting `ttl` seconds (capped by `max_ttl`,
        itself capped by the manager's). Called by engines, not by clients."""
        prefix = validate_prefix(prefix).removesuffix("/")
        ttl = self._seconds(ttl, "ttl")
        cap = self.max_ttl if max_ttl is None else min(self._seconds(max_ttl, "max_ttl"), self.max_ttl)
        if revoker not in self._revokers:
            raise ValueError(f"no revoker named {revoker!r} is registered")
        if not isinstance(revoker_data, dict):
            raise ValueError("revoker_data must be a dict")
        now = self.clock()
        lease = Lease(
            lease_id=f"{prefix}/{secrets.token_urlsafe(_ID_BYTES)}",
            issue_time=now,
            expire_time=now + min(ttl, cap),
            last_renewal_time=None,
            renewable=bool(renewable),
            ttl=min(ttl, cap),
            max_ttl=cap,
            revoker=revoker,
            revoker_data=revoker_data,
        )
        validate_lease_id(lease.lease_id)
        record = encode_json(lease.to_record())
        expires_at = _ledger_expiry(lease.expire_time)
        self.ledger.transact(
            [
                Put(Key(Kind.LEASE, lease.lease_id), record, 0, expires_at),
                Put(Key(Kind.LEASE, index_path(lease.lease_id, lease.expire_time)), record, 0),
            ]
        )
        return lease

    # --- read -------------------------------------------------------------------------

    def get(self, lease_id: str) -> Lease | None:
        """The live lease, or None (unknown, expired or revoked)."""
        found = self._load(validate_lease_id(lease_id))
        return None if found is None else found[0]

    def lookup(self, lease_id: str) -> dict[str, Any]:
        """PUT sys/leases/lookup."""
        found = self._load(validate_lease_id(lease_id))
        if found is None:
            raise InvalidRequest("invalid lease")
        lease, _ = found
        answer: dict[str, Any] = {
            "id": lease.lease_id,
            "issue_time": rfc3339(lease.issue_time),
            "expire_time": rfc3339(lease.expire_time),
            "last_renewal_time": None
            if lease.last_renewal_time is None
            else rfc3339(lease.last_renewal_time),
            "renewable": lease.renewable,
            "ttl": max(0, int(lease.expire_time - self.clock())),
        }
        if lease.revoker == "token":
            # A token's lease names its accessor (not a secret), so a breach runbook can
            # revoke the tokens under a prefix in every cell (keycell/breach.py).
            answer["token_accessor"] = str(lease.revoker_data.get("accessor", ""))
        return answer

    def list(self, prefix: str = "") -> dict[str, Any]:
        """LIST sys/leases/lookup/:prefix: direct children of `prefix`, folded."""
        prefix = validate_prefix(prefix, allow_empty=True)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        now = self.clock()
        keys: list[str] = []
        for item in iter_prefix(self.ledger, Kind.LEASE, prefix, page_size=500):
            path = item.key.path
            if path.startswith(INDEX_PREFIX):
                continue  # only a root listing meets the expiry index
            record, _ = _decode(item)
            if float(record["expire_time"]) <= now:
                continue
            rest = path[len(prefix) :]
            slash = rest.find("/")
            name = rest if slash < 0 else rest[: slash + 1]
            # Path order keeps everything under one folder together, so comparing with
            # the last key is enough to fold it.
            if not keys or keys[-1] != name:
                keys.append(name)
        return {"keys": keys}

    # --- renew ------------------------------------------------------------------------

    def renew(self, lease_id: str, increment: int | str | None = 0) -> dict[str, Any]:
        """PUT sys/leases/renew: extend the lease to `increment` seconds from now (0 or
        None: its original TTL), never past its max TTL."""
        lease_id = validate_lease_id(lease_id)
        wanted = 0 if increment is None else parse_duration(increment)
        for _ in range(_ATTEMPTS):
            found = self._load(lease_id)
            if found is None:
                raise InvalidRequest("lease not found or lease is not renewable")
            lease, version = found
            if not lease.renewable:
                raise InvalidRequest("lease is not renewable")
            now = self.clock()
            requested = wanted or lease.ttl
            expire = now + requested
            warnings: list[str] = []
            if expire > lease.max_expire_time:
                expire = lease.max_expire_time
                warnings.append(
                    f"TTL of {requested}s exceeded the lease's max TTL of {lease.max_ttl}s; "
                    f"the lease now expires in {int(expire - now)}s and can be renewed no further"
                )
            renewer = self._renewers.get(lease.revoker)
            if renewer is not None:
                renewer(lease, expire)
            renewed = replace(lease, expire_time=expire, last_renewal_time=now)
            record = encode_json(renewed.to_record())
            old_index = Key(Kind.LEASE, index_path(lease_id, lease.expire_time))
            new_index = Key(Kind.LEASE, index_path(lease_id, expire))
            index_item = self.ledger.get(old_index, consistent=True)
            index_version = 0 if index_item is None else index_item.version
            ops: list[Op] = [Put(Key(Kind.LEASE, lease_id), record, version, _ledger_expiry(expire))]
            if old_index == new_index:
                ops.append(Put(new_index, record, index_version))
            else:
                if index_item is not None:
                    ops.append(Delete(old_index, index_version))
                ops.append(Put(new_index, record, 0))
            try:
                self.ledger.transact(ops)
            except ConflictError:
                continue  # renewed, revoked or claimed meanwhile: look again
            return {
                "lease_id": lease_id,
                "renewable": True,
                "lease_duration": max(0, int(expire - now)),
                "warnings": warnings,
            }
        raise Unavailable("the lease kept changing while it was being renewed; retry")

    # --- revoke -----------------------------------------------------------------------

    def revoke(self, lease_id: str) -> None:
        """PUT sys/leases/revoke. A revoker's client-facing error (RequestError) passes
        through; any other failure is reported without its detail. Either way the
        lease remains."""
        lease_id = validate_lease_id(lease_id)
        lease = self._load_raw(lease_id)
        if lease is None:
            return
        try:
            self._call_revoker(lease)
        except RequestError:
            raise
        except Exception:
            raise InvalidRequest(
                f"failed to revoke lease {lease_id!r}: its revoker failed; the lease remains, retry "
                "or use revoke-force"
            ) from None
        self._finish_revocation(lease, "sys/leases/revoke")

    def revoke_prefix(self, prefix: str) -> dict[str, Any]:
        """PUT sys/leases/revoke-prefix/:prefix: every lease under `prefix`, in order,
        stopping at the first revoker failure."""
        revoked = 0
        for lease in self._under(prefix):
            try:
                self._call_revoker(lease)
            except Exception:
                raise InvalidRequest(
                    f"revoked {revoked} lease(s) under {prefix!r}, then the revoker of lease "
                    f"{lease.lease_id!r} failed; it and the leases after it remain: retry, or use "
                    "revoke-force"
                ) from None
            self._finish_revocation(lease, "sys/leases/revoke-prefix")
            revoked += 1
        return {"revoked": revoked}

    def revoke_force(self, prefix: str) -> dict[str, Any]:
        """PUT sys/leases/revoke-force/:prefix: delete and revoke every lease under
        `prefix` even where its revoker fails (the operator cleans up what it held)."""
        revoked = errors = 0
        for lease in self._under(prefix):
            try:
                self._call_revoker(lease)
            except Exception as exc:
                errors += 1
                # The type only: a revoker's message may quote what it was destroying.
                log.warning(
                    "revoke-force: revoker %r failed for lease %s (%s); lease revoked anyway",
                    lease.revoker,
                    lease.lease_id,
                    type(exc).__name__,
                )
            self._finish_revocation(lease, "sys/leases/revoke-force")
            revoked += 1
        return {"revoked": revoked, "revoker_errors": errors}

    # --- tidy -------------------------------------------------------------------------

    def tidy_expired(self, limit: int = 100) -> dict[str, Any]:
        """Run the revoker of every lease whose expiry has passed, oldest first, at most
        `limit` of them; a lease whose revoker fails is retried by the next tidy."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be an integer from 1 to 1000")
        now = self.clock()
        revoked = errors = 0
        seen = 0
        for item in iter_prefix(self.ledger, Kind.LEASE, INDEX_PREFIX, page_size=min(limit, 100)):
            bucket = int(item.key.path[len(INDEX_PREFIX) :].split("/", 1)[0])
            if bucket > now or seen >= limit:
                break  # the index is in expiry order: everything after is alive too
            seen += 1
            record, _ = _decode(item)
            # bucket = ceil(expire_time) <= now, so the lease has expired.
            lease = Lease.from_record(record)
            if not record.get("revoking") and not self._claim(lease, item):
                continue  # renewed or revoked since the scan
            try:
                self._call_revoker(lease)
            except Exception as exc:
                errors += 1
                log.warning(
                    "tidy: revoker %r failed for expired lease %s (%s); will retry",
                    lease.revoker,
                    lease.lease_id,
                    type(exc).__name__,
                )
                continue
            self._delete_claimed(item.key)
            revoked += 1
        return {"revoked": revoked, "revoker_errors": errors}

    # --- helpers ----------------------------------------------------------------------

    def _seconds(self, value: object, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"{name} must be a positive number of seconds")
        return value

    def _load_raw(self, lease_id: str) -> Lease | None:
        found = get_json(self.ledger, Key(Kind.LEASE, lease_id), consistent=True)
        return None if found is None else Lease.from_record(found[0])

    def _load(self, lease_id: str) -> tuple[Lease, int] | None:
        """The lease and its record's version, if it is alive by this engine's clock and
        not revoked (a revocation lands just before the record is deleted)."""
        found = get_json(self.ledger, Key(Kind.LEASE, lease_id), consistent=True)
        if found is None:
            return None
        record, version = found
        lease = Lease.from_record(record)
        if lease.expire_time <= self.clock():
            return None
        if self.revocations.is_revoked(SUBJECT_PREFIX + lease_id):
            return None
        return lease, version

    def _under(self, prefix: str) -> Iterator[Lease]:
        """Leases a revoke-prefix covers: `prefix` itself if it is a lease id (as Vault
        does for a prefix without a trailing '/'), else every lease under `prefix/`."""
        prefix = validate_prefix(prefix)
        if not prefix.endswith("/"):
            exact = self._load_raw(prefix)
            if exact is not None:
                yield exact
                return
            prefix += "/"
        # Deleting items already returned leaves the scan's later pages intact.
        for item in iter_prefix(self.ledger, Kind.LEASE, prefix):
            yield Lease.from_record(_decode(item)[0])

    def _call_revoker(self, lease: Lease) -> None:
        fn = self._revokers.get(lease.revoker)
        if fn is None:
            raise Unavailable(f"no revoker {lease.revoker!r} is registered in this process")
        fn(lease)

    def _finish_revocation(self, lease: Lease, reason: str) -> None:
        """After the revoker ran: record the revocation (which also stops any renewal
        from now on), then delete the lease and its index item."""
        self.revocations.revoke(
            SUBJECT_PREFIX + lease.lease_id,
            reason=reason,
            # No use of the lease can outlive its max TTL, so neither need the entry.
            expires_at=_ledger_expiry(lease.max_expire_time),
        )
        expire = lease.expire_time
        for _ in range(_ATTEMPTS):
            ops: list[Op] = []
            current = get_json(self.ledger, Key(Kind.LEASE, lease.lease_id), consistent=True)
            if current is not None:
                record, version = current
                expire = float(record["expire_time"])  # a renewal may have moved it
                ops.append(Delete(Key(Kind.LEASE, lease.lease_id), version))
            index = self.ledger.get(Key(Kind.LEASE, index_path(lease.lease_id, expire)), consistent=True)
            if index is not None:
                ops.append(Delete(index.key, index.version))
            if not ops:
                return
            try:
                self.ledger.transact(ops)
            except ConflictError:
                continue
            return
        raise Unavailable("the lease kept changing while it was being revoked; it is revoked, retry")

    def _claim(self, lease: Lease, index: Item) -> bool:
        """Take an expired lease for tidy: delete its record and mark its index item in
        one transaction, so a renewal can no longer revive it. False if it changed."""
        ops: list[Op] = [Put(index.key, encode_json({**lease.to_record(), "revoking": True}), index.version)]
        record = self.ledger.get(Key(Kind.LEASE, lease.lease_id), consistent=True)
        if record is not None:
            ops.append(Delete(record.key, record.version))
        try:
            self.ledger.transact(ops)
        except ConflictError:
            return False
        return True

    def _delete_claimed(self, key: Key) -> None:
        item = self.ledger.get(key, consistent=True)
        if item is None:
            return
        with contextlib.suppress(ConflictError):  # another tidy finished it
            self.ledger.delete_if(key, item.version)


def _decode(item: Item) -> tuple[dict[str, Any], int]:
    record = json.loads(item.value)
    if not isinstance(record, dict):
        raise ValueError(f"the record at {item.key} is not a JSON object")
    return record, item.version

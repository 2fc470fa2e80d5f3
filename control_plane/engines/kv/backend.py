"""The KV version 2 secrets engine: versioned secrets with Vault's KV v2 semantics.

Every write makes a new version. A version's value is sealed in its own envelope
(a fresh data key, wrapped by the cell's KEK in the HSM, with the mount, path and
version number as associated data) and stored in a SECRET_VERSION item; the
secret's metadata (its versions, their created/deletion times and destroyed flags,
cas and retention settings, custom metadata) lives in one SECRET_META item. A write
puts both in one ledger transaction, conditional on the metadata's ledger version,
so concurrent writers serialise exactly as Vault's per-key lock makes them, across
any number of stateless processes. Mount-wide defaults live in a CONFIG item.

Methods, the Vault endpoint each serves (paths under the mount, `secret/` by
default), and what they return (Vault's response `data`; None means 204):

- `read_config()`                     GET  /config            {cas_required, delete_version_after, max_versions,
                                                               metadata_cas_required (every key's metadata
                                                               writes must give metadata_cas)}
- `write_config(...)`                 POST /config            None
- `write(path, data, cas=)`           POST|PUT /data/:path    {created_time, custom_metadata, deletion_time,
                                                               destroyed, version}
- `patch(path, data, cas=)`           PATCH /data/:path       as `write` (JSON merge patch onto the current version)
- `read(path, version=)`              GET  /data/:path        {data, metadata}; a deleted or destroyed version
                                                               raises NotFound carrying {data: None, metadata}
- `delete_latest(path)`               DELETE /data/:path      None
- `delete_versions(path, versions)`   POST /delete/:path      None
- `undelete_versions(path, versions)` POST /undelete/:path    None
- `destroy_versions(path, versions)`  PUT|POST /destroy/:path None (the sealed values are removed from storage)
- `read_metadata(path)`               GET  /metadata/:path    {cas_required, created_time, current_version,
                                                               current_metadata_version, custom_metadata,
                                                               delete_version_after, max_versions,
                                                               metadata_cas_required, oldest_version,
                                                               updated_time, versions}
- `write_metadata(path, ...)`         POST|PUT /metadata/:path  None (`metadata_cas`: the
                                                               current_metadata_version expected;
                                                               required once metadata_cas_required)
- `patch_metadata(path, ...)`         PATCH /metadata/:path   None
- `delete_metadata(path)`             DELETE /metadata/:path  None (every version and the metadata, for good)
- `list(prefix)`                      LIST /metadata/:prefix  {keys: [...]}, folders folded as "name/"

Times are RFC 3339 strings in UTC ("" when unset), durations Go duration strings
("1h0m0s"), as Vault answers. Missing secrets raise NotFound; bad input raises
InvalidRequest with Vault's message where Vault has one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ParamSpec, TypeVar

from keycell.control_plane.envelope import Envelope, Envelopes
from keycell.control_plane.errors import InvalidRequest, NotFound, Unavailable
from keycell.control_plane.freshness import StaleBound, bound_from_record, parse_bound
from keycell.control_plane.ledger import (
    MAX_PATH_BYTES,
    MAX_TRANSACTION_ITEMS,
    ConflictError,
    Delete,
    InvalidItemError,
    InvalidKeyError,
    Item,
    Key,
    Kind,
    Ledger,
    LedgerUnavailableError,
    Op,
    Put,
    TransactionConflictError,
    iter_prefix,
)
from keycell.control_plane.storage import encode_json, get_json

# Vault keeps 10 versions when neither the mount nor the secret says otherwise.
DEFAULT_MAX_VERSIONS = 10
# Vault's custom_metadata limits.
MAX_CUSTOM_METADATA_KEYS = 64
MAX_CUSTOM_METADATA_KEY_LENGTH = 128
MAX_CUSTOM_METADATA_VALUE_LENGTH = 512
# The largest secret (its JSON) accepted. The envelope's base64 and the barrier add
# about a third, and the result must fit one ledger item (400,000 bytes).
MAX_SECRET_BYTES = 256 * 1024
# A write that keeps losing the compare-and-set to other writers gives up after this
# many attempts (each round lets at least one writer through, so this is generous).
MAX_ATTEMPTS = 64
# Mount config value that switches delete_version_after off for every key (Vault
# stores a negative duration, -1s, for it).
_DVA_DISABLED = -1
_VERSION_DIGITS = 10
_CAS_MISMATCH = "check-and-set parameter did not match the current version"
_CAS_REQUIRED = "check-and-set parameter required for this call"
_CM_ERROR = "custom_metadata validation failed"

P = ParamSpec("P")
R = TypeVar("R")


def _storage_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Ledger errors a request can cause become request errors. SealedError and key
    backend errors pass through: the router answers them 503 itself."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except InvalidKeyError as exc:
            raise InvalidRequest(f"invalid secret path: {exc}") from None
        except InvalidItemError:
            raise InvalidRequest(
                "the secret or its metadata is too large to store; store less data or fewer versions"
            ) from None
        except LedgerUnavailableError:
            raise Unavailable("the cell's storage is unavailable; retry later") from None

    return wrapper


class KvV2:
    """One KV v2 mount over a cell's barrier (its `Ledger`)."""

    def __init__(
        self,
        ledger: Ledger,
        envelopes: Envelopes,
        *,
        mount: str = "secret",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.envelopes = envelopes
        self.mount = _check_mount(mount)
        self.clock = clock
        self._config_key = Key(Kind.CONFIG, f"kv/{self.mount}")

    # --- config ------------------------------------------------------------------------

    @_storage_errors
    def read_config(self) -> dict[str, Any]:
        config = self._config()
        bound = bound_from_record(config.get("stale_bound"))
        answer: dict[str, Any] = {
            "cas_required": config["cas_required"],
            "delete_version_after": _go_duration(config["delete_version_after"]),
            "max_versions": config["max_versions"],
            "metadata_cas_required": bool(config.get("metadata_cas_required", False)),
        }
        if bound is not None:  # Vault's shape unless the mount states a bound (issue 18)
            answer["max_revocation_staleness"] = bound.max_staleness
            answer["on_stale"] = bound.on_stale
        return answer

    @_storage_errors
    def mount_config(self) -> dict[str, Any]:
        """The mount's settings as stored now (one ledger read), defaults filled in. A
        request that reads them for its freshness guard passes them on to `stale_bound`
        and to `write`/`patch`, so one write reads the config once."""
        return self._config()

    @_storage_errors
    def stale_bound(self, config: Mapping[str, Any] | None = None) -> StaleBound | None:
        """The mount's revocation freshness bound (issue 18), None when unset. `config`:
        the settings this request already read (`mount_config`), else read now."""
        return bound_from_record((self._config() if config is None else config).get("stale_bound"))

    @_storage_errors
    def write_config(
        self,
        max_versions: object = None,
        cas_required: object = None,
        delete_version_after: object = None,
        bound: Mapping[str, Any] | None = None,
        *,
        metadata_cas_required: object = None,
    ) -> None:
        """Only the settings given (not None) change, as in Vault. `bound`: the write's
        body, for `max_revocation_staleness` and `on_stale` (freshness.parse_bound)."""
        changes: dict[str, Any] = {}
        if bound is not None and ("max_revocation_staleness" in bound or "on_stale" in bound):
            parsed = parse_bound(dict(bound), bound_from_record(self._config().get("stale_bound")))
            changes["stale_bound"] = {} if parsed is None else parsed.as_json()
        if max_versions is not None:
            changes["max_versions"] = _uint32("max_versions", max_versions)
        if cas_required is not None:
            changes["cas_required"] = _boolean("cas_required", cas_required)
        if metadata_cas_required is not None:
            changes["metadata_cas_required"] = _boolean("metadata_cas_required", metadata_cas_required)
        if delete_version_after is not None:
            seconds = _duration_seconds("delete_version_after", delete_version_after, signed=True)
            # Negative switches the setting off for every key; zero clears it.
            changes["delete_version_after"] = _DVA_DISABLED if seconds < 0 else seconds
        if not changes:
            return
        for _ in range(MAX_ATTEMPTS):
            found = get_json(self.ledger, self._config_key)
            record, version = found if found is not None else (_default_config(), 0)
            record = {**_default_config(), **record, **changes}
            try:
                self.ledger.put_if(self._config_key, encode_json(record), version)
            except ConflictError:
                continue
            return
        raise _contended()

    # --- data ----------------------------------------------------------------------------

    @_storage_errors
    def write(
        self, path: str, data: object, *, cas: object = None, config: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Store `data` as the secret's next version. `cas` is Vault's options.cas:
        0 writes only if the secret has no version, n only if n is the current one.
        `config`: the mount settings this same request read just before (`mount_config`),
        used by the first attempt only; a retry after a lost race reads them again."""
        secret = self._secret_path(path)
        plaintext = _encode_data(data)
        expected = _cas(cas)
        return self._append(
            secret, expected, must_exist=False, produce=lambda _meta: plaintext, config=config
        )

    @_storage_errors
    def patch(
        self, path: str, data: object, *, cas: object = None, config: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A new version: the current version's data with `data` merged in (RFC 7396
        JSON merge patch: a null removes a key). 404 when there is no live current version.
        `config` as in `write`."""
        secret = self._secret_path(path)
        if data is None:
            raise InvalidRequest("no data provided")
        if not isinstance(data, Mapping):
            raise InvalidRequest("data must be a JSON object")
        expected = _cas(cas)

        def produce(meta: dict[str, Any]) -> bytes:
            current = meta["current_version"]
            vm = meta["versions"].get(str(current))
            if vm is None:
                raise NotFound()
            if self._gone(vm):
                # Vault answers a patch of a deleted/destroyed version 404 with the
                # version's metadata as the body's data (flat, unlike a read).
                raise NotFound(data=self._version_view(current, vm, meta))
            existing = self._open_version(secret, current)
            if existing is None:
                raise NotFound(data=self._version_view(current, vm, meta))
            return _encode_data(_merge_patch(existing, data))

        return self._append(secret, expected, must_exist=True, produce=produce, config=config)

    @_storage_errors
    def read(self, path: str, version: object = None) -> dict[str, Any]:
        """The current version, or `version` when it is a positive number (Vault
        treats 0 and below as "current")."""
        secret = self._secret_path(path)
        wanted = _version_param(version)
        found = self._meta(secret)
        if found is None:
            raise NotFound()
        meta, _ = found
        number = wanted if wanted > 0 else meta["current_version"]
        vm = meta["versions"].get(str(number))
        if vm is None:
            raise NotFound()
        view = self._version_view(number, vm, meta)
        if self._gone(vm):
            raise NotFound(data={"data": None, "metadata": view})
        value = self._open_version(secret, number)
        if value is None:  # destroyed or trimmed between our two reads
            raise NotFound(data={"data": None, "metadata": view})
        return {"data": value, "metadata": view}

    @_storage_errors
    def delete_latest(self, path: str) -> None:
        """Soft-delete the current version (undo with `undelete_versions`)."""
        secret = self._secret_path(path)

        def mutate(meta: dict[str, Any], now: int) -> list[int]:
            vm = meta["versions"].get(str(meta["current_version"]))
            if vm is not None and not vm["destroyed"] and not self._deleted(vm, now):
                vm["deletion_time"] = now
            return []

        self._update(secret, mutate)

    @_storage_errors
    def delete_versions(self, path: str, versions: object) -> None:
        secret = self._secret_path(path)
        numbers = _versions(versions, "No version number provided")

        def mutate(meta: dict[str, Any], now: int) -> list[int]:
            for number in numbers:
                vm = meta["versions"].get(str(number))
                if vm is None or vm["destroyed"] or self._deleted(vm, now):
                    continue
                vm["deletion_time"] = now
            return []

        self._update(secret, mutate)

    @_storage_errors
    def undelete_versions(self, path: str, versions: object) -> None:
        secret = self._secret_path(path)
        numbers = _versions(versions, "No version number provided")

        def mutate(meta: dict[str, Any], now: int) -> list[int]:
            config = self._config()
            for number in numbers:
                vm = meta["versions"].get(str(number))
                if vm is None or vm["destroyed"]:
                    continue
                # As Vault: an undeleted version's delete_version_after clock restarts.
                vm["deletion_time"] = _deletion_time(now, config, meta)
            return []

        self._update(secret, mutate)

    @_storage_errors
    def destroy_versions(self, path: str, versions: object) -> None:
        """Mark the versions destroyed and remove their sealed values from storage,
        in the same transaction as the metadata change."""
        secret = self._secret_path(path)
        numbers = _versions(versions, "no version number provided")
        leftovers: list[int] = []

        def mutate(meta: dict[str, Any], now: int) -> list[int]:
            doomed = []
            leftovers.clear()
            for number in numbers:
                vm = meta["versions"].get(str(number))
                if vm is None:
                    continue
                if vm["destroyed"]:
                    # Already destroyed: make sure no value survived an interrupted run.
                    leftovers.append(number)
                    continue
                vm["destroyed"] = True
                doomed.append(number)
            return doomed

        self._update(secret, mutate)
        self._purge(secret, leftovers)

    # --- metadata --------------------------------------------------------------------------

    @_storage_errors
    def read_metadata(self, path: str) -> dict[str, Any]:
        secret = self._secret_path(path)
        found = self._meta(secret)
        if found is None:
            raise NotFound()
        meta, _ = found
        return {
            "cas_required": meta["cas_required"],
            "created_time": _rfc3339(meta["created_time"]),
            "current_version": meta["current_version"],
            # OpenBao's count of metadata writes (write_metadata, patch_metadata): 0 for
            # metadata only ever made by writing data; what `metadata_cas` is checked against
            "current_metadata_version": meta.get("metadata_version", 0),
            "custom_metadata": meta["custom_metadata"] or None,
            "delete_version_after": _go_duration(meta["delete_version_after"]),
            "max_versions": meta["max_versions"],
            "metadata_cas_required": meta.get("metadata_cas_required", False),
            "oldest_version": meta["oldest_version"],
            "updated_time": _rfc3339(meta["updated_time"]),
            "versions": {
                number: {
                    "created_time": _rfc3339(vm["created_time"]),
                    "deletion_time": _rfc3339(vm["deletion_time"]),
                    "destroyed": vm["destroyed"],
                }
                for number, vm in sorted(meta["versions"].items(), key=lambda kv: int(kv[0]))
            },
        }

    @_storage_errors
    def write_metadata(
        self,
        path: str,
        max_versions: object = None,
        cas_required: object = None,
        delete_version_after: object = None,
        custom_metadata: object = None,
        metadata_cas_required: object = None,
        metadata_cas: object = None,
    ) -> None:
        """Create the metadata if absent and set the settings given (not None);
        `custom_metadata` replaces the whole map. Nothing given: nothing happens.
        `metadata_cas`: the current_metadata_version the write expects (checked, and
        required once `metadata_cas_required` is set, as OpenBao does)."""
        secret = self._secret_path(path)
        changes = _metadata_changes(max_versions, cas_required, delete_version_after, metadata_cas_required)
        expected = _metadata_cas(metadata_cas)
        if custom_metadata is not None:
            changes["custom_metadata"] = _custom_metadata(custom_metadata, patch=False)
        if not changes:
            return
        mount_requires = bool(self._config().get("metadata_cas_required", False))

        def mutate(meta: dict[str, Any], now: int) -> list[int]:
            _check_metadata_cas(meta, expected, mount_requires)
            meta.update(changes)
            meta["metadata_version"] = meta.get("metadata_version", 0) + 1
            return []

        self._update(secret, mutate, create=True)

    @_storage_errors
    def patch_metadata(
        self,
        path: str,
        max_versions: object = None,
        cas_required: object = None,
        delete_version_after: object = None,
        custom_metadata: object = None,
        metadata_cas_required: object = None,
        metadata_cas: object = None,
    ) -> None:
        """Change the settings given (not None) on existing metadata (404 if none);
        `custom_metadata` is merged, a null value removing that key. `metadata_cas` as
        in `write_metadata`."""
        secret = self._secret_path(path)
        changes = _metadata_changes(max_versions, cas_required, delete_version_after, metadata_cas_required)
        expected = _metadata_cas(metadata_cas)
        patch = _custom_metadata(custom_metadata, patch=True) if custom_metadata is not None else None
        mount_requires = bool(self._config().get("metadata_cas_required", False))

        def mutate(meta: dict[str, Any], now: int) -> list[int]:
            _check_metadata_cas(meta, expected, mount_requires)
            meta.update(changes)
            meta["metadata_version"] = meta.get("metadata_version", 0) + 1
            if patch is not None:
                merged = dict(meta["custom_metadata"])
                for key, value in patch.items():
                    if value is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = value
                _validate_custom_metadata(merged)
                meta["custom_metadata"] = merged
            return []

        if not self._update(secret, mutate):
            raise NotFound()

    @_storage_errors
    def delete_metadata(self, path: str) -> None:
        """Remove the metadata and every version's sealed value, permanently."""
        secret = self._secret_path(path)
        meta_key = self._meta_key(secret)
        for _ in range(MAX_ATTEMPTS):
            found = self.ledger.get(meta_key, consistent=True)
            # Every version item under the path, including any an interrupted cleanup
            # left behind; the metadata goes last, so a retry finds the rest.
            deletes: list[Op] = [Delete(item.key, item.version) for item in self._version_items(secret)]
            room = MAX_TRANSACTION_ITEMS - (1 if found is not None else 0)
            try:
                while len(deletes) > room:
                    self.ledger.transact(deletes[:MAX_TRANSACTION_ITEMS])
                    deletes = deletes[MAX_TRANSACTION_ITEMS:]
                final = deletes + ([Delete(meta_key, found.version)] if found is not None else [])
                if final:
                    self.ledger.transact(final)
            except ConflictError:
                continue  # a writer got in between: start over from what is there now
            return
        raise _contended()

    # --- internals -----------------------------------------------------------------------------

    def _secret_path(self, path: object) -> str:
        secret = _check_path(path, allow_empty=False)
        ledger_path = f"{self.mount}/{secret}#{0:0{_VERSION_DIGITS}d}"
        if len(ledger_path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise InvalidRequest(
                f"the secret path is too long: mount, path and version together take at most "
                f"{MAX_PATH_BYTES} bytes"
            )
        return secret

    def _meta_key(self, secret: str) -> Key:
        return Key(Kind.SECRET_META, f"{self.mount}/{secret}")

    def _version_key(self, secret: str, number: int) -> Key:
        return Key(Kind.SECRET_VERSION, f"{self.mount}/{secret}#{number:0{_VERSION_DIGITS}d}")

    def _aad(self, secret: str, number: int) -> bytes:
        # Binds a sealed value to where it belongs: moved to another mount, path or
        # version, it no longer opens.
        return f"keycell:kv2:{self.mount}/{secret}#{number}".encode()

    def _now(self) -> int:
        """Now, in epoch microseconds (how times are kept in the metadata)."""
        return round(self.clock() * 1_000_000)

    def _config(self) -> dict[str, Any]:
        found = get_json(self.ledger, self._config_key)
        return {**_default_config(), **(found[0] if found is not None else {})}

    def _meta(self, secret: str) -> tuple[dict[str, Any], int] | None:
        return get_json(self.ledger, self._meta_key(secret))

    def _deleted(self, vm: Mapping[str, Any], now: int) -> bool:
        # Due at `now` counts as deleted, so a delete is visible at once even to a
        # read in the same microsecond.
        deletion = vm["deletion_time"]
        return deletion is not None and deletion <= now

    def _gone(self, vm: Mapping[str, Any]) -> bool:
        return bool(vm["destroyed"]) or self._deleted(vm, self._now())

    def _version_view(self, number: int, vm: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "created_time": _rfc3339(vm["created_time"]),
            "custom_metadata": meta["custom_metadata"] or None,
            "deletion_time": _rfc3339(vm["deletion_time"]),
            "destroyed": vm["destroyed"],
            "version": number,
        }

    def _open_version(self, secret: str, number: int) -> dict[str, Any] | None:
        key = self._version_key(secret, number)
        # A strongly consistent read even though versions never change: after
        # delete_metadata and a new write, the same key holds a new version 1, and a
        # replica could still serve the deleted one (which would open: same AAD).
        item = self.ledger.get(key, consistent=True)
        if item is None:
            return None
        plaintext = self.envelopes.open(Envelope.from_bytes(item.value), self._aad(secret, number))
        value = json.loads(plaintext)
        if not isinstance(value, dict):
            raise ValueError(f"the stored value of version {number} is not a JSON object")
        return value

    def _version_items(self, secret: str) -> Iterator[Item]:
        prefix = f"{self.mount}/{secret}#"
        for item in iter_prefix(self.ledger, Kind.SECRET_VERSION, prefix):
            # Another secret's name may continue with "#" (say "a#b" under "a"):
            # only "<prefix><digits>" is one of ours.
            suffix = item.key.path[len(prefix) :]
            if suffix.isascii() and suffix.isdigit():
                yield item

    def _append(
        self,
        secret: str,
        cas: int | None,
        *,
        must_exist: bool,
        produce: Callable[[dict[str, Any]], bytes],
        config: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Add a version: the sealed value, the metadata and the deletion of versions
        beyond max_versions in one transaction, conditional on the metadata version.
        A lost race re-reads and re-checks everything, cas included: with cas, a
        writer that got in first moved the current version, so ours is a mismatch.
        `config`: the mount settings the request read before (its freshness guard), for
        the first attempt; every retry reads them again (cas_required or max_versions
        may have changed with the race)."""
        meta_key = self._meta_key(secret)
        item_versions: dict[int, int] = {}  # trimmed versions whose item is not at version 1
        given = config
        for _ in range(MAX_ATTEMPTS):
            config, given = (self._config() if given is None else given), None
            found = self._meta(secret)
            if found is None:
                if must_exist:
                    raise NotFound()
                meta, meta_version = _new_meta(), 0
            else:
                meta, meta_version = found
            _check_cas(cas, config, meta)
            plaintext = produce(meta)
            now = self._now()
            number = meta["current_version"] + 1
            envelope = self.envelopes.seal(plaintext, self._aad(secret, number))
            vm = {"created_time": now, "deletion_time": _deletion_time(now, config, meta), "destroyed": False}
            trimmed = _add_version(meta, number, vm, config["max_versions"])
            doomed = [n for n in trimmed if item_versions.get(n, 1) > 0]
            head: list[Op] = [
                Put(self._version_key(secret, number), envelope.to_bytes(), 0),
                Put(meta_key, encode_json(meta), meta_version),
            ]
            inline = doomed[: MAX_TRANSACTION_ITEMS - len(head)]
            ops = head + [Delete(self._version_key(secret, n), item_versions.get(n, 1)) for n in inline]
            try:
                self.ledger.transact(ops)
            except TransactionConflictError as exc:
                _note_item_conflict(exc, len(head), inline, item_versions)
                continue
            # Versions past one transaction's worth (max_versions lowered a lot) are no
            # longer in the metadata; their values go now, as Vault's cleanup does.
            self._purge(secret, doomed[len(inline) :])
            return {
                "created_time": _rfc3339(now),
                "custom_metadata": meta["custom_metadata"] or None,
                "deletion_time": _rfc3339(vm["deletion_time"]),
                "destroyed": False,
                "version": number,
            }
        raise _contended()

    def _update(
        self,
        secret: str,
        mutate: Callable[[dict[str, Any], int], list[int]],
        *,
        create: bool = False,
    ) -> bool:
        """Read-modify-write of the metadata by compare-and-set. `mutate` changes the
        record in place and returns the versions whose sealed values must go in the
        same transaction. False when there is no metadata (and `create` is off)."""
        meta_key = self._meta_key(secret)
        item_versions: dict[int, int] = {}
        for _ in range(MAX_ATTEMPTS):
            found = self._meta(secret)
            now = self._now()
            if found is None:
                if not create:
                    return False
                meta, meta_version = _new_meta(), 0
                meta["created_time"] = meta["updated_time"] = now
            else:
                meta, meta_version = found
            before = encode_json(meta)
            doomed = [n for n in mutate(meta, now) if item_versions.get(n, 1) > 0]
            record = encode_json(meta)
            if record == before and meta_version and not doomed:
                return True  # nothing changes; skip the write
            head: list[Op] = [Put(meta_key, record, meta_version)]
            inline = doomed[: MAX_TRANSACTION_ITEMS - len(head)]
            ops = head + [Delete(self._version_key(secret, n), item_versions.get(n, 1)) for n in inline]
            try:
                self.ledger.transact(ops)
            except TransactionConflictError as exc:
                _note_item_conflict(exc, len(head), inline, item_versions)
                continue
            self._purge(secret, doomed[len(inline) :])
            return True
        raise _contended()

    def _purge(self, secret: str, numbers: Iterable[int]) -> None:
        """Remove version items outside a transaction (those that did not fit in one,
        or that an interrupted run left). Idempotent."""
        for number in numbers:
            key = self._version_key(secret, number)
            item = self.ledger.get(key, consistent=True)
            if item is None:
                continue
            with contextlib.suppress(ConflictError):  # removed by someone else meanwhile
                self.ledger.delete_if(key, item.version)

    # `list` shadows the builtin inside the class body, so it comes last.
    @_storage_errors
    def list(self, prefix: str = "") -> dict[str, Any]:
        """The names directly under `prefix`: secrets as "name", folders as "name/"
        (Vault's LIST); NotFound when there are none."""
        folder = _check_path(prefix.rstrip("/") if isinstance(prefix, str) else prefix, allow_empty=True)
        base = f"{self.mount}/{folder}/" if folder else f"{self.mount}/"
        keys: set[str] = set()
        for item in iter_prefix(self.ledger, Kind.SECRET_META, base):
            name, slash, _ = item.key.path[len(base) :].partition("/")
            keys.add(name + slash)
        if not keys:
            raise NotFound()
        return {"keys": sorted(keys)}


# --- records -------------------------------------------------------------------------


def _default_config() -> dict[str, Any]:
    return {"max_versions": 0, "cas_required": False, "delete_version_after": 0}


def _new_meta() -> dict[str, Any]:
    return {
        "current_version": 0,
        "oldest_version": 0,
        "max_versions": 0,
        "cas_required": False,
        "delete_version_after": 0,
        "custom_metadata": {},
        "created_time": None,
        "updated_time": None,
        "versions": {},
    }


def _add_version(meta: dict[str, Any], number: int, vm: dict[str, Any], config_max: int) -> list[int]:
    """Record version `number` and slide the max_versions window as Vault does (the
    larger of the secret's and the mount's setting, else 10). Returns the versions
    that fell out of it and still have a stored value."""
    meta["current_version"] = number
    meta["versions"][str(number)] = vm
    meta["updated_time"] = vm["created_time"]
    if meta["created_time"] is None:
        meta["created_time"] = vm["created_time"]
    keep = max(meta["max_versions"], config_max) or DEFAULT_MAX_VERSIONS
    dropped: list[int] = []
    if number - meta["oldest_version"] >= keep:
        last = number - keep
        for old in range(meta["oldest_version"], last + 1):
            removed = meta["versions"].pop(str(old), None)
            if removed is not None and not removed["destroyed"]:
                dropped.append(old)
        meta["oldest_version"] = last + 1
    return dropped


def _deletion_time(now: int, config: Mapping[str, Any], meta: Mapping[str, Any]) -> int | None:
    """When a version written (or undeleted) `now` is to read as deleted: after the
    smaller non-zero delete_version_after of mount and secret, unless the mount
    switched it off."""
    mount = config["delete_version_after"]
    if mount == _DVA_DISABLED:
        return None
    candidates = [s for s in (mount, meta["delete_version_after"]) if s > 0]
    if not candidates:
        return None
    return now + int(min(candidates)) * 1_000_000


def _check_cas(cas: int | None, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    if cas is not None:
        if cas != meta["current_version"]:
            raise InvalidRequest(_CAS_MISMATCH)
    elif config["cas_required"] or meta["cas_required"]:
        raise InvalidRequest(_CAS_REQUIRED)


def _note_item_conflict(
    exc: TransactionConflictError, head: int, inline: list[int], item_versions: dict[int, int]
) -> None:
    """A Delete of an old version's item failed: remember what is really there (0: it
    is already gone) so the retry does not fail the same way."""
    if exc.index >= head:
        item_versions[inline[exc.index - head]] = exc.current_version


def _contended() -> Unavailable:
    return Unavailable("too many concurrent changes to this secret; retry later")


# --- input -----------------------------------------------------------------------------


def _check_mount(mount: object) -> str:
    if not isinstance(mount, str) or not mount:
        raise ValueError("a KV mount is a non-empty path such as 'secret'")
    return _check_path(mount, allow_empty=False, what="mount")


def _check_path(path: object, *, allow_empty: bool, what: str = "path") -> str:
    if not isinstance(path, str):
        raise InvalidRequest(f"the secret {what} must be a string")
    if not path:
        if allow_empty:
            return path
        raise InvalidRequest("missing path")
    if path.startswith("/"):
        raise InvalidRequest(f"the secret {what} must not start with '/'")
    segments = path.split("/")
    if any(s in (".", "..") for s in segments):
        raise InvalidRequest(f"the secret {what} must not contain '.' or '..' segments")
    if any(s == "" for s in segments):
        raise InvalidRequest(f"the secret {what} must not contain empty segments ('//' or a trailing '/')")
    if not path.isprintable():
        raise InvalidRequest(f"the secret {what} must not contain control or unprintable characters")
    return path


def _encode_data(data: object) -> bytes:
    if data is None:
        raise InvalidRequest("no data provided")
    if not isinstance(data, Mapping):
        raise InvalidRequest("data must be a JSON object")
    try:
        encoded = json.dumps(dict(data), separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):
        raise InvalidRequest("data must be a JSON object of JSON values") from None
    if len(encoded) > MAX_SECRET_BYTES:
        raise InvalidRequest(
            f"the secret's data is {len(encoded)} bytes as JSON; the limit is {MAX_SECRET_BYTES}"
        )
    return encoded


def _merge_patch(target: object, patch: object) -> object:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return patch
    merged = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge_patch(merged.get(key), value)
    return merged


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _integer(name: str, value: object) -> int:
    """An int as Vault's weak decoding reads one: a number, or a string of digits."""
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    raise InvalidRequest(f"{name} must be an integer")


def _uint32(name: str, value: object) -> int:
    number = _integer(name, value)
    if not 0 <= number <= 0xFFFF_FFFF:
        raise InvalidRequest(f"{name} must be between 0 and {0xFFFF_FFFF}")
    return number


def _boolean(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        # Go's strconv.ParseBool, which Vault uses for string input.
        if value in ("1", "t", "T", "true", "TRUE", "True"):
            return True
        if value in ("0", "f", "F", "false", "FALSE", "False"):
            return False
    raise InvalidRequest(f"{name} must be a boolean")


def _cas(value: object) -> int | None:
    if value is None:
        return None
    try:
        return _integer("cas", value)
    except InvalidRequest:
        raise InvalidRequest("error parsing check-and-set parameter") from None


def _version_param(value: object) -> int:
    if value is None:
        return 0
    return _integer("version", value)


def _versions(value: object, missing: str) -> list[int]:
    """Vault's comma-separated int slice: a list of numbers or "1,2,3"."""
    if value is None:
        raise InvalidRequest(missing)
    items: list[object]
    if isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        items = [value]
    numbers = [_integer("versions", item) for item in items]
    if not numbers:
        raise InvalidRequest(missing)
    # Numbers below 1 name no version; duplicates change nothing.
    return sorted({n for n in numbers if n > 0})


_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_TERM = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def _duration_seconds(name: str, value: object, *, signed: bool) -> int:
    """Whole seconds from Vault's duration input: a number of seconds, a string of
    digits, "<n>d", or a Go duration string ("3h25m19s", "1.5h")."""
    seconds: float
    if isinstance(value, bool):
        raise InvalidRequest(f'{name} must be a duration such as 3600 or "1h"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            seconds = 0.0
        elif _INTEGER.fullmatch(text):
            seconds = float(int(text))
        elif text.endswith("d") and _INTEGER.fullmatch(text[:-1]):
            seconds = float(int(text[:-1]) * 86400)
        else:
            parsed = _parse_go_duration(text)
            if parsed is None:
                raise InvalidRequest(f'{name} must be a duration such as 3600 or "1h"')
            seconds = parsed
    else:
        raise InvalidRequest(f'{name} must be a duration such as 3600 or "1h"')
    if seconds != seconds or abs(seconds) > 1e12:  # NaN or absurd
        raise InvalidRequest(f"{name} is out of range")
    whole = int(seconds)  # Vault truncates to whole seconds
    if whole < 0 and not signed:
        raise InvalidRequest(f"{name} cannot be negative")
    return whole


def _parse_go_duration(text: str) -> float | None:
    sign = 1.0
    if text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    total = 0.0
    position = 0
    while position < len(text):
        match = _GO_TERM.match(text, position)
        if match is None or match.group(1) in ("", "."):
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        position = match.end()
    return sign * total if text else None


def _metadata_cas(value: object) -> int | None:
    """The `metadata_cas` a metadata write expects, or None when it gives none."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest("metadata_cas must be a non-negative integer (a current_metadata_version)")
    return value


def _check_metadata_cas(meta: Mapping[str, Any], expected: int | None, mount_requires: bool = False) -> None:
    """Refuse a metadata write whose `metadata_cas` is not the current metadata version,
    or that gives none when the secret's (or the mount's) metadata_cas_required is set."""
    current = int(meta.get("metadata_version", 0))
    if expected is None:
        if mount_requires or meta.get("metadata_cas_required", False):
            raise InvalidRequest("check-and-set parameter required for this call: send metadata_cas")
    elif expected != current:
        raise InvalidRequest(
            f"check-and-set parameter did not match the current metadata version ({current}); read and retry"
        )


def _metadata_changes(
    max_versions: object,
    cas_required: object,
    delete_version_after: object,
    metadata_cas_required: object = None,
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if metadata_cas_required is not None:
        changes["metadata_cas_required"] = _boolean("metadata_cas_required", metadata_cas_required)
    if max_versions is not None:
        changes["max_versions"] = _uint32("max_versions", max_versions)
    if cas_required is not None:
        changes["cas_required"] = _boolean("cas_required", cas_required)
    if delete_version_after is not None:
        changes["delete_version_after"] = _duration_seconds(
            "delete_version_after", delete_version_after, signed=False
        )
    return changes


def _custom_metadata(value: object, *, patch: bool) -> dict[str, str | None]:
    """custom_metadata as Vault reads it: a map of strings (numbers and booleans are
    turned into strings). In a patch, a null value removes the key."""
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{_CM_ERROR}: custom_metadata must be a JSON object")
    parsed: dict[str, str | None] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise InvalidRequest(f"{_CM_ERROR}: keys must be strings")
        if item is None:
            parsed[key] = None if patch else ""
        elif isinstance(item, bool):
            parsed[key] = "1" if item else "0"
        elif isinstance(item, str):
            parsed[key] = item
        elif isinstance(item, int | float):
            parsed[key] = str(item)
        else:
            raise InvalidRequest(f"{_CM_ERROR}: value for key {json.dumps(key)} must be a string")
    _validate_custom_metadata({k: v for k, v in parsed.items() if v is not None})
    return parsed


def _validate_custom_metadata(metadata: Mapping[str, str]) -> None:
    if len(metadata) > MAX_CUSTOM_METADATA_KEYS:
        raise InvalidRequest(
            f"{_CM_ERROR}: payload must contain at most {MAX_CUSTOM_METADATA_KEYS} keys, "
            f"provided {len(metadata)}"
        )
    problems: list[str] = []
    for key, value in sorted(metadata.items()):
        quoted = json.dumps(key)
        key_length = len(key.encode())
        if not 0 < key_length <= MAX_CUSTOM_METADATA_KEY_LENGTH:
            problems.append(
                f"length of key {quoted} is {key_length} but must be 0 < len(key) <= "
                f"{MAX_CUSTOM_METADATA_KEY_LENGTH}"
            )
        value_length = len(value.encode())
        if not 0 < value_length <= MAX_CUSTOM_METADATA_VALUE_LENGTH:
            problems.append(
                f"length of value for key {quoted} is {value_length} but must be 0 < len(value) <= "
                f"{MAX_CUSTOM_METADATA_VALUE_LENGTH}"
            )
        if not key.isprintable():
            problems.append(f"key {quoted} contains unprintable characters")
        if not value.isprintable():
            problems.append(f"value for key {quoted} contains unprintable characters")
    if problems:
        raise InvalidRequest(f"{_CM_ERROR}: " + "; ".join(problems))


# --- output ----------------------------------------------------------------------------


def _rfc3339(micros: int | None) -> str:
    """Go's RFC3339Nano in UTC (trailing zeros of the fraction dropped), "" for unset."""
    if micros is None:
        return ""
    seconds, fraction = divmod(micros, 1_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))  # a third of datetime's cost
    if fraction:
        text += "." + f"{fraction:06d}".rstrip("0")
    return text + "Z"


def _go_duration(seconds: int) -> str:
    """Go's time.Duration.String() for whole seconds: "0s", "1m30s", "1h0m0s", "-1s"."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    remaining = abs(seconds)
    hours, remaining = divmod(remaining, 3600)
    minutes, secs = divmod(remaining, 60)
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"

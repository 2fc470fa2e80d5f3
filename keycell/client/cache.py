"""WrappedSecretCache: unwrap a response-wrapped secret once, keep the result until it
expires, so a restarting process (a restarting fleet) reuses it instead of logging
in again, and a wrapping token handed to a pod at start is not spent twice.

Entries live in memory, or on disk in one JSON file only the user can read and
write (created 0600, replaced atomically, refused if anyone else could read it or
another user owns it). The file holds live tokens: put it where the process's
other secrets live (a tmpfs, the pod's own volume), never on shared storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from keycell.client.errors import KeycellError
from keycell.client.model import Credential, auth_credential
from keycell.control_plane.private_files import open_private, private_dir, write_private


def wrapping_key(wrapping_token: str) -> str:
    """The cache key of a wrapping token: its digest (the token is never stored)."""
    return "wrap:" + hashlib.sha256(wrapping_token.encode()).hexdigest()


class UnsafeCacheFile(KeycellError):
    hint = "the cache file is readable by others or owned by another user: fix its mode (0600) and owner"


class WrappedSecretCache:
    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        margin: float = 5.0,
        default_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`path`: the file (None: memory only). `margin`: an entry this close to its
        expiry counts as expired. `default_ttl`: how long to keep an unwrapped answer
        that carries no lease duration."""
        self.path = os.fspath(path) if path is not None else None
        self.margin = margin
        self.default_ttl = default_ttl
        self.clock = clock
        self._memory: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.unwraps = 0  # unwrap requests this instance sent
        self.hits = 0

    # --- storage ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _entries(self, write: bool) -> Iterator[dict[str, dict[str, Any]]]:
        with self._lock:
            if self.path is None:
                yield self._memory
                return
            folder = os.path.dirname(os.path.abspath(self.path))
            private_dir(folder)
            lock_fd = open_private(self.path + ".lock")
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
                entries = self._load()
                yield entries
                if write:
                    self._store(entries, folder)
            finally:
                os.close(lock_fd)

    def _load(self) -> dict[str, dict[str, Any]]:
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise UnsafeCacheFile([f"refusing to use {self.path}"])
            try:
                loaded = json.loads(handle.read() or b"{}")
            except ValueError:
                return {}  # a torn or foreign file: start afresh
        return loaded if isinstance(loaded, dict) else {}

    def _store(self, entries: dict[str, dict[str, Any]], folder: str) -> None:
        assert self.path is not None
        now = self.clock()
        live = {k: v for k, v in entries.items() if float(v.get("expires_at", 0)) > now}
        write_private(self.path, json.dumps(live).encode())

    # --- entries ----------------------------------------------------------------------

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached unwrapped response for `key`, if it has not expired."""
        with self._entries(write=False) as entries:
            entry = entries.get(key)
        if entry is None or float(entry["expires_at"]) - self.margin <= self.clock():
            return None
        self.hits += 1
        response = entry["response"]
        return response if isinstance(response, dict) else None

    def put(
        self, key: str, response: dict[str, Any], expires_at: float, credential: Credential | None = None
    ) -> None:
        entry: dict[str, Any] = {"response": response, "expires_at": expires_at}
        if credential is not None:
            entry["credential"] = asdict(credential)
        with self._entries(write=True) as entries:
            entries[key] = entry

    def discard(self, key: str) -> None:
        with self._entries(write=True) as entries:
            entries.pop(key, None)

    def discard_subject(self, subject: str) -> int:
        """Drop every entry whose credential the revocation `subject` names."""
        with self._entries(write=True) as entries:
            doomed = [
                k
                for k, v in entries.items()
                if "credential" in v and subject in Credential(**_credential_fields(v["credential"])).subjects
            ]
            for key in doomed:
                del entries[key]
        return len(doomed)

    def credential(self, key: str) -> Credential | None:
        with self._entries(write=False) as entries:
            entry = entries.get(key)
        if entry is None or "credential" not in entry:
            return None
        if float(entry["expires_at"]) - self.margin <= self.clock():
            return None
        self.hits += 1
        return Credential(**_credential_fields(entry["credential"]))

    # --- unwrapping -------------------------------------------------------------------

    def _expiry(self, response: dict[str, Any], now: float) -> float:
        auth = response.get("auth")
        if isinstance(auth, dict) and auth.get("lease_duration"):
            return now + float(auth["lease_duration"])
        if response.get("lease_duration"):
            return now + float(response["lease_duration"])
        return now + self.default_ttl

    def unwrap(self, client: Any, wrapping_token: str, *, key: str | None = None) -> dict[str, Any]:
        """The unwrapped response: from the cache, or unwrapped now (once) and cached
        until it expires. `client` is a `Client` (blocking)."""
        key = key or wrapping_key(wrapping_token)
        cached = self.get(key)
        if cached is not None:
            return cached
        now = self.clock()
        response: dict[str, Any] = client.unwrap(wrapping_token)
        self.unwraps += 1
        self._remember(key, response, now)
        return response

    async def unwrap_async(
        self, client: Any, wrapping_token: str, *, key: str | None = None
    ) -> dict[str, Any]:
        """`unwrap` for an `AsyncClient` (the file work is small and local)."""
        key = key or wrapping_key(wrapping_token)
        cached = self.get(key)
        if cached is not None:
            return cached
        now = self.clock()
        response: dict[str, Any] = await client.unwrap(wrapping_token)
        self.unwraps += 1
        self._remember(key, response, now)
        return response

    def _remember(self, key: str, response: dict[str, Any], now: float) -> None:
        credential = None
        if isinstance(response.get("auth"), dict):
            credential = auth_credential(response)
            credential = Credential(**{**asdict(credential), "obtained_at": now})
        self.put(key, response, self._expiry(response, now), credential)

    def login(self, client: Any, key: str, *, wrap_ttl: str = "300s") -> Credential:
        """A token for `client` (a `Client` with role= and jwt_source=): the cached one
        while it lives, else a JWT login answered wrapped, unwrapped once and cached."""
        cached = self.credential(key)
        if cached is None:
            info = client.login_wrapped(wrap_ttl)
            self.unwrap(client, str(info["token"]), key=key)
            cached = self.credential(key)
            assert cached is not None
        client.use_credential(cached)
        return cached


def _credential_fields(record: dict[str, Any]) -> dict[str, Any]:
    fields = dict(record)
    fields["policies"] = tuple(fields.get("policies") or ())
    return fields

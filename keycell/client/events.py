"""RevocationSubscription: follow the regional API's revocation stream
(GET /v1/sys/events/revocations, server-sent events) and drop a revoked credential
the moment its accessor (`token:<accessor>`) or lease (`lease:<id>`) appears,
instead of finding out at the next request or renewal.

A background thread holds the stream open, reconnecting with decorrelated jitter;
each revocation goes to the client (`Client.revoked` / `AsyncClient.revoked`: the
token is dropped), to the watchers and caches registered, then to `on_revoked`.
The asyncio client uses the same thread: the work per event is a few set lookups.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from keycell.client.policy import decorrelated_jitter

OnRevoked = Callable[[str, dict[str, Any]], None]


class RevocationSubscription:
    def __init__(
        self,
        client: Any,
        *,
        leases: Iterable[str] = (),
        watchers: Iterable[Any] = (),
        caches: Iterable[Any] = (),
        on_revoked: OnRevoked | None = None,
        read_timeout: float = 45.0,
    ) -> None:
        self.client = client
        self.leases = list(leases)
        self.watchers = list(watchers)
        self.caches = list(caches)
        self.on_revoked = on_revoked
        self.read_timeout = read_timeout
        self.ready = threading.Event()  # set once the stream is open
        self.heard: list[str] = []
        self.reconnects = 0
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> RevocationSubscription:
        self._thread = threading.Thread(target=self._run, name="keycell-revocations", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _path(self) -> str:
        path = "/v1/sys/events/revocations"
        if self.leases:
            path += "?leases=" + ",".join(quote(lease, safe="/") for lease in self.leases)
        return path

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            token = self.client.token
            if token is None:
                return  # nothing left to protect
            try:
                self._follow(token)
                backoff = 0.0
            except (OSError, http.client.HTTPException, ValueError):
                pass
            if self._stop.is_set() or self.client.token is None:
                return
            self.reconnects += 1
            backoff = decorrelated_jitter(backoff or 0.2, base=0.2, cap=10.0)
            self._stop.wait(backoff)

    def _follow(self, token: str) -> None:
        conn = self.client.transport.connect(timeout=self.read_timeout)
        self._conn = conn
        try:
            conn.request("GET", self._path(), headers={"X-Vault-Token": token, "Accept": "text/event-stream"})
            response = conn.getresponse()
            if response.status != 200:
                response.read()
                if response.status == 403:
                    self._deliver("token:" + getattr(self.client.credential, "accessor", ""), {})
                raise ValueError(f"revocation stream refused: {response.status}")
            event, data = "", ""
            while not self._stop.is_set():
                raw = response.readline()
                if not raw:
                    return
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if event == "ready":
                        self.ready.set()
                    elif event == "revocation" and data:
                        record = json.loads(data)
                        self._deliver(str(record.get("subject", "")), record)
                    event, data = "", ""
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
        finally:
            self._conn = None
            conn.close()

    def _deliver(self, subject: str, record: dict[str, Any]) -> None:
        if not subject or subject == "token:":
            return
        self.heard.append(subject)
        self.client.revoked(subject)
        for watcher in self.watchers:
            watcher.revoked(subject)
        for cache in self.caches:
            cache.discard_subject(subject)
        if self.on_revoked is not None:
            self.on_revoked(subject, record)

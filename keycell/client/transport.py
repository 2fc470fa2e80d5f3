"""HTTP/1.1 with keep-alive over http.client: one connection per thread (the async
client runs it in worker threads through asyncio.to_thread)."""

from __future__ import annotations

import http.client
import json
import threading
from typing import Any
from urllib.parse import urlsplit

from keycell.client.errors import ConnectionFailed
from keycell.client.model import Response


class Transport:
    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout = timeout
        self._local = threading.local()

    def connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout if timeout is None else timeout)

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        conn = self.connect()
        self._local.conn = conn
        return conn, False

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def send(self, method: str, path: str, headers: dict[str, str], body: dict[str, Any] | None) -> Response:
        payload = None if body is None else json.dumps(body).encode()
        sent_headers = dict(headers)
        if payload is not None:
            sent_headers["Content-Type"] = "application/json"
        for attempt in range(2):
            conn, reused = self._connection()
            try:
                conn.request(method, "/v1/" + path, body=payload, headers=sent_headers)
                answer = conn.getresponse()
                data = answer.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # A kept-alive connection the server closed meanwhile: retry once, fresh.
                if (
                    reused
                    and attempt == 0
                    and isinstance(
                        exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError
                    )
                ):
                    continue
                raise ConnectionFailed([f"{type(exc).__name__} talking to {self.host}:{self.port}"]) from None
            if answer.getheader("connection", "").lower() == "close":
                self.close()
            return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
        raise ConnectionFailed([f"could not reach {self.host}:{self.port}"])

"""HTTP/1.1 with keep-alive over http.client: one connection per thread (the async
client runs it in worker threads through asyncio.to_thread)."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

from keycell.client.errors import ConnectionFailed
from keycell.client.model import Response


def tls_context(verify: bool | str | None = None) -> ssl.SSLContext:
    """The context HTTPS requests verify the server with, as Vault's clients choose it:
    `verify` a CA bundle's path, True (the system's CAs), False (no verification: tests
    against a throwaway certificate only), or None: $VAULT_CACERT, else $VAULT_CAPATH,
    else the system's CAs ($VAULT_SKIP_VERIFY is not honoured)."""
    if verify is None:
        verify = os.environ.get("VAULT_CACERT") or True
        if verify is True and os.environ.get("VAULT_CAPATH"):
            return ssl.create_default_context(capath=os.environ["VAULT_CAPATH"])
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=None if verify is True else verify)


class Transport:
    def __init__(self, url: str, *, timeout: float = 30.0, verify: bool | str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout = timeout
        self.tls = tls_context(verify) if parts.scheme == "https" else None
        self._local = threading.local()

    def connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        timeout = self.timeout if timeout is None else timeout
        if self.tls is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self.tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

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

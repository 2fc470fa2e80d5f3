"""Self-hosted regional API, served by uvicorn (httptools, uvloop): several worker
processes sharing one listening socket, keep-alive.

It serves the same router and route table as the Chalice app
(keycell.functions.api.app), through the same HTTP translation
(keycell.functions.api.http), but without Lambda's event round trip: building an
API Gateway event and running Chalice's event handler cost about 40 us a request,
a sixth of a KV read. Vault's LIST method becomes GET ?list=true here.

`keycell server` configures the cell through the environment (keycell.functions.wiring)
so that every worker builds the same cell; `--dev` makes a throwaway cell that is
initialized and unsealed before the workers start, like `vault server -dev`.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any
from urllib.parse import parse_qsl, unquote

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from keycell.functions.api import http
from keycell.functions.api.app import MAX_DEPTH, router
from keycell.testing.processes import announce_ready

_NOT_FOUND = b'{"errors":["unsupported path"]}'


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    status, headers, payload = handle_http(scope, body)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def handle_http(scope: dict[str, Any], body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request to the router, through the same translation the Chalice handler uses."""
    method = scope["method"].upper()
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
    if method == "LIST":
        method = "GET"
        query["list"] = "true"
    raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?")[0]
    if not raw_path.startswith("/v1/"):
        return 404, [(b"content-type", b"application/json")], _NOT_FOUND
    segments = [unquote(s) for s in raw_path[4:].strip("/").split("/") if s != ""]
    if not segments or len(segments) > MAX_DEPTH:
        return 404, [(b"content-type", b"application/json")], _NOT_FOUND
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", [])}
    client = scope.get("client") or ("", 0)
    status, out, payload = http.handle(router(), method, "/".join(segments), headers, query, body, client[0])
    return status, [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out.items()], payload


class VaultHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp parses about three times faster than h11),
    taught Vault's LIST method, which llhttp does not know: a request that starts with
    `LIST <target>` reaches the parser as `GET <target>?list=true`, which is how Vault
    itself treats LIST. The rewrite applies at the start of each request on a
    connection; a LIST pipelined behind another request in the same packet is not
    rewritten and is refused with 400 (no Vault client pipelines)."""

    _MAX_REQUEST_LINE = 8192

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._at_request_start = True
        self._pending = b""

    def data_received(self, data: bytes) -> None:
        if self._at_request_start:
            data = self._pending + data
            self._pending = b""
            if data.startswith(b"LIST ") or (len(data) < 5 and b"LIST "[: len(data)] == data):
                end = data.find(b" ", 5)
                if end == -1:  # the request line has not all arrived yet
                    if len(data) > self._MAX_REQUEST_LINE:
                        super().data_received(data)  # let the parser refuse it
                        return
                    self._pending = data
                    return
                target = data[5:end]
                data = b"GET " + target + (b"&" if b"?" in target else b"?") + b"list=true" + data[end:]
            self._at_request_start = False
        super().data_received(data)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._at_request_start = True


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # accepting from now: clients may connect before the workers are up
    sock.set_inheritable(True)
    return sock


def serve(host: str, port: int, *, workers: int) -> None:
    """Serve until interrupted; prints `READY <port>` once listening."""
    sock = listen(host, port)
    config = uvicorn.Config(
        "keycell.server:asgi_app",
        workers=workers,
        http=VaultHttpProtocol,
        loop="uvloop",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        server_header=False,
    )
    announce_ready(sock.getsockname()[1])
    sys.stdout.flush()
    if workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        config.load_app()
        uvicorn.Server(config).run(sockets=[sock])


def dev_environment(data_dir: str) -> dict[str, str]:
    """A throwaway cell: SQLite ledger, software keys in a plain file (development
    only), sealed by that key so every worker unseals itself."""
    return {
        "KEYCELL_LEDGER": f"sqlite://{os.path.join(data_dir, 'cell.db')}",
        "KEYCELL_KEY_BACKEND": "software",
        "KEYCELL_SOFTWARE_KEYS": f"sqlite://{os.path.join(data_dir, 'dev-keys.db')}",
        "KEYCELL_SEAL": "hsm",
        "KEYCELL_CELL": os.environ.get("KEYCELL_CELL", "dev"),
    }

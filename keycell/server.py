"""Self-hosted regional API: the Chalice app (keycell.functions.api.app) served by
uvicorn, several worker processes sharing one listening socket, keep-alive.

Each HTTP request becomes the API Gateway proxy event Lambda would receive and goes
through the Chalice app's own route table, so there is one route table whichever
way the API runs. Vault's LIST method (which API Gateway cannot carry) becomes
GET ?list=true here.

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
from uvicorn.supervisors import Multiprocess

from keycell.functions.api.app import MAX_DEPTH, app, route_for_depth
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
    """One request through the Chalice app, as API Gateway would deliver it."""
    method = scope["method"].upper()
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    if method == "LIST":
        method = "GET"
        query.append(("list", "true"))
    raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if not raw_path.startswith("/v1/"):
        return 404, [(b"content-type", b"application/json")], _NOT_FOUND
    segments = [unquote(s) for s in raw_path[4:].split("?")[0].strip("/").split("/") if s != ""]
    if not segments or len(segments) > MAX_DEPTH:
        return 404, [(b"content-type", b"application/json")], _NOT_FOUND
    route = route_for_depth(len(segments))
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers[name.decode("latin-1")] = value.decode("latin-1")
    if body and headers.get("content-type", "").split(";")[0].strip() not in (
        "application/json",
        "application/merge-patch+json",
    ):
        headers["content-type"] = "application/json"  # Vault reads every body as JSON
    multi_query: dict[str, list[str]] = {}
    for key, value in query:
        multi_query.setdefault(key, []).append(value)
    client = scope.get("client") or ("", 0)
    event = {
        "resource": route,
        "path": raw_path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": None,
        "queryStringParameters": {k: v[-1] for k, v in multi_query.items()} or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": {f"p{i}": segment for i, segment in enumerate(segments)},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": route,
            "httpMethod": method,
            "path": raw_path,
            "stage": "v1",
            "identity": {"sourceIp": client[0]},
        },
        "body": body.decode("utf-8", "replace") if body else None,
        "isBase64Encoded": False,
    }
    result = app(event, None)
    out: list[tuple[bytes, bytes]] = []
    for name, value in (result.get("headers") or {}).items():
        out.append((name.lower().encode("latin-1"), str(value).encode("latin-1")))
    for name, values in (result.get("multiValueHeaders") or {}).items():
        for value in values:
            out.append((name.lower().encode("latin-1"), str(value).encode("latin-1")))
    payload = result.get("body") or ""
    return int(result["statusCode"]), out, payload.encode() if isinstance(payload, str) else payload


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
        http="h11",  # Vault clients send the LIST method, which httptools (llhttp) refuses to parse
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

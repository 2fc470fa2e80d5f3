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

At the edge, before the router: HTTPS with `ServerTLS` (Vault's tls_* listener
options); a body past max_request_size is a 413, read inside the admission window and
within the read timeout (408 past it); malformed HTTP is a 400 in Vault's error shape.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import socket
import ssl
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess, multiprocess

from keycell.collector import pace_collections
from keycell.control_plane.admission import AdmissionConfig, AdmissionGate, classify
from keycell.control_plane.audit import AsyncCommitter
from keycell.control_plane.barrier import SealedError
from keycell.control_plane.errors import PermissionDenied, RequestError
from keycell.control_plane.keys import KeyBackendError
from keycell.control_plane.ledger import Kind, LedgerUnavailableError, iter_prefix
from keycell.control_plane.router import Request
from keycell.functions.api import http
from keycell.functions.api.app import MAX_DEPTH, router
from keycell.testing.processes import announce_ready

log = logging.getLogger("keycell.server")
_NOT_FOUND = b'{"errors":["unsupported path"]}'
_MALFORMED = b'{"errors":["malformed HTTP request"]}'
_SHED = (
    b'{"errors":["the cell is overloaded and is shedding new requests first; retry after the '
    b"Retry-After header's seconds (revocations and renewals are served first)\"]}"
)
EVENTS_PATH = "/v1/sys/events/revocations"
_gate: AdmissionGate | None = None
_collector: asyncio.Task[None] | None = None


def gate() -> AdmissionGate:
    """This worker's in-flight window (admission control), configured from the environment."""
    global _gate
    if _gate is None:
        config = AdmissionConfig.from_env()
        _gate = AdmissionGate(config.max_inflight, config.max_queue)
    return _gate


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
    global _collector
    if _collector is None:  # (this worker's first request, on its loop)
        _collector = asyncio.get_running_loop().create_task(pace_collections())
    if scope["path"] == EVENTS_PATH and scope["method"].upper() == "GET":
        await revocation_stream(scope, receive, send)
        return
    limit = http.admission_config().max_request_size
    declared, chunked = _framing(scope)
    if declared > limit:  # refused before a byte of the body is read
        await _send(send, _reply(http.too_large(limit)))
        return
    admission = gate()
    if not await admission.enter(classify(scope["method"], scope["path"][4:])):
        await _send(send, (429, [(b"content-type", b"application/json"), (b"retry-after", b"1")], _SHED))
        return
    try:
        # The body is read inside the in-flight window, so slow or large uploads count
        # against it (and are shed past it) like any other request.
        body = await _read_body(receive, limit) if declared or chunked else b""
        if body is None:
            return  # the client went away
        if isinstance(body, tuple):
            reply = body
        elif scope["method"].upper() not in _ON_LOOP and writer_threads():
            # A write waits on the ledger's commit (an fsync): on a thread, so that the
            # writes in flight share one commit (group commit, adapters/ledgers/sqlite.py)
            # and reads go on meanwhile.
            reply = await handle_http_threaded(scope, body)
        elif router().auditor is None:
            reply = handle_http(scope, body)
        else:
            # With an audit trail each request waits for its entries' batch (the requests
            # in flight share one write to the sinks, audit.AsyncCommitter) without
            # holding the loop for anything that waits on a device.
            reply = await handle_http_async(scope, body)
    finally:
        admission.leave()
    await _send(send, reply)


async def _send(send: Any, reply: _Reply) -> None:
    """The reply with its Content-Length (uvicorn would otherwise frame every body in
    chunks), but on a status that has no body."""
    status, headers, payload = reply
    if status not in _NO_BODY:
        headers = [*headers, (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


_NO_BODY = frozenset({204, 304})


def _framing(scope: dict[str, Any]) -> tuple[int, bool]:
    """The request body's declared length, and whether it comes in chunks (HTTP/1.1
    framing: with neither, there is no body)."""
    length, chunked = 0, False
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            length = int(value) if value.isdigit() else 0  # the parser refused a malformed one
        elif name == b"transfer-encoding":
            chunked = True  # (the parser refuses any coding it cannot frame)
    return length, chunked


async def _read_body(receive: Any, limit: int) -> bytes | _Reply | None:
    """The request body, the 413 once it passes `limit`, the 408 once the admission
    read timeout passes, or None when the client disconnected first. (Only for a
    request framed with a body: one framed with none has nothing to wait for.)"""
    try:
        return await asyncio.wait_for(_body_chunks(receive, limit), http.admission_config().read_timeout)
    except TimeoutError:
        return _reply(http.error(408, "the request body did not arrive in time", {"Connection": "close"}))


async def _body_chunks(receive: Any, limit: int) -> bytes | _Reply | None:
    """The body's chunks, joined once (linear in its size); the 413 past `limit`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _reply(http.too_large(limit))
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# --- revocation events (server-sent events) ---------------------------------------------------


class RevocationFeed:
    """This worker's view of new revocations, handed to every subscriber's queue.

    With `KEYCELL_RELAY=HOST:PORT` (the cell's local relay) the relay pushes each
    revocation once the cell's ledger holds it (`Relay.Subscribe`, a gRPC server
    stream; keycell/relay/subscriber.py) and nothing polls. Without a relay, or while
    its stream is down, one poller scans the cell's revocation set every `interval`
    seconds for subjects not seen before. A subscriber that falls `queue_size` events
    behind is disconnected; its client reconnects and re-checks what it holds."""

    def __init__(self, interval: float = 0.1, queue_size: int = 10_000) -> None:
        self.interval = interval
        self.queue_size = queue_size
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._known: set[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self.relay: Any = None  # the RelaySubscription, when KEYCELL_RELAY names a relay

    def _follow_relay(self) -> None:
        addr = os.environ.get("KEYCELL_RELAY")
        if not addr or self.relay is not None:
            return
        from keycell.relay.subscriber import RelaySubscription

        loop = asyncio.get_running_loop()

        def pushed(event: Any) -> None:
            record = {
                "subject": event.subject,
                "origin_cell": event.origin_cell,
                "revoked_at": event.revoked_at,
                "id": event.id,
            }
            loop.call_soon_threadsafe(self._publish, [record])

        from keycell.relay.tls import from_env as relay_tls_from_env

        self.relay = RelaySubscription(addr, pushed, tls=relay_tls_from_env()).start()

    def _publish(self, events: list[dict[str, Any]]) -> None:
        if self._known is not None:
            events = [e for e in events if e["subject"] not in self._known]
            self._known.update(e["subject"] for e in events)
        for queue in list(self.subscribers):
            for event in events:
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    self.subscribers.discard(queue)
                    queue.get_nowait()  # make room for the end-of-stream marker
                    queue.put_nowait(None)
                    break

    def _scan(self) -> list[dict[str, Any]]:
        services = router().services
        fresh: list[dict[str, Any]] = []
        seen: set[str] = set()
        for item in iter_prefix(services.barrier, Kind.REVOCATION, page_size=1000):
            subject = item.key.path
            seen.add(subject)
            if self._known is not None and subject not in self._known:
                try:
                    record = json.loads(item.value)
                except ValueError:
                    record = {}
                fresh.append(
                    {
                        "subject": subject,
                        "origin_cell": record.get("origin_cell", ""),
                        "revoked_at": record.get("revoked_at"),
                        "id": record.get("id", ""),
                    }
                )
        self._known = seen - {event["subject"] for event in fresh}  # _publish adds what it hands out
        return fresh

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        self._follow_relay()
        if self._known is None:
            self._scan()  # the baseline: only revocations after this are news
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self.queue_size)
        self.subscribers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.subscribers.discard(queue)

    async def _poll(self) -> None:
        while self.subscribers:
            await asyncio.sleep(self.interval)
            if self.relay is not None and self.relay.connected:
                continue  # the relay pushes; the scan is only the fallback
            try:
                fresh = self._scan()
            except Exception as exc:  # sealed or the ledger is down: try again next tick
                log.debug("revocation scan failed: %s", type(exc).__name__)
                continue
            self._publish(fresh)
        self._known = None


_feed = RevocationFeed()


def _json_error(status: int, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = json.dumps({"errors": [message]}).encode()
    return status, [(b"content-type", b"application/json"), (b"cache-control", b"no-store")], body


def _authorize_events(
    scope: dict[str, Any],
) -> tuple[int, list[tuple[bytes, bytes]], bytes] | tuple[str, bool, set[str]]:
    """(own accessor, may see every revocation, lease ids asked for), or an error reply."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", [])}
    token = http.token_from(headers)
    if not token:
        return _json_error(403, "permission denied: no token; send X-Vault-Token")
    services = router().services
    try:
        try:
            services.ensure_unsealed()
        except KeyBackendError as exc:  # HSM seal: the key backend would not open the barrier
            log.warning("auto-unseal failed for the event stream: %s", type(exc).__name__)
        if services.barrier.sealed:
            return _json_error(503, "Vault is sealed")
        entry = services.tokens.use(token)
        acl = services.policies.acl_for(entry.policies)
    except PermissionDenied:
        return _json_error(403, "permission denied")
    except Exception as exc:  # mapped as the router maps errors: never a plain-text 500
        return _stream_error(exc)
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    leases = {f"lease:{lease}" for lease in query.get("leases", "").split(",") if lease}
    return entry.accessor, bool(acl.allows("sys/events/revocations", "read")), leases


def _stream_error(exc: Exception) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The event stream's reply to a failure before it opens, mapped as the router maps
    errors (control_plane/router.py): never a plain-text 500."""
    if isinstance(exc, RequestError):
        return _json_error(exc.status, exc.message)
    if isinstance(exc, SealedError):
        return _json_error(503, "Vault is sealed")
    if isinstance(exc, LedgerUnavailableError):
        return _json_error(503, "the cell's ledger is unavailable; retry later")
    if isinstance(exc, KeyBackendError):
        return _json_error(503, "the cell's key backend is unavailable; retry later")
    log.error("internal error opening the event stream (%s)", type(exc).__name__)
    return _json_error(500, "internal error")


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return (head + "data: " + json.dumps(data, separators=(",", ":")) + "\n\n").encode()


async def revocation_stream(scope: dict[str, Any], receive: Any, send: Any, heartbeat: float = 15.0) -> None:
    """GET /v1/sys/events/revocations: a server-sent event per new revocation.

    Any valid token may subscribe. A token whose policy grants `read` on
    sys/events/revocations sees every revocation; any other sees its own token's
    (`token:<accessor>`) and those of the leases it names in `?leases=id1,id2`.
    The stream opens with `event: ready`; after the subscriber's own token is
    revoked it sends that event and closes."""
    decided = _authorize_events(scope)
    if isinstance(decided[0], int):
        await _send(send, decided)
        return
    accessor, everything, leases = decided
    own = f"token:{accessor}"
    try:
        queue = _feed.subscribe()
    except Exception as exc:  # its first scan reads the ledger, which may have sealed since
        await _send(send, _stream_error(exc))
        return
    headers = [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send(
        {"type": "http.response.body", "body": _sse("ready", {"accessor": accessor}), "more_body": True}
    )
    disconnected = asyncio.ensure_future(_wait_disconnect(receive))
    sent = 0
    try:
        while not disconnected.done():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait(
                {getter, disconnected}, timeout=heartbeat, return_when="FIRST_COMPLETED"
            )
            if getter not in done:
                getter.cancel()
                if not done:
                    await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
                continue
            event = getter.result()
            if event is None:
                break  # fell behind: the client reconnects
            subject = event["subject"]
            if everything or subject == own or subject in leases:
                sent += 1
                await send(
                    {"type": "http.response.body", "body": _sse("revocation", event, sent), "more_body": True}
                )
            if subject == own:
                break
        await send({"type": "http.response.body", "body": b""})
    except OSError:
        pass
    finally:
        _feed.unsubscribe(queue)
        disconnected.cancel()


async def _wait_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


_Reply = tuple[int, list[tuple[bytes, bytes]], bytes]


def _to_request(scope: dict[str, Any], body: bytes) -> Request | _Reply:
    """The router's request from the ASGI scope, through the same translation the
    Chalice handler uses, or the early reply (404, 400, 429)."""
    method = scope["method"].upper()
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
    if method == "LIST":
        method = "GET"
        query["list"] = "true"
    raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1").split("?")[0]
    if not raw_path.startswith("/v1/"):
        return 404, [(b"content-type", b"application/json")], _NOT_FOUND
    # Empty segments and a trailing "/" go through: the router refuses the one (400)
    # and hands the other to the ACL, as Vault's does.
    segments = [unquote(s) for s in raw_path[4:].split("/")]
    if not any(segments) or len(segments) - (segments[-1] == "") > MAX_DEPTH:
        return 404, [(b"content-type", b"application/json")], _NOT_FOUND
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", [])}
    client = scope.get("client") or ("", 0)
    prepared = http.to_request(method, "/".join(segments), headers, query, body, client[0])
    if isinstance(prepared, Request):
        return prepared
    return _reply(prepared)


def _reply(reply: tuple[int, dict[str, str], bytes]) -> _Reply:
    status, out, payload = reply
    return status, [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out.items()], payload


def handle_http(scope: dict[str, Any], body: bytes) -> _Reply:
    """One request to the router (audit entries committed on this thread)."""
    prepared = _to_request(scope, body)
    if not isinstance(prepared, Request):
        return prepared
    return _reply(http.encode(router().handle(prepared)))


_committer: AsyncCommitter | None = None
# Reads run on the event loop (nothing in them waits on a device); every other method
# may write, and runs on a writer thread.
_ON_LOOP = frozenset({"GET", "HEAD", "OPTIONS"})
# Writers in flight per worker, each parked on the ledger's next commit most of its time,
# so that concurrent writes share one commit (group commit). 0: writes run on the loop,
# one at a time per worker. KEYCELL_WRITER_THREADS sets it; by default it follows the
# ledger: writes go to threads when its commit waits on a device (an fsynced SQLite file,
# DynamoDB over the network), as the loop would stand still meanwhile, and stay on the
# loop when it does not (`--dev`: unsynced), as the GIL handoffs would cost more than
# the shared commit saves. Measured here (wrk 2 threads x 32 connections with bench.api's
# write script, 2 workers, `--data-dir`, 5-8 s runs, load 2.5-5): 0 threads 439, 715 and
# 488 writes/s (p99 142-251 ms, each worker at 0.25-0.36 core, waiting on fsync); 8-16
# threads 1037, 1234 and 1638 (p99 50-165 ms). In dev mode, 0 against 8: 1297 against 1182.
DEVICE_WRITER_THREADS = 16
_writer_threads: int | None = None


def writer_threads() -> int:
    """This worker's writer threads (0: writes on the loop); see DEVICE_WRITER_THREADS."""
    global _writer_threads
    if _writer_threads is None:
        explicit = os.environ.get("KEYCELL_WRITER_THREADS")
        if explicit is not None:
            _writer_threads = int(explicit)
        else:
            waits = getattr(router().services.ledger, "commits_wait_on_device", True)
            _writer_threads = DEVICE_WRITER_THREADS if waits else 0
    return _writer_threads


_writers: ThreadPoolExecutor | None = None


def _audit_committer() -> AsyncCommitter:
    global _committer
    current = router()
    if _committer is None or _committer.auditor is not current.auditor:
        _committer = AsyncCommitter(current.auditor)
    return _committer


async def handle_http_threaded(scope: dict[str, Any], body: bytes) -> _Reply:
    """One request on a writer thread; its audit entries (if any) are committed by the
    loop's AsyncCommitter, in a batch with the other requests' entries."""
    global _writers
    loop = asyncio.get_running_loop()
    current = router()  # built on the loop, not raced by the writer threads
    commit = None
    if current.auditor is not None:
        committer = _audit_committer()

        def commit(record: dict[str, Any]) -> bool:
            return asyncio.run_coroutine_threadsafe(committer.commit(record), loop).result()

    if _writers is None:
        _writers = ThreadPoolExecutor(
            max_workers=max(1, writer_threads()), thread_name_prefix="keycell-writer"
        )
    return await loop.run_in_executor(_writers, _handle_on_thread, scope, body, commit)


def _handle_on_thread(scope: dict[str, Any], body: bytes, commit: Any) -> _Reply:
    prepared = _to_request(scope, body)
    if not isinstance(prepared, Request):
        return prepared
    current = router()
    if commit is None:
        return _reply(http.encode(current.handle(prepared)))
    steps = current.steps(prepared)  # Router.handle's loop, with the loop's commit
    try:
        record = next(steps)
        while True:
            record = steps.send(commit(record))
    except StopIteration as done:
        return _reply(http.encode(done.value))


async def handle_http_async(scope: dict[str, Any], body: bytes) -> _Reply:
    """One request on the event loop, its audit entries group-committed with those of
    the other requests in flight (on the loop for local sinks, else on a thread)."""
    prepared = _to_request(scope, body)
    if not isinstance(prepared, Request):
        return prepared
    current = router()
    return _reply(http.encode(await current.handle_async(prepared, _audit_committer().commit)))


class _CoalescingTransport:
    """A transport whose writes within one turn of the event loop leave in one send.

    uvicorn writes a response's head and its body separately, two system calls (and two
    TLS records, two packets) per answer; here they are joined and sent at the end of the
    turn. Closing sends what is pending first; everything else is the real transport's."""

    __slots__ = ("_pending", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]

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

    def send_400_response(self, msg: str) -> None:
        """The parser's refusal of malformed HTTP in Vault's error shape (uvicorn's own
        is plain text); the connection closes, as the parser cannot go on."""
        body = _MALFORMED
        head = [
            b"HTTP/1.1 400 Bad Request\r\n",
            b"content-type: application/json\r\n",
            b"cache-control: no-store\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def listen(host: str, port: int, *, workers: int = 1) -> socket.socket:
    """The listening socket, accepting at once: clients may connect before the workers are
    up. With several workers it also founds a SO_REUSEPORT group that spreads connections
    over the workers (see `_BalancedWorker`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    balanced = workers > 1 and _REUSEPORT_BPF
    if balanced:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)  # accepting from now: clients may connect before the workers are up
    if balanced and not _spread_over_workers(sock, workers):
        # No filter: a new connection would sit in this shared queue as often as in a
        # worker's own, which is no better than sharing it alone.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
    sock.set_inheritable(True)
    return sock


# Workers sharing one listening socket do not share its connections evenly: an idle
# worker's loop accepts every connection queued at that moment (uvloop accepts until the
# queue is empty), so a burst of keep-alive connections (wrk's 32, a client pool) may all
# land on one worker while the other idles: measured here, 32 and 0, or 27 and 5, under
# `python -m bench.api`. So with several workers each one also listens on a socket of its
# own in the same SO_REUSEPORT group, and a classic BPF program attached to the group
# sends every new connection to one of the workers' sockets at random (indexes 1..n; the
# shared socket, index 0, is the group's first). Before the workers listen, and when a
# worker is gone, the index falls outside the group and the kernel picks by hash, the
# shared socket included, which every worker still accepts from: no connection waits on a
# socket nobody serves. Linux only; elsewhere the shared socket alone, as before.
_REUSEPORT_BPF = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
_SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


def _spread_over_workers(sock: socket.socket, workers: int) -> bool:
    """Attach `A = random() % workers + 1; return A` to the group `sock` founded."""
    program = (_SockFilter * 4)(
        _SockFilter(0x20, 0, 0, 0xFFFFF000 + 56),  # BPF_LD|BPF_W|BPF_ABS, SKF_AD_OFF + SKF_AD_RANDOM
        _SockFilter(0x94, 0, 0, workers),  # BPF_ALU|BPF_MOD|BPF_K
        _SockFilter(0x04, 0, 0, 1),  # BPF_ALU|BPF_ADD|BPF_K
        _SockFilter(0x16, 0, 0, 0),  # BPF_RET|BPF_A
    )
    fprog = struct.pack("@HP", len(program), ctypes.addressof(program))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        log.info("connections are not spread over the workers by the kernel: %s", exc.strerror)
        return False
    return True


def _own_listener(shared: socket.socket) -> socket.socket | None:
    """A worker's own socket in the shared socket's SO_REUSEPORT group, or None."""
    if not shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        return None
    own = socket.socket(shared.family, socket.SOCK_STREAM)
    try:
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(shared.getsockname()[:2])
        own.listen(2048)
    except OSError as exc:
        own.close()
        log.warning("worker %d serves the shared socket only: %s", os.getpid(), exc.strerror)
        return None
    return own


class _BalancedWorker(multiprocess.Process):
    """uvicorn's worker process, serving its own socket of the group besides the shared one."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover - in the child
        own = _own_listener(sockets[0]) if sockets else None
        super().target([own, *(sockets or [])] if own is not None else sockets)


class TLSFilesError(ValueError):
    """A listener certificate, key or client CA that cannot be used (the message names it)."""


@dataclass(frozen=True)
class ServerTLS:
    """The API listener's TLS (Vault's `tls_cert_file`, `tls_key_file`,
    `tls_client_ca_file`): TLS 1.2 or later; with a client CA, every client presents a
    certificate that CA signed."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    @classmethod
    def load(cls, cert_file: str, key_file: str, client_ca_file: str | None = None) -> ServerTLS:
        """The settings, once the files load into a server context (so a bad file is
        named here, not by every worker)."""
        tls = cls(cert_file, key_file, client_ca_file)
        tls.context()
        return tls

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSFilesError(
                f"cannot load --tls-cert-file {self.cert_file} with --tls-key-file {self.key_file}:"
                f" {getattr(exc, 'strerror', None) or exc.__class__.__name__}"
            ) from None
        if self.client_ca_file:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise TLSFilesError(
                    f"cannot load --tls-client-ca-file {self.client_ca_file}:"
                    f" {getattr(exc, 'strerror', None) or exc.__class__.__name__}"
                ) from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def context_factory(self, config: Any, default: Any) -> ssl.SSLContext:
        """uvicorn's `ssl_context_factory`: each worker builds this context itself."""
        return self.context()


def serve(host: str, port: int, *, workers: int, tls: ServerTLS | None = None) -> None:
    """Serve until interrupted (HTTPS with `tls`); prints `READY <port>` once listening."""
    sock = listen(host, port, workers=workers)
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
        # The client's address is the socket's. uvicorn would otherwise take it from
        # X-Forwarded-For on any connection from 127.0.0.1, so a local process could
        # claim an address inside an AppRole's secret_id_bound_cidrs, another client's
        # rate-limit bucket, or a false remote_address in the audit trail.
        proxy_headers=False,
        ws="none",  # no WebSocket upgrades: Vault's API has none
        ssl_context_factory=tls.context_factory if tls is not None else None,
    )
    announce_ready(sock.getsockname()[1])
    sys.stdout.flush()
    if workers > 1:
        # uvicorn's supervisor builds its workers from this module global; this process
        # is the supervisor and nothing else, so the replacement is seen by it alone.
        multiprocess.Process = _BalancedWorker  # type: ignore[misc]
        Multiprocess(config, sockets=[sock]).run()
    else:
        config.load_app()
        uvicorn.Server(config).run(sockets=[sock])

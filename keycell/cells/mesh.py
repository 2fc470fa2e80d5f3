"""Several dev cells in one process, for tests and bench/replication.py: each cell has
its relays (with their cell agents) on one background event loop, every relay on its
own loopback gRPC port, and an API router built on its own CellServices over the
cell's SQLite ledger, as a separate API process would have (the router is called in
process; everything between cells and between a cell's API and its relay crosses a
real gRPC socket). The relays' fault injection partitions cells.

With `direct=True` each cell's router also listens on a loopback HTTP port (its URL is
the cell's `api` in the directory) and a DirectPath (keycell/cells/paths.py) delivers
its revocations and heartbeats to the other cells over real HTTP; `cut_direct` drops
those calls between two cells (the connection is closed unanswered), `partition` cuts
both the relays and the direct path, `cut_relays` only the relays.

With `ledger_path=True` each cell also runs a LedgerPath: its revocations and
heartbeats go into the other cells' ledgers (`ledgers`: cell -> its own ledger URL,
e.g. one DynamoDB table per cell on a moto server; default the dev SQLite file), and
it drains its own inbox. `cut_ledger` makes a cell's writes into another cell's ledger
fail as an unreachable table would (LedgerUnavailableError); `partition` cuts this
path too.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from keycell.cells.agent import CellAgent, CellTiming, attach
from keycell.cells.api import CellsFrontend, install
from keycell.cells.paths import FROM_CELL_HEADER, DirectPath, LedgerPath, Paths
from keycell.control_plane.ledger import Item, Key, Kind, Ledger, LedgerUnavailableError, Op, Page
from keycell.control_plane.router import Request, Response, Router
from keycell.control_plane.routes import build_router
from keycell.relay.cell import LedgerSink
from keycell.relay.cluster import dev_cell_env
from keycell.relay.faults import Faults
from keycell.relay.handoff import RelayHandoff
from keycell.relay.node import Relay
from keycell.relay.profiles import LOCAL, Profile

T = TypeVar("T")
ROOT = "kc.cells-root"


def cell_env(folder: Path, cell: str, ledger_url: str | None = None) -> dict[str, str]:
    """A dev cell's configuration; `ledger_url` in place of its SQLite file."""
    env = dev_cell_env(str(folder), cell)
    if ledger_url is not None:
        env["KEYCELL_LEDGER"] = ledger_url
    return env


def open_cell(folder: Path, cell: str, ledger_url: str | None = None) -> Any:
    """A dev cell's services (SQLite ledger unless `ledger_url`, software keys,
    auto-unsealed), initialized with the root token ROOT on first use."""
    from keycell.functions.wiring import services_from_environment

    services = services_from_environment(cell_env(folder, cell, ledger_url))
    if not services.seal.status().initialized:
        services.seal.init(1, 1, root_token=ROOT)
        services.after_unseal()
    services.ensure_unsealed()
    return services


class Mesh:
    def __init__(
        self,
        folder: Path,
        cells: tuple[str, ...] = ("a", "b", "c"),
        *,
        relays_per_cell: int = 1,
        profile: Profile = LOCAL,
        timing: CellTiming | None = None,
        seed: int = 1,
        direct: bool = False,
        heartbeat_every: float = 0.2,
        ledger_path: bool = False,
        ledgers: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.cells = cells
        self.relays_per_cell = relays_per_cell
        self.profile = profile
        self.timing = timing
        self.faults = Faults(rng=random.Random(seed))  # noqa: S311 - test faults
        self.rng = random.Random(seed)  # noqa: S311
        self.sinks: dict[str, LedgerSink] = {}
        self.relays: dict[str, list[Relay]] = {}
        self.agents: dict[str, list[CellAgent]] = {}
        self.routers: dict[str, Router] = {}
        self.fronts: dict[str, CellsFrontend] = {}
        self.api_services: dict[str, Any] = {}
        self.direct = direct
        self.heartbeat_every = heartbeat_every
        self.direct_paths: dict[str, DirectPath] = {}
        self.http: dict[str, ThreadingHTTPServer] = {}
        self.api_urls: dict[str, str] = {}
        self.direct_cuts: set[frozenset[str]] = set()
        self.ledger_path = ledger_path
        self.ledgers = dict(ledgers or {})
        self.ledger_paths: dict[str, LedgerPath] = {}
        self.ledger_cuts: set[frozenset[str]] = set()
        self._peer_ledgers: list[Ledger] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cells-mesh", daemon=True)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Mesh:
        self._thread.start()
        if self.direct:
            for cell in self.cells:
                self._listen(cell)
        for cell in self.cells:
            folder = self.folder / cell
            folder.mkdir(parents=True, exist_ok=True)
            self.sinks[cell] = LedgerSink(open_cell(folder, cell, self.ledgers.get(cell)))
        self.run(self._start_relays())
        for cell in self.cells:
            services = open_cell(self.folder / cell, cell, self.ledgers.get(cell))
            router = build_router(services)
            self.fronts[cell] = install(router, services, self.relays[cell][0].addr)
            # sys/revocations hands each revocation to the cell's relay, as KEYCELL_RELAY does
            services.relay_handoff = RelayHandoff(self.relays[cell][0].addr)
            self.routers[cell] = router
            self.api_services[cell] = services
            paths: list[DirectPath | LedgerPath] = []
            if self.direct:
                self.direct_paths[cell] = DirectPath(services, ROOT, heartbeat_every=self.heartbeat_every)
                paths.append(self.direct_paths[cell].start())
            if self.ledger_path:
                self.ledger_paths[cell] = LedgerPath(
                    services, self._open_peer_ledgers(cell), every=self.heartbeat_every
                )
                paths.append(self.ledger_paths[cell].start())
            if paths:
                services.revocation_paths = Paths(*paths)
        return self

    def _ledger_cut(self, cell: str, peer: str) -> Callable[[], bool]:
        return lambda: frozenset((cell, peer)) in self.ledger_cuts

    def _open_peer_ledgers(self, cell: str) -> dict[str, Ledger]:
        from keycell.adapters.ledgers import open_ledger

        opened: dict[str, Ledger] = {}
        for peer in self.cells:
            if peer != cell:
                url = cell_env(self.folder / peer, peer, self.ledgers.get(peer))["KEYCELL_LEDGER"]
                ledger = open_ledger(url)  # another handle on the peer's own table or file
                self._peer_ledgers.append(ledger)
                opened[peer] = _Cuttable(ledger, self._ledger_cut(cell, peer))
        return opened

    def _listen(self, cell: str) -> None:
        mesh = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                caller = self.headers.get(FROM_CELL_HEADER)
                if caller and frozenset((caller, cell)) in mesh.direct_cuts:
                    self.close_connection = True  # cut: the caller sees a dropped connection
                    return
                router = mesh.routers.get(cell)
                if router is None:
                    self.send_error(503)
                    return
                path, _, _query = self.path.partition("?")
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Request(
                    self.command,
                    path.removeprefix("/v1/"),
                    json.loads(raw) if raw else {},
                    {},
                    headers,
                    headers.get("x-vault-token"),
                    self.client_address[0],
                )
                reply = router.handle(request)
                body = b"" if reply.body is None else json.dumps(reply.body).encode()
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name=f"http-{cell}", daemon=True).start()
        self.http[cell] = server
        self.api_urls[cell] = f"http://127.0.0.1:{server.server_address[1]}"

    async def _start_relays(self) -> None:
        seeds: list[str] = []
        for cell in self.cells:
            self.relays[cell], self.agents[cell] = [], []
            for i in range(self.relays_per_cell):
                relay = Relay(
                    f"{cell}-{i}",
                    cell,
                    profile=self.profile,
                    sink=self.sinks[cell],
                    faults=self.faults,
                    seeds=seeds[:2],
                    rng=random.Random(self.rng.random()),  # noqa: S311
                )
                api_url = self.api_urls.get(cell, "")
                self.agents[cell].append(
                    attach(relay, self.sinks[cell].services, api_url=api_url, timing=self.timing)
                )
                await relay.start()
                self.faults.groups[relay.addr] = cell
                self.relays[cell].append(relay)
                if len(seeds) < 2:
                    seeds.append(relay.addr)

    def stop(self) -> None:
        async def stop_all() -> None:
            relays = [r for rs in self.relays.values() for r in rs]
            await asyncio.gather(*(r.stop() for r in relays), return_exceptions=True)
            for agents in self.agents.values():
                for agent in agents:
                    await agent.close()

        for direct in self.direct_paths.values():
            direct.close()
        for path in self.ledger_paths.values():
            path.close()
        for ledger in self._peer_ledgers:
            ledger.close()
        for server in self.http.values():
            server.shutdown()
            server.server_close()
        try:
            self.run(stop_all())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            for agents in self.agents.values():
                agents[0].state.close()
            for sink in self.sinks.values():
                sink.close()
            for services in self.api_services.values():
                services.relay_handoff.close()
                services.ledger.close()

    # --- faults ------------------------------------------------------------------------

    def partition(self, cell: str) -> None:
        """Cut `cell` off from every other cell: relays, the direct and the ledger path."""
        self.cut_relays(cell)
        self.cut_direct(cell)
        self.cut_ledger(cell)

    def cut_relays(self, cell: str) -> None:
        for other in self.cells:
            if other != cell:
                self.faults.partition(cell, other)

    def cut_direct(self, cell: str) -> None:
        for other in self.cells:
            if other != cell:
                self.direct_cuts.add(frozenset((cell, other)))

    def cut_ledger(self, cell: str) -> None:
        """`cell` can no longer write into the other cells' ledgers, nor they into its."""
        for other in self.cells:
            if other != cell:
                self.ledger_cuts.add(frozenset((cell, other)))

    def heal(self) -> None:
        self.faults.heal()
        self.direct_cuts.clear()
        self.ledger_cuts.clear()

    # --- the API -------------------------------------------------------------------------

    def request(
        self,
        cell: str,
        method: str,
        path: str,
        data: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        token: str = ROOT,
    ) -> Response:
        request = Request(
            method, path, data or {}, {}, {k.lower(): v for k, v in (headers or {}).items()}, token
        )
        return self.routers[cell].handle(request)

    def write(self, cell: str, secret: str, value: dict[str, Any], cas: int | None = None) -> Response:
        body: dict[str, Any] = {"data": value}
        if cas is not None:
            body["options"] = {"cas": cas}
        return self.request(cell, "POST", f"secret/data/{secret}", body)

    def read(self, cell: str, secret: str, max_staleness: str | None = None) -> Response:
        headers = {"X-Keycell-Max-Staleness": max_staleness} if max_staleness is not None else None
        return self.request(cell, "GET", f"secret/data/{secret}", headers=headers)

    def wait_for(self, condition: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(step)
        return condition()

    def directory_complete(self) -> bool:
        """Every cell's ledger holds every cell's directory entry with its sealing key."""
        from keycell.control_plane import directory

        for cell in self.cells:
            entries = directory.load(self.api_services[cell].barrier)
            if any(c not in entries or not entries[c].record.public_key for c in self.cells):
                return False
        return True

    def value_in(self, cell: str, secret: str) -> dict[str, Any] | None:
        reply = self.read(cell, secret)
        if reply.status != 200 or reply.body is None:
            return None
        return reply.body["data"]["data"]  # type: ignore[no-any-return]


class _Cuttable:
    """A peer's ledger as one cell reaches it, failing like an unreachable table
    (LedgerUnavailableError, nothing written) while `cut()` says so."""

    def __init__(self, ledger: Ledger, cut: Callable[[], bool]) -> None:
        self.ledger, self.cut = ledger, cut

    def _check(self) -> None:
        if self.cut():
            raise LedgerUnavailableError("test fault: this peer's ledger is cut off")

    def get(self, key: Key, *, consistent: bool = True) -> Item | None:
        self._check()
        return self.ledger.get(key, consistent=consistent)

    def put_if(self, key: Key, value: bytes, expected_version: int, *, expires_at: int | None = None) -> Item:
        self._check()
        return self.ledger.put_if(key, value, expected_version, expires_at=expires_at)

    def delete_if(self, key: Key, expected_version: int) -> None:
        self._check()
        self.ledger.delete_if(key, expected_version)

    def transact(self, ops: Sequence[Op]) -> list[Item | None]:
        self._check()
        return self.ledger.transact(ops)

    def scan(
        self,
        kind: Kind,
        prefix: str = "",
        *,
        limit: int = 100,
        cursor: str | None = None,
        consistent: bool = True,
    ) -> Page:
        self._check()
        return self.ledger.scan(kind, prefix, limit=limit, cursor=cursor, consistent=consistent)

    def close(self) -> None:
        pass  # the mesh closes the ledger itself

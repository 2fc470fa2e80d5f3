"""Several dev cells in one process, for tests and bench/replication.py: each cell has
its relays (with their cell agents) on one background event loop, every relay on its
own loopback gRPC port, and an API router built on its own CellServices over the
cell's SQLite ledger, as a separate API process would have (the router is called in
process; everything between cells and between a cell's API and its relay crosses a
real gRPC socket). The relays' fault injection partitions cells.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from keycell.cells.agent import CellAgent, CellTiming, attach
from keycell.cells.api import CellsFrontend, install
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


def open_cell(folder: Path, cell: str) -> Any:
    """A dev cell's services (SQLite ledger, software keys, auto-unsealed), initialized
    with the root token ROOT on first use."""
    from keycell.functions.wiring import services_from_environment

    services = services_from_environment(dev_cell_env(str(folder), cell))
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
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cells-mesh", daemon=True)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Mesh:
        self._thread.start()
        for cell in self.cells:
            folder = self.folder / cell
            folder.mkdir(parents=True, exist_ok=True)
            self.sinks[cell] = LedgerSink(open_cell(folder, cell))
        self.run(self._start_relays())
        for cell in self.cells:
            services = open_cell(self.folder / cell, cell)
            router = build_router(services)
            self.fronts[cell] = install(router, services, self.relays[cell][0].addr)
            # sys/revocations hands each revocation to the cell's relay, as KEYCELL_RELAY does
            services.relay_handoff = RelayHandoff(self.relays[cell][0].addr)
            self.routers[cell] = router
            self.api_services[cell] = services
        return self

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
                self.agents[cell].append(attach(relay, self.sinks[cell].services, timing=self.timing))
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
        for other in self.cells:
            if other != cell:
                self.faults.partition(cell, other)

    def heal(self) -> None:
        self.faults.heal()

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

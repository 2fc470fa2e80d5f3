"""Several relays on one event loop, each with its own gRPC server on a loopback
port: what tests, the benchmark's relay processes and `keycell relay --count N` run.

Sharing a loop is honest about one thing only: the relays share a CPU. Every
message between them still crosses a real gRPC stream over a real socket.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable

from keycell.control_plane.services import CellServices
from keycell.relay.cell import CellSink
from keycell.relay.faults import Faults
from keycell.relay.node import Relay
from keycell.relay.profiles import LOCAL, Profile


class Cluster:
    def __init__(
        self,
        *,
        profile: Profile = LOCAL,
        faults: Faults | None = None,
        sinks: dict[str, CellSink] | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock`: the relays' clock for entry expiry (a test's ManualClock moves it)."""
        self.profile = profile
        self.clock = clock
        self.faults = faults if faults is not None else Faults()
        self.sinks = sinks or {}
        self.relays: dict[str, Relay] = {}
        self.rng = random.Random(seed)  # noqa: S311 - test topology, not a secret

    async def add(self, name: str, cell: str, *, seeds: Iterable[str] = (), port: int = 0) -> Relay:
        relay = Relay(
            name,
            cell,
            port=port,
            profile=self.profile,
            sink=self.sinks.get(cell),
            faults=self.faults,
            seeds=list(seeds),
            rng=random.Random(self.rng.random()),  # noqa: S311
            clock=self.clock,
        )
        await relay.start()
        self.faults.groups[relay.addr] = cell
        self.relays[name] = relay
        return relay

    async def start(self, cells: dict[str, int], extra_seeds: Iterable[str] = ()) -> None:
        """`cells`: cell name -> relay count. Each relay joins through the first relay."""
        seeds = list(extra_seeds)
        for cell, count in cells.items():
            for i in range(count):
                relay = await self.add(f"{cell}-{i}", cell, seeds=seeds[:2])
                if len(seeds) < 2:
                    seeds.append(relay.addr)

    def live(self) -> list[Relay]:
        return [r for r in self.relays.values() if r.running]

    async def kill(self, name: str) -> None:
        await self.relays[name].stop()

    async def restart(self, name: str) -> Relay:
        """A fresh relay (empty memory) on the killed one's address and name."""
        old = self.relays[name]
        seeds = [r.addr for r in self.live()][:2]
        relay = Relay(
            name,
            old.cell,
            port=old.port,
            profile=self.profile,
            sink=old.sink,
            faults=self.faults,
            seeds=seeds,
            rng=random.Random(self.rng.random()),  # noqa: S311
            clock=self.clock,
        )
        await relay.start()
        self.relays[name] = relay
        return relay

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.live()), return_exceptions=True)

    async def wait_for(self, condition: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            await asyncio.sleep(step)
        return condition()

    def converged_members(self) -> bool:
        """Every live relay sees every other live relay alive."""
        live = self.live()
        names = {r.name for r in live}
        for relay in live:
            assert relay.table is not None
            seen = {m.name for m in relay.table.live()} | {relay.name}
            if not names <= seen:
                return False
        return True


def dev_cell_env(folder: str, cell: str) -> dict[str, str]:
    """A throwaway cell's configuration (SQLite ledger, software keys in their own
    file, auto-unsealed through them), as `keycell server --dev` makes one."""
    from keycell.functions.wiring import dev_environment

    return dev_environment(folder, cell)


def open_dev_cell(folder: str, cell: str) -> CellServices:
    """The services of a dev cell in `folder`, initialized on first use and unsealed."""
    from keycell.functions.wiring import services_from_environment

    services = services_from_environment(dev_cell_env(folder, cell))
    if not services.seal.status().initialized:
        services.seal.init(1, 1)
        services.after_unseal()
    services.ensure_unsealed()
    return services

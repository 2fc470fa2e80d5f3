"""Python's cycle collector, paced for a long-lived server process: a relay process
(`keycell relay`) and each API worker (`keycell server`).

Such a process keeps a large, long-lived heap (modules; a relay's member tables,
entry stores, channels and streams; a worker's router and caches), and CPython's
automatic full collection walks all of it. On a process of 30 relays that was a
~180 ms stop of the event loop, a few times a minute under revocation traffic, and
every revocation in flight waited it out (it was the p99 of `python -m
bench.revocation` at 3 x 30). In an API worker a full collection is ~30 ms with
every request in flight stopped (the writer threads wait for the GIL). Young
collections are cheap and stay as they are.

So the long-lived heap is frozen (`gc.freeze`: moved to the permanent generation, no
longer walked; reference counting still frees what it can) when pacing starts, and
no automatic full collection runs. A cycle that became garbage after surviving two
young collections is reclaimed by one full collection every `full_every` seconds: a
known, rare pause instead of frequent ones.
"""

from __future__ import annotations

import asyncio
import gc

NEVER = 2**31 - 1  # a full-collection threshold no count of young collections reaches
FULL_EVERY = 600.0  # seconds between full collections


async def pace_collections(full_every: float = FULL_EVERY) -> None:
    """Run for the life of the process (cancel to stop: the collector's settings
    are put back)."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()  # (the modules and startup state: never garbage, never walked again)
    gc.set_threshold(thresholds[0], thresholds[1], NEVER)
    try:
        while True:
            await asyncio.sleep(full_every)
            gc.collect()
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()

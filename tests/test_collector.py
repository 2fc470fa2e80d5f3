"""The paced cycle collector of relay processes and API workers (keycell/collector.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref

from keycell.collector import NEVER, pace_collections


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_no_automatic_full_collection_then_a_paced_one_reclaims_cycles() -> None:
    async def scenario() -> None:
        before = gc.get_threshold()
        pacer = asyncio.create_task(pace_collections(full_every=0.2))
        await asyncio.sleep(0)  # (the pacer starts: the heap so far is frozen)
        try:
            assert gc.get_freeze_count() > 0
            assert gc.get_threshold() == (before[0], before[1], NEVER)
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle: reference counting alone never frees it
            gone = weakref.ref(a)
            gc.collect(1)
            gc.collect(1)  # (survived two young collections: now among the old)
            del a, b
            gc.collect(1)  # young collections still run, and do not walk the old
            assert gone() is not None
            await asyncio.sleep(0.5)  # a paced full collection
            assert gone() is None
        finally:
            pacer.cancel()
            await asyncio.gather(pacer, return_exceptions=True)
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0

    asyncio.run(scenario())


def test_an_api_worker_paces_its_collector_from_its_first_request(monkeypatch) -> None:
    from keycell import server

    monkeypatch.setattr(server, "_collector", None)
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def scenario() -> None:
        before = gc.get_threshold()
        # (an event-stream request with no token: refused before the router is needed)
        scope = {
            "type": "http",
            "method": "GET",
            "path": server.EVENTS_PATH,
            "headers": [],
            "query_string": b"",
        }
        await server.asgi_app(scope, None, send)
        await asyncio.sleep(0)
        assert sent[0]["status"] == 403
        assert gc.get_threshold() == (before[0], before[1], NEVER) and gc.get_freeze_count() > 0
        pacer = server._collector
        assert pacer is not None
        await server.asgi_app(scope, None, send)
        assert server._collector is pacer  # one per worker
        pacer.cancel()
        await asyncio.gather(pacer, return_exceptions=True)
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0

    asyncio.run(scenario())

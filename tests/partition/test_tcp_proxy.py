"""The harness's userspace TCP proxy (delay where `netem` is not available), in front
of a live cell's API: calls pass through it, held at least its delay; `cut()` drops
open connections and refuses new ones, `heal()` lets them through again."""

from __future__ import annotations

import time

import pytest

from keycell.breach import Api, BreachError
from keycell.testing.netns import ROOT, PartitionedCells, TcpProxy

from .conftest import CUT

DELAY = 0.2


def test_the_proxy_delays_cuts_and_heals_a_cell_api(cells: PartitionedCells) -> None:
    target = cells.network.cells[CUT]
    with TcpProxy((target.api_ip, 8200), delay=DELAY) as proxy:
        assert proxy.address[0] == "127.0.0.1"
        api = Api(ROOT, timeout=5.0)
        url = f"http://127.0.0.1:{proxy.port}"
        started = time.monotonic()
        status, answer = api.call(url, "GET", "sys/revocations/freshness")
        assert status == 200 and answer["data"]["cell"] == CUT
        assert time.monotonic() - started >= 2 * DELAY  # held once each way

        proxy.cut()
        with pytest.raises(BreachError):
            Api(ROOT, timeout=2.0).call(url, "GET", "sys/revocations/freshness")
        assert proxy.refused >= 1

        proxy.heal()
        status, _ = Api(ROOT, timeout=5.0).call(url, "GET", "sys/revocations/freshness")
        assert status == 200

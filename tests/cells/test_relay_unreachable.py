"""A cell whose relay cannot be reached keeps serving what it holds, but cannot claim
the home of a new secret (that needs a majority of cells, reached through the relay):
the write is refused with 503, says why, and writes nothing."""

from __future__ import annotations

from pathlib import Path

from keycell.control_plane.router import Request
from keycell.functions.wiring import router_from_environment
from keycell.relay.cluster import dev_cell_env
from keycell.testing.processes import free_port

ROOT = "kc.relay-unreachable-root"


def test_a_new_secret_is_refused_naming_the_unreachable_relay(tmp_path: Path) -> None:
    env = {**dev_cell_env(str(tmp_path), "a"), "KEYCELL_RELAY": f"127.0.0.1:{free_port()}"}
    router = router_from_environment(env)
    router.services.seal.init(1, 1, root_token=ROOT)
    router.services.after_unseal()
    written = router.handle(
        Request("POST", "secret/data/app/new", data={"data": {"v": "canary-unwritten"}}, token=ROOT)
    )
    assert written.status == 503
    message = written.body["errors"][0]  # type: ignore[index]
    assert "relay" in message and "cannot be reached" in message and "canary" not in message
    read = router.handle(Request("GET", "secret/data/app/new", token=ROOT))
    assert read.status == 404  # nothing was written

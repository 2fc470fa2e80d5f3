"""Three cells, one cut off for a while (the relays' fault injection cuts every
cross-cell call, gossip and replication alike).

While cut off, cell c serves every read of a non-revoked secret from its replicas,
refuses writes to secrets homed elsewhere with an error naming the home, takes writes
to its own secrets and local revocations; a and b go on writing theirs. After the
partition heals, every cell holds every home's latest versions and the same revocation
set, every revoked token is refused in every cell, nothing written is lost and nothing
deleted or revoked comes back."""

from __future__ import annotations

import time

import pytest

from keycell.cells.mesh import Mesh
from keycell.control_plane.ledger import Kind, iter_prefix

CELLS = ("a", "b", "c")


def create_token(mesh: Mesh, cell: str) -> tuple[str, str]:
    reply = mesh.request(cell, "POST", "auth/token/create", {"policies": ["default"], "ttl": "1h"})
    assert reply.status == 200, reply.body
    auth = reply.body["auth"]  # type: ignore[index]
    return auth["client_token"], auth["accessor"]


def token_works(mesh: Mesh, cell: str, token: str) -> bool:
    return mesh.request(cell, "GET", "auth/token/lookup-self", token=token).status == 200


def revoke(mesh: Mesh, cell: str, accessor: str) -> None:
    reply = mesh.request(cell, "POST", "sys/revocations", {"accessor": accessor, "reason": "test"})
    assert reply.status == 200, reply.body


def revoked_subjects(mesh: Mesh, cell: str) -> set[str]:
    barrier = mesh.api_services[cell].barrier
    return {item.key.path for item in iter_prefix(barrier, Kind.REVOCATION, page_size=500)}


def current_version(mesh: Mesh, cell: str, secret: str) -> int | None:
    reply = mesh.request(cell, "GET", f"secret/metadata/{secret}")
    return reply.body["data"]["current_version"] if reply.status == 200 else None  # type: ignore[index]


def diagnose(mesh: Mesh, latest: dict[str, tuple[str, dict[str, str], int]]) -> str:
    behind = [
        (cell, secret, current_version(mesh, cell, secret), version)
        for secret, (_, value, version) in latest.items()
        for cell in CELLS
        if mesh.value_in(cell, secret) != value or current_version(mesh, cell, secret) != version
    ]
    counters = {a.relay.name: (a.leader(), a.counters) for agents in mesh.agents.values() for a in agents}
    return f"replicas behind: {behind}; agents: {counters}"


@pytest.mark.parametrize("mesh", [1, 2], indirect=True, ids=["1-relay-per-cell", "2-relays-per-cell"])
def test_a_partitioned_cell_keeps_reading_refuses_foreign_writes_and_converges_after_healing(
    mesh: Mesh,
) -> None:
    # Secrets homed in each cell (a secret's first write claims its home).
    latest: dict[str, tuple[str, dict[str, str], int]] = {}  # secret -> (home, value, version)
    for home in CELLS:
        for i in range(3):
            secret = f"{home}/app{i}"
            value = {"password": f"{home}-{i}-v1"}
            reply = mesh.write(home, secret, value)
            assert reply.status == 200, reply.body
            latest[secret] = (home, value, 1)
    tokens = {cell: [create_token(mesh, cell) for _ in range(3)] for cell in CELLS}

    def everywhere_current() -> bool:
        return all(
            mesh.value_in(cell, secret) == value and current_version(mesh, cell, secret) == version
            for secret, (_, value, version) in latest.items()
            for cell in CELLS
        )

    assert mesh.wait_for(everywhere_current, 10), diagnose(mesh, latest)

    mesh.partition("c")
    cut_started = time.monotonic()

    # a and b keep writing their own secrets, and a write in b to a's secret is forwarded to a.
    for secret in ("a/app0", "b/app1"):
        home = latest[secret][0]
        value = {"password": f"{secret}-v2"}
        assert mesh.write(home, secret, value).status == 200
        latest[secret] = (home, value, 2)
    forwarded = {"password": "a/app1-from-b"}
    reply = mesh.write("b", "a/app1", forwarded)
    assert reply.status == 200, reply.body
    assert reply.body["data"]["version"] == 2  # type: ignore[index]
    latest["a/app1"] = ("a", forwarded, 2)
    # a soft delete at the home while c is away: c must not serve the old value afterwards
    assert mesh.request("a", "DELETE", "secret/data/a/app2").status == 204
    deleted = "a/app2"
    del latest[deleted]

    # c writes its own secrets (CP at its home) and refuses secrets homed elsewhere.
    value = {"password": "c/app0-v2"}
    assert mesh.write("c", "c/app0", value).status == 200
    latest["c/app0"] = ("c", value, 2)
    # a new secret needs a majority of cells to claim its home: not in c, but in a
    cut_off = mesh.write("c", "c/new", {"password": "born-in-the-partition"})
    assert cut_off.status == 503 and "majority" in cut_off.body["errors"][0]  # type: ignore[index]
    born = {"password": "born-in-the-partition"}
    assert mesh.write("a", "a/new", born).status == 200
    latest["a/new"] = ("a", born, 1)
    for secret in ("a/app0", "b/app2"):
        refused = mesh.write("c", secret, {"password": "lost?"})
        assert refused.status == 503
        home = latest[secret][0]
        assert f"homed in cell '{home}'" in refused.body["errors"][0]  # type: ignore[index]
        assert "cannot reach" in refused.body["errors"][0]  # type: ignore[index]
    refused = mesh.write("a", "c/app1", {"password": "lost?"})
    assert refused.status == 503 and "homed in cell 'c'" in refused.body["errors"][0]  # type: ignore[index]

    # Revocations on both sides of the cut, each refused at once where it was made.
    revoke(mesh, "c", tokens["c"][0][1])
    revoke(mesh, "c", tokens["a"][0][1])  # a's token, revoked from c: a learns after the heal
    revoke(mesh, "a", tokens["b"][0][1])
    revoke(mesh, "b", tokens["c"][1][1])  # c's token, revoked from b: c learns after the heal
    assert not token_works(mesh, "c", tokens["c"][0][0])
    assert mesh.wait_for(lambda: not token_works(mesh, "b", tokens["b"][0][0]), 5)  # gossiped a -> b
    assert token_works(mesh, "a", tokens["a"][0][0])  # revoked in c: a cannot know yet

    # c serves every read it held before the cut, all the time it is cut off.
    reads = ok = 0
    ages: list[float] = []
    while time.monotonic() - cut_started < 1.5:
        for secret, (home, _, _) in latest.items():
            if secret == "a/new":
                continue
            reply = mesh.read("c", secret)
            reads += 1
            ok += reply.status == 200
            if home != "c":
                ages.append(float(reply.headers["X-Keycell-Replica-Age"]))
        time.sleep(0.05)
    assert reads > 0 and ok == reads  # 100% of reads served
    assert max(ages) >= 0.5  # the replicas say they are getting old
    # a bound c cannot meet is refused, not answered with a stale value
    bounded = mesh.read("c", "a/app0", max_staleness="200ms")
    assert bounded.status == 412 and "'a'" in bounded.body["errors"][0]  # type: ignore[index]
    assert mesh.value_in("c", "a/app0") == {"password": "a-0-v1"}  # the old value, with its age

    mesh.heal()
    revoked = {f"token:{tokens[c][0][1]}" for c in ("c", "a", "b")} | {f"token:{tokens['c'][1][1]}"}

    def converged() -> bool:
        if not everywhere_current():
            return False
        if any(mesh.read(cell, deleted).status != 404 for cell in CELLS):
            return False
        return all(revoked <= revoked_subjects(mesh, cell) for cell in CELLS)

    if not mesh.wait_for(converged, 20):
        behind = [
            (cell, secret, current_version(mesh, cell, secret), version)
            for secret, (_, value, version) in latest.items()
            for cell in CELLS
            if mesh.value_in(cell, secret) != value or current_version(mesh, cell, secret) != version
        ]
        still = [cell for cell in CELLS if mesh.read(cell, deleted).status != 404]
        missing = {cell: revoked - revoked_subjects(mesh, cell) for cell in CELLS}
        raise AssertionError(
            f"not converged: replicas {behind}, deleted served in {still}, revocations {missing}"
        )
    sets = {cell: revoked_subjects(mesh, cell) for cell in CELLS}
    assert sets["a"] == sets["b"] == sets["c"]
    # every revoked token is refused where it lives; the others still work
    for cell in CELLS:
        for token, accessor in tokens[cell]:
            assert token_works(mesh, cell, token) == (f"token:{accessor}" not in revoked)
    # nothing lost: every version written at a home is there, with its number, in every cell
    for secret, (_, value, version) in latest.items():
        for cell in CELLS:
            assert current_version(mesh, cell, secret) == version
            assert mesh.value_in(cell, secret) == value
    # nothing resurrected: the deleted version stays deleted, the refused writes never landed
    for cell in CELLS:
        assert mesh.read(cell, deleted).status == 404
        assert mesh.value_in(cell, "b/app2") == {"password": "b-2-v1"}
    # and a fresh read bounded at 0 is served from the home in every cell
    for cell in CELLS:
        fresh = mesh.read(cell, "a/app0", max_staleness="0")
        assert fresh.status == 200 and fresh.body["data"]["data"] == latest["a/app0"][1]  # type: ignore[index]


def test_replicas_hold_ciphertext_under_their_own_cell_key_only(mesh: Mesh) -> None:
    assert mesh.write("a", "x/db", {"password": "hunter2-very-secret"}).status == 200
    assert mesh.wait_for(lambda: all(mesh.value_in(c, "x/db") is not None for c in CELLS), 10)
    from keycell.control_plane.envelope import Envelope
    from keycell.control_plane.ledger import Key

    for cell in CELLS:
        services = mesh.api_services[cell]
        item = services.barrier.get(Key(Kind.SECRET_VERSION, "secret/x/db#0000000001"))
        assert item is not None
        envelope = Envelope.from_bytes(item.value)
        assert set(envelope.wrapped_keys) == {cell}  # no other cell's key, no plaintext
        assert b"hunter2" not in envelope.ciphertext
        raw = services.ledger.get(Key(Kind.SECRET_VERSION, "secret/x/db#0000000001"))
        assert raw is not None and b"hunter2" not in raw.value


def test_bad_staleness_bounds_are_refused_with_400(mesh: Mesh) -> None:
    assert mesh.write("a", "y/db", {"k": "v"}).status == 200
    for bad in ("soon", "-1", "1h", "1e3"):
        reply = mesh.read("a", "y/db", max_staleness=bad)
        assert reply.status == 400, bad
    reply = mesh.read("a", "y/db", max_staleness="0")
    assert reply.status == 200 and reply.headers["X-Keycell-Replica-Age"] == "0.000"
    assert reply.headers["X-Keycell-Home-Cell"] == "a"


def test_sys_cells_lists_every_cell_with_its_key_fingerprint(mesh: Mesh) -> None:
    reply = mesh.request("b", "GET", "sys/cells")
    assert reply.status == 200, reply.body
    data = reply.body["data"]  # type: ignore[index]
    assert data["cell"] == "b" and set(data["cells"]) == set(CELLS)
    for cell, record in data["cells"].items():
        assert record["fingerprint"].startswith("sha256:")
        assert record["relays"] == [mesh.relays[cell][0].addr]
        assert record["health"] == "ok" and record["age_seconds"] < 30
    assert len({r["fingerprint"] for r in data["cells"].values()}) == 3


def test_a_process_cut_off_from_its_relay_still_refuses_what_its_ledger_holds(mesh: Mesh) -> None:
    """Revocation checks never wait on the relay: with cell b's relay gone, a revocation
    another process of b committed to b's ledger is refused at once (every check is a
    strongly consistent read of the cell's own ledger)."""
    from keycell.control_plane.revocations import RevocationLog

    token, accessor = create_token(mesh, "b")
    assert token_works(mesh, "b", token)
    mesh.run(mesh.relays["b"][0].stop())
    # another API process of cell b takes the revoke call: its ledger write is the CP step
    RevocationLog(mesh.sinks["b"].services.revocations).record(f"token:{accessor}", reason="relay down")
    assert not token_works(mesh, "b", token)
    assert token_works(mesh, "a", create_token(mesh, "a")[0])

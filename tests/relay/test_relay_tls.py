"""Mutual TLS between relays (keycell/relay/tls.py), over real sockets: relays of one
trust domain stream to each other; a peer with a certificate from another CA, with
no client certificate, or from another trust domain is refused; the Cells service
takes only relays (and its own cell's API processes, for the calls they make)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from keycell.cells._pb import cells_pb2 as cells_pb
from keycell.cells._pb import cells_pb2_grpc as cells_grpc
from keycell.cells.agent import attach
from keycell.control_plane.revocations import RevocationRecord, new_revocation_id
from keycell.relay._pb import relay_pb2 as pb
from keycell.relay._pb import relay_pb2_grpc as pb_grpc
from keycell.relay.node import Relay
from keycell.relay.tls import (
    API,
    LOCAL_METHODS,
    RELAY,
    RELAY_METHODS,
    PeerId,
    RelayTLS,
    TLSConfigError,
    allowed,
    from_env,
    from_values,
)
from keycell.testing.relay_tls import TestCA

TD = "mesh.test"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA(TD)


def creds_for(ca: TestCA, spiffe_id: str | None) -> grpc.ChannelCredentials:
    """A client certificate from `ca` for any SPIFFE ID (or none), keycell's or not."""
    cert, key = ca.issue(spiffe_id)
    return grpc.ssl_channel_credentials(root_certificates=ca.pem, private_key=key, certificate_chain=cert)


def relay_tls(ca: TestCA, folder: Path, cell: str, label: str = "") -> RelayTLS:
    tls = from_env(ca.relay(folder, cell, label or f"relay-{cell}-{time.monotonic_ns()}"))
    assert tls is not None
    return tls


def revocation(subject: str, cell: str) -> RevocationRecord:
    return RevocationRecord(new_revocation_id(), subject, cell, time.time(), "test")


async def wait_for(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return bool(condition())


async def status(addr: str, creds: grpc.ChannelCredentials) -> pb.StatusReply:
    async with grpc.aio.secure_channel(addr, creds) as channel:
        stub = pb_grpc.RelayStub(channel)  # type: ignore[no-untyped-call]
        return await stub.Status(pb.StatusRequest(), timeout=3)


def test_relays_with_mtls_form_one_mesh_and_spread_a_revocation(ca: TestCA, tmp_path: Path) -> None:
    async def scenario() -> None:
        relays = []
        try:
            for i, cell in enumerate("aab"):
                seeds = [relays[0].addr] if relays else []
                relay = Relay(f"{cell}-{i}", cell, tls=relay_tls(ca, tmp_path, cell), seeds=seeds)
                await relay.start()
                relays.append(relay)
            names = {r.name for r in relays}
            assert await wait_for(
                lambda: all({m.name for m in r.table.live()} | {r.name} == names for r in relays), 10
            )
            rec = revocation("token:mtls", "a")
            relays[0].submit(rec)
            assert await wait_for(lambda: all(rec.id in r.applied for r in relays), 5)
            # the server saw a verified client identity (no plaintext path exists)
            assert all(r.counters["refused_impostor"] == 0 for r in relays)
        finally:
            await asyncio.gather(*(r.stop() for r in relays))

    asyncio.run(scenario())


def test_peers_outside_the_trust_domain_or_ca_are_refused(ca: TestCA, tmp_path: Path) -> None:
    other_ca = TestCA(TD, name="another CA")

    async def scenario() -> None:
        relay = Relay("a-0", "a", tls=relay_tls(ca, tmp_path, "a"))
        await relay.start()
        # A relay whose certificate comes from another CA (same trust domain name).
        stranger = Relay("a-9", "a", tls=relay_tls(other_ca, tmp_path / "other", "a"), seeds=[relay.addr])
        try:
            good = relay_tls(ca, tmp_path, "b").channel_credentials()
            assert (await status(relay.addr, good)).name == "a-0"

            no_client_cert = grpc.ssl_channel_credentials(root_certificates=ca.pem)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await status(relay.addr, no_client_cert)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            foreign = relay_tls(other_ca, tmp_path / "other", "b")
            foreign_creds = grpc.ssl_channel_credentials(
                root_certificates=ca.pem, private_key=foreign.key, certificate_chain=foreign.cert
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await status(relay.addr, foreign_creds)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            wrong_domain = creds_for(ca, "spiffe://elsewhere.test/keycell/relay/b")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await status(relay.addr, wrong_domain)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

            # A peer in the trust domain but not a keycell relay or API: no stream.
            await stream_refused(relay.addr, creds_for(ca, f"spiffe://{TD}/workload/web"))

            # The stranger relay (other CA) never joins: its streams fail the handshake.
            await stranger.start()
            await asyncio.sleep(1.0)
            assert relay.table is not None and relay.table.get("a-9") is None
            assert stranger.table is not None and stranger.table.get("a-0") is None
            assert stranger.counters["stream_failures"] >= 1
        finally:
            await stranger.stop()
            await relay.stop()

    asyncio.run(scenario())


async def stream_refused(addr: str, creds: grpc.ChannelCredentials) -> None:
    """Opening a relay-to-relay stream with these credentials is refused (PERMISSION_DENIED)."""
    async with grpc.aio.secure_channel(addr, creds) as channel:
        stub = pb_grpc.RelayStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Stream(iter([pb.Envelope(sender="x", sender_addr="127.0.0.1:1", sender_cell="a")]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_an_api_identity_may_use_its_own_relay_but_not_speak_as_a_relay(ca: TestCA, tmp_path: Path) -> None:
    async def scenario() -> None:
        relay = Relay("a-0", "a", tls=relay_tls(ca, tmp_path, "a"))
        await relay.start()
        try:
            own_api = from_env(ca.api(tmp_path, "a"))
            other_api = from_env(ca.api(tmp_path, "b"))
            assert own_api is not None and other_api is not None
            assert (await status(relay.addr, own_api.channel_credentials())).cell == "a"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await status(relay.addr, other_api.channel_credentials())
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await stream_refused(relay.addr, own_api.channel_credentials())
        finally:
            await relay.stop()

    asyncio.run(scenario())


def test_the_cells_service_refuses_callers_that_are_not_relays(ca: TestCA, tmp_path: Path, sinks) -> None:
    async def scenario() -> None:
        relay = Relay("a-0", "a", tls=relay_tls(ca, tmp_path, "a"))
        attach(relay, sinks["a"].services)
        await relay.start()
        try:

            async def directory(creds: grpc.ChannelCredentials) -> cells_pb.DirectoryState:
                async with grpc.aio.secure_channel(relay.addr, creds) as channel:
                    stub = cells_grpc.CellsStub(channel)  # type: ignore[no-untyped-call]
                    return await stub.Directory(cells_pb.DirectoryState(), timeout=5)

            peer = relay_tls(ca, tmp_path, "b")
            await directory(peer.channel_credentials())  # a relay of another cell: served

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await directory(grpc.ssl_channel_credentials(root_certificates=ca.pem))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # no client certificate

            for spiffe_id in (f"spiffe://{TD}/keycell/api/a", f"spiffe://{TD}/workload/x", None):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await directory(creds_for(ca, spiffe_id))
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await relay.stop()

    asyncio.run(scenario())


def test_every_method_of_the_mesh_services_has_its_callers_named() -> None:
    """A method not in either list is refused to everyone: each one the relay and the
    Cells service serve is named, relay-to-relay or also for the cell's own API."""
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (pb, cells_pb)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served == RELAY_METHODS | LOCAL_METHODS
    assert not RELAY_METHODS & LOCAL_METHODS
    me, relay_b, api_a = PeerId(TD, RELAY, "a"), PeerId(TD, RELAY, "b"), PeerId(TD, API, "a")
    forward = "/keycell.cells.v1.Cells/Forward"
    assert allowed(me, relay_b, forward) and allowed(me, api_a, forward)  # both forward KV changes
    assert allowed(me, relay_b, "/keycell.cells.v1.Cells/DigestBuckets")
    assert not allowed(me, api_a, "/keycell.cells.v1.Cells/DigestBuckets")
    assert not allowed(me, relay_b, "/keycell.cells.v1.Cells/NotAMethod")


def test_plaintext_is_refused_off_loopback(ca: TestCA, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="mutual TLS"):
        Relay("a-0", "a", host="0.0.0.0")
    with pytest.raises(TLSConfigError, match="not a relay of cell b"):
        Relay("b-0", "b", host="127.0.0.1", tls=relay_tls(ca, tmp_path, "a"))
    with pytest.raises(TLSConfigError, match="all of"):
        from_values(str(tmp_path / "x.crt"), None, None)

    from keycell.cli import app

    result = CliRunner().invoke(app, ["relay", "--cell", "a", "--listen", "0.0.0.0:0"])
    assert result.exit_code == 2
    assert "needs mutual TLS" in result.output


def test_a_relay_speaks_only_for_the_cell_its_certificate_names(ca: TestCA, tmp_path: Path) -> None:
    async def scenario() -> None:
        relay = Relay("a-0", "a", tls=relay_tls(ca, tmp_path, "a"))
        await relay.start()
        try:
            of_b = relay_tls(ca, tmp_path, "b").channel_credentials()
            async with grpc.aio.secure_channel(relay.addr, of_b) as channel:
                stub = pb_grpc.RelayStub(channel)  # type: ignore[no-untyped-call]
                posing = pb.Envelope(sender="a-7", sender_addr="127.0.0.1:1", sender_cell="a")
                async for _ in stub.Stream(iter([posing])):
                    pass
            assert relay.counters["refused_impostor"] == 1
            assert relay.table is not None and relay.table.get("a-7") is None
        finally:
            await relay.stop()

    asyncio.run(scenario())


def test_an_api_process_hands_over_and_follows_its_relay_over_mtls(ca: TestCA, tmp_path: Path) -> None:
    """The API side's clients (revocation hand-over, the Subscribe stream) with the
    cell's API certificate, against a relay that requires mTLS."""
    import threading

    from keycell.relay.handoff import RelayHandoff
    from keycell.relay.subscriber import RelaySubscription

    api_tls = from_env(ca.api(tmp_path, "a"))
    heard: list[str] = []
    got = threading.Event()

    async def scenario() -> None:
        relay = Relay("a-0", "a", tls=relay_tls(ca, tmp_path, "a"))
        await relay.start()
        loop = asyncio.get_running_loop()
        subscription = RelaySubscription(
            relay.addr, lambda e: (heard.append(e.id), got.set()), tls=api_tls
        ).start()
        handoff = RelayHandoff(relay.addr, tls=api_tls, timeout=5)
        try:
            assert await loop.run_in_executor(None, subscription.ready.wait, 10)
            rec = revocation("token:via-api", "a")
            await loop.run_in_executor(None, handoff, rec)
            assert await loop.run_in_executor(None, got.wait, 10)
            assert heard == [rec.id]
            with pytest.raises(TLSConfigError):
                RelayHandoff("10.0.0.1:7946")  # no plaintext off loopback
        finally:
            await loop.run_in_executor(None, subscription.stop)
            handoff.close()
            await relay.stop()

    asyncio.run(scenario())


def test_keycell_relay_serves_mtls_from_its_options(ca: TestCA, tmp_path: Path) -> None:
    from keycell.testing.processes import ServerProcess

    env = ca.relay(tmp_path / "tls", "a")
    folder = tmp_path / "cell"
    folder.mkdir()
    process = ServerProcess(
        "keycell",
        ["relay", "--cell", "a", "--dev-data-dir", str(folder), "--profile", "local"],
        what="keycell relay with mTLS",
        env=env,
        startup_timeout=60,
    )
    port = process.start()
    try:
        peer = relay_tls(ca, tmp_path, "b").channel_credentials()
        reply = asyncio.run(status(f"127.0.0.1:{port}", peer))
        assert reply.cell == "a"
        with pytest.raises(grpc.aio.AioRpcError):
            asyncio.run(status(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root_certificates=ca.pem)))
    finally:
        process.stop()


def test_a_relay_advertises_the_host_its_certificate_names(ca: TestCA, tmp_path: Path) -> None:
    async def scenario() -> None:
        first = Relay("a-0", "a", tls=relay_tls(ca, tmp_path, "a"), advertise="localhost")
        await first.start()
        second = Relay(
            "b-0", "b", tls=relay_tls(ca, tmp_path, "b"), advertise="localhost", seeds=[first.addr]
        )
        try:
            await second.start()
            assert first.addr.startswith("localhost:") and second.addr.startswith("localhost:")
            assert await wait_for(
                lambda: (
                    first.table is not None
                    and (m := first.table.get("b-0")) is not None
                    and m.addr == second.addr
                ),
                10,
            )
        finally:
            await second.stop()
            await first.stop()

    asyncio.run(scenario())

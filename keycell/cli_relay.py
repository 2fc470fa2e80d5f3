"""`keycell relay` (the long-lived revocation relay of a cell) and `keycell revoke`
(a revocation through the cell's API: committed there, then gossiped everywhere)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Annotated

import typer
from rich.console import Console

errors = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}")
    return typer.Exit(2)


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise _fail(f"{what} takes HOST:PORT, not {text!r}")
    return host, int(port)


def relay(
    cell: Annotated[str | None, typer.Option(envvar="KEYCELL_CELL", help="This relay's cell.")] = None,
    listen: Annotated[
        str,
        typer.Option(
            envvar="KEYCELL_RELAY_LISTEN", help="HOST:PORT for the relay's gRPC server (port 0: any)."
        ),
    ] = "127.0.0.1:0",
    join: Annotated[
        str,
        typer.Option(
            envvar="KEYCELL_RELAY_PEERS", help="Comma-separated HOST:PORT of relays to join through."
        ),
    ] = "",
    profile: Annotated[
        str, typer.Option(envvar="KEYCELL_RELAY_PROFILE", help="Timing profile: local, lan or wan.")
    ] = "lan",
    count: Annotated[
        int, typer.Option(min=1, max=500, help="Relays in this process (one event loop; own port each).")
    ] = 1,
    name: Annotated[str | None, typer.Option(help="Relay name (default CELL@HOST:PORT).")] = None,
    dev_data_dir: Annotated[
        str | None,
        typer.Option(help="Follow the dev cell in this folder (`keycell server --dev --data-dir`)."),
    ] = None,
    metrics_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT for GET /metrics (Prometheus).")
    ] = None,
    addresses_file: Annotated[
        str | None, typer.Option(help="Write the relays' addresses here (JSON).")
    ] = None,
    loss: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fault injection: drop this share of messages.")
    ] = 0.0,
    delay: Annotated[
        float, typer.Option(min=0.0, help="Fault injection: seconds added to each message.")
    ] = 0.0,
    jitter: Annotated[
        float, typer.Option(min=0.0, help="Fault injection: plus up to this many seconds.")
    ] = 0.0,
    advertise: Annotated[
        str,
        typer.Option(
            envvar="KEYCELL_RELAY_ADVERTISE",
            help="Host other relays dial to reach this one (default: the --listen host).",
        ),
    ] = "",
    tls_cert: Annotated[
        str | None,
        typer.Option(
            envvar="KEYCELL_RELAY_TLS_CERT",
            help="mTLS: this relay's certificate (path or PEM; URI SAN spiffe://TD/keycell/relay/CELL).",
        ),
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option(envvar="KEYCELL_RELAY_TLS_KEY", help="mTLS: its private key (path or PEM).")
    ] = None,
    tls_ca: Annotated[
        str | None,
        typer.Option(envvar="KEYCELL_RELAY_TLS_CA", help="mTLS: the mesh's CA bundle (path or PEM)."),
    ] = None,
    tls_server_name: Annotated[
        str,
        typer.Option(
            envvar="KEYCELL_RELAY_TLS_SERVER_NAME",
            help="mTLS: name to check in peers' certificates instead of the dialled host.",
        ),
    ] = "",
) -> None:
    """Run the cell's revocation relay: SWIM membership and revocation gossip over gRPC.

    The cell's ledger comes from the environment (KEYCELL_LEDGER, KEYCELL_KEY_BACKEND,
    KEYCELL_SEAL, as for `keycell server`) or from --dev-data-dir. Prints `READY <port>`
    once the first relay listens. API processes follow it with KEYCELL_RELAY=HOST:PORT.
    """
    from keycell.cells.agent import attach as attach_cells
    from keycell.collector import pace_collections
    from keycell.functions.wiring import auditor_from_environment, services_from_environment
    from keycell.relay.cell import LedgerSink
    from keycell.relay.cluster import dev_cell_env
    from keycell.relay.faults import Faults
    from keycell.relay.metrics import serve_metrics
    from keycell.relay.node import Relay
    from keycell.relay.profiles import profile as named_profile
    from keycell.relay.tls import TLSConfigError, from_values, is_loopback
    from keycell.testing.processes import announce_ready

    try:
        timing = named_profile(profile)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    env = dict(os.environ)
    if dev_data_dir:
        env.update(dev_cell_env(os.path.abspath(dev_data_dir), cell or env.get("KEYCELL_CELL", "dev")))
    cell_id = cell or env.get("KEYCELL_CELL", "local")
    env["KEYCELL_CELL"] = cell_id
    env.pop("KEYCELL_RELAY", None)  # this process is the relay
    host, port = _host_port(listen, "--listen")
    try:
        tls = from_values(tls_cert, tls_key, tls_ca, server_name=tls_server_name)
    except TLSConfigError as exc:
        raise _fail(str(exc)) from None
    if tls is None and not is_loopback(host):
        raise _fail(
            f"--listen {listen}: a relay off loopback needs mutual TLS; pass --tls-cert, --tls-key and"
            " --tls-ca (or KEYCELL_RELAY_TLS_CERT/_KEY/_CA). Plaintext is for loopback only."
        )
    if host in ("0.0.0.0", "::", "[::]") and not advertise:  # noqa: S104 - a check, not a bind
        errors.print(
            f"[yellow]warning:[/] --listen {listen} with no --advertise: other relays are told to dial"
            f" {host}, which they cannot; set --advertise (KEYCELL_RELAY_ADVERTISE) to this relay's host"
        )
    if tls is not None and tls.identity.cell != cell_id:
        raise _fail(f"the TLS certificate names {tls.identity.uri}, not a relay of cell {cell_id}")
    seeds = [s.strip() for s in join.split(",") if s.strip()]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    async def run() -> None:
        services = services_from_environment(env)
        sink = LedgerSink(services, auditor_from_environment(services, env))
        faults = Faults(loss=loss, delay=delay, jitter=jitter)
        relays: list[Relay] = []
        for i in range(count):
            relay = Relay(
                (f"{name}-{i}" if count > 1 else name) if name else "",
                cell_id,
                host=host,
                port=port if i == 0 else 0,
                profile=timing,
                sink=sink,
                faults=faults,
                seeds=seeds or [r.addr for r in relays[:2]],
                tls=tls,
                advertise=advertise,
            )
            attach_cells(relay, sink.services, api_url=os.environ.get("KEYCELL_API_ADDR", ""))  # issue 9
            await relay.start()
            relays.append(relay)
        metrics_server = None
        if metrics_listen:
            mhost, mport = _host_port(metrics_listen, "--metrics-listen")
            metrics_server = await serve_metrics(mhost, mport, lambda: relays)
        if addresses_file:
            info: dict[str, object] = {"relays": [r.addr for r in relays], "names": [r.name for r in relays]}
            if metrics_server is not None:
                mh, mp = metrics_server.sockets[0].getsockname()[:2]
                info["metrics"] = f"{mh}:{mp}"
            with open(addresses_file + ".tmp", "w") as out:
                json.dump(info, out)
            os.replace(addresses_file + ".tmp", addresses_file)
        collector = asyncio.create_task(pace_collections())  # (no full-heap pauses mid-broadcast)
        announce_ready(relays[0].port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        collector.cancel()
        await asyncio.gather(*(r.stop() for r in relays))
        if metrics_server is not None:
            metrics_server.close()
        sink.close()

    asyncio.run(run())


def revoke(
    lease_id: Annotated[str | None, typer.Option(help="A lease id.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Every lease under this path prefix.")] = None,
    accessor: Annotated[str | None, typer.Option(help="A token, by its accessor.")] = None,
    token: Annotated[
        str | None, typer.Option(help="A token (looked up in this cell for its accessor).")
    ] = None,
    spiffe_id: Annotated[str | None, typer.Option(help="A SPIFFE ID (spiffe://...).")] = None,
    svid: Annotated[
        str | None, typer.Option(help="An SVID: a JWT-SVID, or @FILE with a PEM X.509-SVID.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why (kept with the revocation).")] = "keycell revoke",
    address: Annotated[
        str, typer.Option(envvar="VAULT_ADDR", help="The cell's API.")
    ] = "http://127.0.0.1:8200",
    auth_token: Annotated[
        str | None,
        typer.Option("--auth-token", envvar="VAULT_TOKEN", help="A token with sudo on sys/revocations."),
    ] = None,
) -> None:
    """Revoke in every cell: committed to this cell's ledger, then gossiped by the relay.
    Prints the revocation (its id, subject and whether the relay took it) as JSON."""
    import urllib.error
    import urllib.request

    if svid and svid.startswith("@"):
        with open(svid[1:]) as pem:
            svid = pem.read()
    body = {
        k: v
        for k, v in {
            "lease_id": lease_id,
            "prefix": prefix,
            "accessor": accessor,
            "token": token,
            "spiffe_id": spiffe_id,
            "svid": svid,
        }.items()
        if v
    }
    if len(body) != 1:
        raise _fail("name exactly one of --lease-id, --prefix, --accessor, --token, --spiffe-id, --svid")
    if not auth_token:
        raise _fail("no token: pass --auth-token or set VAULT_TOKEN")
    if not address.startswith(("http://", "https://")):
        raise _fail("--address must be an http:// or https:// URL")
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        address.rstrip("/") + "/v1/sys/revocations",
        data=json.dumps({**body, "reason": reason}).encode(),
        headers={"X-Vault-Token": auth_token, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            reply = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            messages = json.loads(exc.read()).get("errors", [])
        except ValueError:
            messages = []
        raise _fail(f"{exc.code}: {'; '.join(messages) or exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _fail(f"cannot reach {address}: {exc.reason}") from None
    typer.echo(json.dumps(reply.get("data", reply)))

"""The `keycell` command line. Subcommands live in groups named after the concept
they operate on (`ledger`, later `keys`, `entry`, `relay`, `agent`, `breach`)."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from keycell import __version__, cli_relay
from keycell.adapters.ledgers import LedgerURLError, default_ledger_url, open_ledger
from keycell.cli_identity import agent, entry_app
from keycell.cli_rotation import rotate as rotate_command
from keycell.control_plane.ledger import Key, Kind, LedgerError, iter_prefix

app = typer.Typer(
    name="keycell",
    help="Keycell: secrets and key lifecycle from regional cells.",
    no_args_is_help=True,
    add_completion=False,
)
ledger_app = typer.Typer(help="Inspect a cell's conditional-write ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
audit_app = typer.Typer(help="Check and merge audit trails.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
app.add_typer(entry_app, name="entry")  # workload identity (issue 6)
app.command("agent")(agent)
app.command("rotate")(rotate_command)  # keycell/cli_rotation.py
from keycell.cli_cells import cells_app  # noqa: E402

app.add_typer(cells_app, name="cells")

console = Console()
errors = Console(stderr=True)

LedgerOption = Annotated[
    str | None,
    typer.Option(
        "--ledger",
        envvar="KEYCELL_LEDGER",
        help="Ledger URL: sqlite:///PATH.db or dynamodb://TABLE?region=R[&endpoint=URL].",
        show_default=False,
    ),
]
KindArgument = Annotated[Kind, typer.Argument(help="Item kind.", case_sensitive=False)]


def _fail(message: str, code: int = 2) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _open(url: str | None):  # type: ignore[no-untyped-def]
    try:
        return open_ledger(url or default_ledger_url())
    except (LedgerURLError, LedgerError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def version() -> None:
    """Print Keycell's version."""
    console.print(f"keycell {__version__}")


@ledger_app.command("info")
def ledger_info(
    ledger: LedgerOption = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Count the live items of each kind (pages through the ledger; never loads it whole)."""
    url = ledger or default_ledger_url()
    store = _open(url)
    try:
        counts = {kind.value: sum(1 for _ in iter_prefix(store, kind, page_size=500)) for kind in Kind}
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps({"ledger": url, "items": counts}))
        return
    table = Table(title=f"ledger {url}")
    table.add_column("kind")
    table.add_column("live items", justify="right")
    for kind, count in counts.items():
        table.add_row(kind, str(count))
    console.print(table)


@ledger_app.command("get")
def ledger_get(kind: KindArgument, path: str, ledger: LedgerOption = None) -> None:
    """Show one item's version, size and expiry (never its value)."""
    store = _open(ledger)
    try:
        item = store.get(Key(kind, path), consistent=True)
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()
    if item is None:
        raise _fail(f"no live item {kind.value}:{path}", code=1)
    typer.echo(
        json.dumps(
            {
                "kind": kind.value,
                "path": path,
                "version": item.version,
                "bytes": len(item.value),
                "expires_at": item.expires_at,
            }
        )
    )


@ledger_app.command("scan")
def ledger_scan(
    kind: KindArgument,
    prefix: Annotated[str, typer.Option(help="Only paths starting with this.")] = "",
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Items per page.")] = 100,
    cursor: Annotated[str | None, typer.Option(help="Cursor printed by the previous page.")] = None,
    ledger: LedgerOption = None,
) -> None:
    """List one page of items under a prefix, as JSON lines; the last line holds the cursor."""
    store = _open(ledger)
    try:
        page = store.scan(kind, prefix, limit=limit, cursor=cursor)
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()
    for item in page.items:
        typer.echo(
            json.dumps(
                {
                    "path": item.key.path,
                    "version": item.version,
                    "bytes": len(item.value),
                    "expires_at": item.expires_at,
                }
            )
        )
    typer.echo(json.dumps({"cursor": page.cursor}))


AuditFiles = Annotated[list[str], typer.Argument(help="Audit files (JSON lines), one or more.")]


@audit_app.command("verify")
def audit_verify(
    files: AuditFiles,
    ledger: Annotated[
        str | None,
        typer.Option(
            "--ledger",
            help="Also check the files end at the chain heads in this cell's ledger (finds cut-off tails).",
            show_default=False,
        ),
    ] = None,
    cell: Annotated[
        str | None, typer.Option("--cell", help="With --ledger: only this cell's chains.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="With --ledger: entries past a chain's head fail too (not only a warning)."
        ),
    ] = False,
) -> None:
    """Check the hash chains: exit 1 naming FILE:LINE of every modified, deleted,
    inserted or reordered entry. A cell has one chain per writing process; they may
    share a file or not. With --ledger, entries past a chain's head (a server worker
    anchors its head a few ms after its sinks; one that crashed leaves them) are
    named as warnings: only the head vouches that nothing was cut after it."""
    from keycell.control_plane.audit import heads_and_tails, verify_files

    try:
        entries, problems = verify_files(files)
    except OSError as exc:
        raise _fail(f"cannot read {exc.filename}: {exc.strerror}") from None
    if ledger is not None:
        found, tails = heads_and_tails(entries, _open(ledger), cell)
        problems.extend(found)
        if strict:
            problems.extend(tails)
        else:
            for tail in tails:
                typer.echo(f"WARN {tail} (not anchored in the ledger)")
    if problems:
        for problem in problems:
            typer.echo(f"FAIL {problem}")
        raise typer.Exit(1)
    cells = sorted({str(e.entry["cell"]) for e in entries})
    typer.echo(f"OK {len(entries)} entries, chain intact (cells: {', '.join(cells) or 'none'})")


@audit_app.command("merge")
def audit_merge(
    files: AuditFiles,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
) -> None:
    """Merge several cells' (or processes') audit files into one timeline ordered by
    hybrid logical clock, verifying every input chain; exit 1 when one is broken."""
    from keycell.control_plane.audit import encode_line, merge

    try:
        timeline, problems = merge(files)
    except OSError as exc:
        raise _fail(f"cannot read {exc.filename}: {exc.strerror}") from None
    for problem in problems:
        errors.print(f"FAIL {problem}", markup=False, highlight=False)
    data = b"".join(encode_line(entry) for entry in timeline)
    if output:
        with open(output, "wb") as handle:
            handle.write(data)
    else:
        typer.echo(data.decode(), nl=False)
    raise typer.Exit(1 if problems else 0)


@app.command()
def demo(
    workdir: Annotated[
        str | None, typer.Option(help="Folder for the cells' files (default: a temp folder).")
    ] = None,
    credentials: Annotated[
        int, typer.Option(min=3, max=20000, help="Workload credentials issued across the cells.")
    ] = 1000,
    secrets_per_cell: Annotated[int, typer.Option(min=1, max=500, help="Rotated secrets per cell.")] = 10,
    partition_seconds: Annotated[
        float, typer.Option(min=0.5, max=120, help="How long one cell stays cut off.")
    ] = 5.0,
    report: Annotated[str | None, typer.Option(help="Where to write the HTML report.")] = None,
    agents: Annotated[
        bool, typer.Option(help="Workloads log in with JWT-SVIDs from a `keycell agent` per cell.")
    ] = True,
    databases: Annotated[
        bool, typer.Option(help="Half the credentials are dynamic PostgreSQL users (when installed).")
    ] = True,
    software_keys: Annotated[
        bool, typer.Option(help="The software key backend even where SoftHSM2 is installed (not FIPS).")
    ] = False,
) -> None:
    """Three cells on loopback and a breach: revoke, rotate, partition, heal, check."""
    from keycell.demo import run_demo

    ok = run_demo(
        console,
        workdir=workdir,
        credentials=credentials,
        secrets_per_cell=secrets_per_cell,
        partition_seconds=partition_seconds,
        report_path=report,
        agents=agents,
        databases=databases,
        software_keys=software_keys,
    )
    raise typer.Exit(0 if ok else 1)


@app.command()
def server(
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on (port 0: any free port).")
    ] = "127.0.0.1:8200",
    data_dir: Annotated[
        str | None, typer.Option(help="Folder for the cell's ledger (not with --dev).")
    ] = None,
    dev: Annotated[
        bool, typer.Option(help="A throwaway cell, initialized and unsealed, like `vault server -dev`.")
    ] = False,
    dev_root_token: Annotated[str | None, typer.Option(help="With --dev: the root token to create.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes sharing the socket.")] = 2,
) -> None:
    """Serve the regional API (Vault's HTTP API) on this machine."""
    import tempfile

    from keycell.functions.wiring import dev_environment
    from keycell.server import serve

    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit():
        raise _fail(f"--listen takes HOST:PORT, not {listen!r}")
    if dev:
        folder = data_dir or tempfile.mkdtemp(prefix="keycell-dev-")
        os.environ.update(dev_environment(folder))
        from keycell.functions.wiring import services_from_environment

        services = services_from_environment()
        result = services.seal.init(1, 1, root_token=dev_root_token)
        services.after_unseal()
        errors.print(
            "[bold yellow]development server[/]: the ledger in "
            + folder
            + " is not fsynced (a crash of the machine may lose any write); never for real secrets"
        )
        errors.print(f"root token: {result.root_token}")
        services.ledger.close()
    else:
        if not data_dir:
            raise _fail("--data-dir is required (or use --dev)")
        os.makedirs(data_dir, exist_ok=True)
        os.environ.setdefault(
            "KEYCELL_LEDGER", f"sqlite://{os.path.join(os.path.abspath(data_dir), 'cell.db')}"
        )
        if os.environ.get("KEYCELL_SEAL", "shamir") == "shamir":
            # The workers share unseal progress and state under a key that lives only
            # in this server's processes (control_plane/unseal_sharing.py).
            from keycell.adapters.ledgers import open_ledger
            from keycell.control_plane.unseal_sharing import SharedUnseal

            boot_key, boot_id = SharedUnseal.new_boot()
            ledger = open_ledger(os.environ["KEYCELL_LEDGER"])
            SharedUnseal(ledger, boot_key, boot_id).forget_other_boots()
            ledger.close()
            os.environ["KEYCELL_BOOT_KEY"], os.environ["KEYCELL_BOOT_ID"] = boot_key.hex(), boot_id
    # A long-lived process: each worker's audit chain head follows its sinks (every few
    # ms) instead of holding every batch for its conditional write (control_plane/audit.py).
    os.environ.setdefault("KEYCELL_AUDIT_ANCHOR", "async")
    serve(host, int(port_text), workers=workers)


app.command("relay")(cli_relay.relay)
app.command("revoke")(cli_relay.revoke)
from keycell.cli_breach import breach as breach_command  # noqa: E402 - issue 13

app.command("breach")(breach_command)

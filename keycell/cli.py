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
from keycell.control_plane.private_files import private_dir, write_private

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
    errors.print(f"[bold red]error:[/] {message}", soft_wrap=True)  # one line, whatever the width
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
        write_private(output, data)
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
        str,
        typer.Option(
            "--listen",
            "-dev-listen-address",
            help="HOST:PORT to listen on (port 0: any free port). Off loopback it needs TLS.",
        ),
    ] = "127.0.0.1:8200",
    data_dir: Annotated[
        str | None, typer.Option(help="Folder for the cell's ledger (not with --dev).")
    ] = None,
    dev: Annotated[
        bool,
        typer.Option(
            "--dev", "-dev", help="A throwaway cell, initialized and unsealed, like `vault server -dev`."
        ),
    ] = False,
    dev_root_token: Annotated[
        str | None, typer.Option(help="With --dev: the root token to create (8 characters or more).")
    ] = None,
    dev_root_token_id: Annotated[
        str | None,
        typer.Option(
            "--dev-root-token-id",
            "-dev-root-token-id",
            help="Vault's spelling of --dev-root-token; with --dev only, and it may be short (`root`).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes sharing the socket.")] = 2,
    max_request_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Largest request body in bytes, past it 413 (Vault's max_request_size; default 32 MiB;"
            " env KEYCELL_MAX_REQUEST_SIZE).",
        ),
    ] = None,
    tls_cert_file: Annotated[
        str | None,
        typer.Option(envvar="KEYCELL_TLS_CERT_FILE", help="PEM certificate (chain) the listener serves."),
    ] = None,
    tls_key_file: Annotated[
        str | None, typer.Option(envvar="KEYCELL_TLS_KEY_FILE", help="PEM private key of --tls-cert-file.")
    ] = None,
    tls_client_ca_file: Annotated[
        str | None,
        typer.Option(
            envvar="KEYCELL_TLS_CLIENT_CA_FILE",
            help="PEM CA bundle: clients must present a certificate it signed (mutual TLS).",
        ),
    ] = None,
    tls_disable: Annotated[
        bool,
        typer.Option(
            help="Plain HTTP off loopback: only behind a proxy that terminates TLS (Cloud Run, a load balancer)."
        ),
    ] = False,
) -> None:
    """Serve the regional API (Vault's HTTP API) on this machine."""
    import shutil
    import signal
    import tempfile

    from keycell.control_plane.seal import MIN_CHOSEN_ROOT_TOKEN, chosen_root_token_ok
    from keycell.functions.wiring import dev_environment
    from keycell.relay.tls import is_loopback
    from keycell.server import ServerTLS, TLSFilesError, serve

    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit():
        raise _fail(f"--listen takes HOST:PORT, not {listen!r}")
    if (dev_root_token or dev_root_token_id) and not dev:
        flag = "--dev-root-token" if dev_root_token else "-dev-root-token-id"
        raise _fail(f"{flag} chooses a development server's root token: it needs --dev")
    if dev_root_token and dev_root_token_id:
        raise _fail("pass one of --dev-root-token and -dev-root-token-id")
    root_token = dev_root_token or dev_root_token_id
    if dev_root_token is not None and not chosen_root_token_ok(dev_root_token):
        raise _fail(
            f"--dev-root-token must be at least {MIN_CHOSEN_ROOT_TOKEN} printable characters without"
            " spaces (Vault's -dev-root-token-id=... takes a shorter one in dev mode)"
        )
    if dev_root_token_id is not None and not chosen_root_token_ok(dev_root_token_id, short_ok=True):
        raise _fail("-dev-root-token-id must be printable characters without spaces")
    tls: ServerTLS | None = None
    if tls_cert_file or tls_key_file or tls_client_ca_file:
        if tls_disable:
            raise _fail("--tls-disable contradicts --tls-cert-file/--tls-key-file/--tls-client-ca-file")
        if not (tls_cert_file and tls_key_file):
            raise _fail("TLS needs both --tls-cert-file and --tls-key-file")
        try:
            tls = ServerTLS.load(tls_cert_file, tls_key_file, tls_client_ca_file)
        except TLSFilesError as exc:
            raise _fail(str(exc)) from None
    elif not is_loopback(host) and not tls_disable:
        raise _fail(
            f"--listen {listen} would carry tokens in cleartext off this host: pass --tls-cert-file and"
            " --tls-key-file, or --tls-disable when a proxy in front terminates TLS"
        )
    if max_request_size is not None:
        os.environ["KEYCELL_MAX_REQUEST_SIZE"] = str(max_request_size)
    throwaway: str | None = None
    if dev:
        if dev_root_token_id is not None and len(dev_root_token_id) < MIN_CHOSEN_ROOT_TOKEN:
            errors.print(
                f"[bold yellow]warning:[/] the root token {dev_root_token_id!r} is short and guessable;"
                " accepted only because this is a development server"
            )
        folder = data_dir or tempfile.mkdtemp(prefix="keycell-dev-")
        throwaway = None if data_dir else folder
        os.environ.update(dev_environment(folder))
        from keycell.functions.wiring import services_from_environment

        services = services_from_environment()
        result = services.seal.init(
            1, 1, root_token=root_token, short_root_token_ok=dev_root_token_id is not None
        )
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
        private_dir(data_dir)
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

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM, then raises it again once its own handler
    # is gone: this handler turns that into an exit that runs the clean-up below.
    signal.signal(signal.SIGTERM, stop)
    try:
        serve(host, int(port_text), workers=workers, tls=tls)
    finally:
        if throwaway is not None:  # --dev without --data-dir: its folder goes with it
            shutil.rmtree(throwaway, ignore_errors=True)


app.command("relay")(cli_relay.relay)
app.command("revoke")(cli_relay.revoke)
from keycell.cli_breach import breach as breach_command  # noqa: E402 - issue 13

app.command("breach")(breach_command)

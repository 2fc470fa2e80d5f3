"""`keycell rotate`: rotate every secret under a prefix through a cell's API, with a
progress bar, resuming where a previous run stopped, and a JSON report with --json.

Each secret is rotated under the token `<run id>-<hash of its name>`. The run id and
the names already done are kept in a state file (default: .keycell-rotate-<hash of
address and prefix>.json in the current folder); running the same command again
resumes: finished names are skipped, and a rotation cut off mid-way is finished
under its own token by the cell, never repeated. `--new-run` starts over.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.progress import Progress

from keycell.control_plane.private_files import write_private

errors = Console(stderr=True)


def _call(
    address: str, token: str, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - the operator's own address
        f"{address.rstrip('/')}/v1/{path}",
        data=data,
        method=method,
        headers={"X-Vault-Token": token, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:  # noqa: S310
            raw = reply.read()
    except urllib.error.HTTPError as exc:
        try:
            message = "; ".join(json.loads(exc.read()).get("errors") or []) or exc.reason
        except ValueError:
            message = exc.reason
        raise RuntimeError(f"{exc.code}: {message}") from None
    return json.loads(raw) if raw else {}


def rotate(
    prefix: Annotated[str, typer.Option("--prefix", help="Rotate every secret whose name starts with this.")],
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Rotations in flight at once.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
    address: Annotated[
        str, typer.Option(envvar="VAULT_ADDR", help="The cell's API address.")
    ] = "http://127.0.0.1:8200",
    token: Annotated[
        str, typer.Option(envvar="VAULT_TOKEN", help="A token allowed to rotate.", show_default=False)
    ] = "",
    state_file: Annotated[Path | None, typer.Option(help="Where progress is kept (resume).")] = None,
    new_run: Annotated[
        bool, typer.Option("--new-run", help="Forget a previous run and rotate everything again.")
    ] = False,
) -> None:
    """Rotate secrets in bulk; re-run the same command to resume."""
    if not token:
        errors.print("[bold red]error:[/] a token is required (--token or VAULT_TOKEN)")
        raise typer.Exit(2)
    key = hashlib.sha256(f"{address}\x00{prefix}".encode()).hexdigest()[:12]
    path = state_file or Path(f".keycell-rotate-{key}.json")
    state: dict[str, Any] = {}
    if path.exists() and not new_run:
        state = json.loads(path.read_text())
    if not state:
        state = {"run": "bulk-" + secrets.token_hex(6), "prefix": prefix, "done": {}}
    try:
        names = _call(address, token, "LIST", f"rotation/secrets/{quote(prefix)}")["data"]["keys"]
    except RuntimeError as exc:
        if str(exc).startswith("404"):
            names = []
        else:
            errors.print(f"[bold red]error:[/] listing {prefix!r}: {exc}")
            raise typer.Exit(1) from None
    todo = [n for n in names if n not in state["done"]]
    failed: dict[str, str] = {}
    started = time.monotonic()

    def save() -> None:
        write_private(path, json.dumps(state).encode())

    def one(name: str) -> tuple[str, dict[str, Any]]:
        tok = f"{state['run']}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
        return name, _call(address, token, "POST", f"rotation/rotate/{quote(name)}", {"token": tok})["data"]

    with Progress(console=errors, disable=as_json) as progress:
        task = progress.add_task(f"rotating {prefix}*", total=len(names), completed=len(names) - len(todo))
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = {pool.submit(one, name): name for name in todo}
            for future in as_completed(futures):
                name = futures[future]
                try:
                    _, result = future.result()
                    state["done"][name] = result["outcome"]
                    save()
                except RuntimeError as exc:
                    failed[name] = str(exc)
                progress.advance(task)
    report = {
        "prefix": prefix,
        "run": state["run"],
        "secrets": len(names),
        "rotated_now": len(todo) - len(failed),
        "skipped_done_before": len(names) - len(todo),
        "failed": failed,
        "seconds": round(time.monotonic() - started, 3),
        "state_file": str(path),
    }
    if as_json:
        typer.echo(json.dumps(report))
    else:
        errors.print(
            f"rotated {report['rotated_now']}, skipped {report['skipped_done_before']}, failed {len(failed)}"
        )
    if failed:
        raise typer.Exit(1)

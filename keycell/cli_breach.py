"""`keycell breach`: the breach runbook as a command (logic in keycell/breach.py).

    keycell breach --prefix auth/token/create --cell us=http://127.0.0.1:8200 \\
                   --cell eu=http://127.0.0.1:8300 --rotate-prefix payments/ [--dry-run] [--yes] [--json]

Revokes first (one revocation per credential found under the prefix in every cell, all
through the `--via` cell, gossiped everywhere by the relays and sent straight to every
other cell's API it can reach, breach.DirectFanout; `--tombstone` first revokes the
prefix itself), then
rotates the secrets under `--rotate-prefix`. Asks before changing anything unless
`--yes`; re-running the same command resumes from its state file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from keycell.breach import Api, BreachError, Outcome, State, default_state_file, discover, exposure
from keycell.breach import report as make_report
from keycell.breach import revoke as revoke_all
from keycell.breach import rotate as rotate_all

errors = Console(stderr=True)


def _progress(disable: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        disable=disable,
    )


def _cells(given: list[str], address: str) -> dict[str, str]:
    if not given:
        return {"local": address}
    cells: dict[str, str] = {}
    for item in given:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise BreachError(f"--cell takes NAME=http://HOST:PORT, not {item!r}")
        cells[name] = url.rstrip("/")
    return cells


def breach(
    prefix: Annotated[
        list[str], typer.Option(help="Revoke every lease (token or credential) under this path; repeatable.")
    ],
    cell: Annotated[
        list[str] | None, typer.Option("--cell", help="NAME=URL of a cell's API; repeat for every cell.")
    ] = None,
    via: Annotated[
        str | None, typer.Option(help="The cell whose API takes the revocations (default: the first).")
    ] = None,
    rotate_prefix: Annotated[
        str, typer.Option(help="Then rotate every rotated secret whose name starts with this.")
    ] = "",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report on standard output.")] = False,
    state_file: Annotated[Path | None, typer.Option(help="Where progress is kept (resume).")] = None,
    tombstone: Annotated[
        bool,
        typer.Option(
            "--tombstone",
            help="First revoke the prefix itself: leases nobody found, and every lease issued under it later.",
        ),
    ] = False,
    new_run: Annotated[bool, typer.Option("--new-run", help="Forget a previous run's progress.")] = False,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="Calls in flight at once.")] = 8,
    address: Annotated[
        str, typer.Option(envvar="VAULT_ADDR", help="The API when no --cell is given.")
    ] = "http://127.0.0.1:8200",
    token: Annotated[
        str,
        typer.Option(envvar="VAULT_TOKEN", help="A token with sudo on sys/revocations.", show_default=False),
    ] = "",
) -> None:
    """Breach runbook: revoke everything under a prefix in every cell, then rotate."""
    if not token:
        errors.print("[bold red]error:[/] a token is required (--token or VAULT_TOKEN)")
        raise typer.Exit(2)
    try:
        cells = _cells(cell or [], address)
        api = Api(token)
        with _progress(as_json) as bars:
            task = bars.add_task("finding credentials", total=None)
            plan = discover(
                api,
                cells,
                prefix,
                via=via,
                rotate_prefix=rotate_prefix,
                concurrency=concurrency,
                progress=lambda n: bars.advance(task, n),
            )
            bars.update(task, total=len(plan.credentials), completed=len(plan.credentials))
        path = state_file or default_state_file(cells, plan.prefix)
        if new_run:
            path.unlink(missing_ok=True)
        state = State(None if dry_run else path, plan.prefix)
    except BreachError as exc:
        errors.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    summary = plan.summary()
    done = len(state.data["revoked"])
    for name, why in plan.unreachable.items():
        errors.print(
            f"[bold yellow]warning:[/] cell {name} is not reachable ({why}); its leases are not listed "
            "(--tombstone covers them); run the breach again once it answers"
        )
    if dry_run:
        if as_json:
            typer.echo(json.dumps({**summary, "dry_run": True}))
        else:
            errors.print(
                f"dry run: would revoke {len(plan.credentials)} credentials under {plan.prefix}/ "
                f"({summary['credentials_per_cell']}) through {plan.via}, then rotate "
                f"{sum(summary['secrets_to_rotate'].values())} secrets; nothing changed"
            )
        return
    if not yes:
        resumed = f" (resuming: {done} revoked before)" if state.resumed else ""
        question = (
            f"Revoke {len(plan.credentials)} credentials under {plan.prefix}/ in {len(cells)} cell(s){resumed} "
            f"and rotate {sum(summary['secrets_to_rotate'].values())} secrets?"
        )
        if not typer.confirm(question, default=False, err=True):
            errors.print("aborted: nothing revoked, nothing rotated")
            raise typer.Exit(1)
    outcome = Outcome()
    try:
        with _progress(as_json) as bars:
            task = bars.add_task("revoking", total=len(plan.credentials))
            revoke_all(
                api,
                plan,
                state,
                outcome,
                concurrency=concurrency,
                progress=lambda n: bars.advance(task, n),
                tombstone=tombstone,
            )
            total = sum(len(n) for n in plan.rotations.values())
            task = bars.add_task("rotating", total=total)
            rotate_all(api, plan, state, outcome, progress=lambda n: bars.advance(task, n))
        figures, _ = exposure(api, plan, state, concurrency=concurrency)
    except BreachError as exc:
        state.save()
        errors.print(f"[bold red]error:[/] {exc}; progress kept in {path}: run the same command to resume")
        raise typer.Exit(1) from None
    result = make_report(plan, state, outcome, figures)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        errors.print(
            f"revoked {outcome.revoked_now} (before: {outcome.revoked_before}), rotated {outcome.rotated_now} "
            f"(before: {outcome.rotated_before}), failed {len(outcome.failed)}; state in {path}"
        )
        for name, fig in figures.items():
            errors.print(
                f"  {name}: holds {fig['revocations_held']}/{fig['of']} revocations, exposure "
                f"p50 {fig['p50_s']}s p99 {fig['p99_s']}s max {fig['max_s']}s"
            )
    if plan.unreachable:
        errors.print(f"[bold yellow]incomplete:[/] not reached: {', '.join(plan.unreachable)}")
    if outcome.failed or plan.unreachable:
        raise typer.Exit(1)

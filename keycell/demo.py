"""`make demo`: Keycell's main job on the embedded defaults.

Today that is a cell's ledger under contention: several processes increment one
counter through compare-and-set on the same SQLite file, and the demo checks that
no increment was lost, that a conflicting transaction writes nothing, and that bad
input is refused with a clear error. The three-cell breach runbook replaces this
as the regional API, relay and rotation land.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.ledger import (
    MAX_ITEM_BYTES,
    ConflictError,
    InvalidItemError,
    Key,
    Kind,
    Put,
    TransactionConflictError,
)

COUNTER = Key(Kind.ROTATION, "demo/counter")


def _increment(args: tuple[str, int, int]) -> int:
    """Add one to the counter `times` times; returns how many CAS attempts lost."""
    path, times, start_at = args
    ledger = SqliteLedger(path)
    conflicts = 0
    while time.monotonic_ns() < start_at:  # every process starts at the same instant
        time.sleep(0.001)
    try:
        for _ in range(times):
            while True:
                item = ledger.get(COUNTER)
                version, value = (0, 0) if item is None else (item.version, int(item.value))
                try:
                    ledger.put_if(COUNTER, str(value + 1).encode(), version)
                    break
                except ConflictError:
                    conflicts += 1
    finally:
        ledger.close()
    return conflicts


def run_demo(console: Console, *, workdir: str | None, writers: int, increments: int) -> bool:
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="keycell-demo-"))
    path = folder / "us-east-1.db"
    path.unlink(missing_ok=True)
    ledger = SqliteLedger(path)
    console.rule("[bold]Keycell demo: one cell's conditional-write ledger")
    console.print(f"cell us-east-1, ledger sqlite://{path}")
    checks: list[tuple[str, bool, str]] = []

    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        start_at = time.monotonic_ns() + 3_000_000_000  # after every process has spawned
        conflicts = sum(pool.map(_increment, [(str(path), increments, start_at)] * writers))
    elapsed = (time.monotonic_ns() - start_at) / 1e9
    final = ledger.get(COUNTER)
    expected = writers * increments
    counted = 0 if final is None else int(final.value)
    checks.append(
        (
            f"{writers} processes x {increments} CAS increments",
            counted == expected and final is not None and final.version == expected,
            f"counter {counted}/{expected}, {conflicts} lost races retried, "
            f"{expected / elapsed:.0f} commits/s",
        )
    )

    meta, first = Key(Kind.SECRET_META, "secret/app/db"), Key(Kind.SECRET_VERSION, "secret/app/db#1")
    ledger.transact([Put(meta, b"meta", 0), Put(first, b"ciphertext", 0)])
    try:
        ledger.transact([Put(meta, b"meta v2", 1), Put(first, b"overwrite", 0)])
        refused = False
    except TransactionConflictError:
        refused = True
    unchanged = ledger.get(meta) is not None and ledger.get(meta).version == 1  # type: ignore[union-attr]
    checks.append(("conflicting transaction", refused and unchanged, "refused as a whole, nothing written"))

    try:
        ledger.put_if(Key(Kind.SECRET_META, "secret/huge"), b"x" * MAX_ITEM_BYTES, 0)
        message = "accepted (wrong)"
        refused = False
    except InvalidItemError as exc:
        message, refused = str(exc), True
    checks.append(
        ("oversized item", refused and ledger.get(Key(Kind.SECRET_META, "secret/huge")) is None, message)
    )
    ledger.close()

    table = Table(title="promises")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for name, ok, detail in checks:
        table.add_row(name, "[green]kept[/]" if ok else "[bold red]BROKEN[/]", detail)
    console.print(table)
    ok = all(ok for _, ok, _ in checks)
    console.print("[bold green]all promises kept[/]" if ok else "[bold red]a promise was broken[/]")
    return ok

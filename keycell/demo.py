"""`make demo`: Keycell's main job on the embedded defaults.

Today it shows one cell's storage stack:

1. the ledger under contention: several processes increment one counter through
   compare-and-set on the same SQLite file; no increment may be lost, a conflicting
   transaction writes nothing, bad input is refused with a clear error;
2. the seal and the barrier: the cell is initialized with Shamir shares, refuses a
   wrong combination, unseals with a quorum, stores secrets envelope-encrypted under
   a key-encryption key in a SoftHSM2 token (the software backend, with a loud
   warning, where SoftHSM2 is absent), keeps no plaintext in its file, and refuses
   every read once sealed;
3. the regional API: a self-hosted cell (`keycell server`, two workers) is
   initialized and unsealed over HTTP with Vault's API, a secret is written and
   read, a token limited by an ACL policy is refused outside it, a response-wrapped
   read unwraps exactly once, and a revoked token is refused at once.

It exits non-zero if any promise is broken. The three-cell breach runbook replaces
this as the regional API, relay and rotation land.
"""

from __future__ import annotations

import json
import multiprocessing
import secrets
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.barrier import Barrier, SealedError
from keycell.control_plane.envelope import Envelope, Envelopes
from keycell.control_plane.keys import KeyBackend, KeySpec
from keycell.control_plane.ledger import (
    MAX_ITEM_BYTES,
    ConflictError,
    InvalidItemError,
    Key,
    Kind,
    Put,
    TransactionConflictError,
)
from keycell.control_plane.seal import Seal, UnsealError

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
    checks.extend(_seal_and_barrier(console, folder))
    checks.extend(_regional_api(console, folder))

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


def _key_backend(console: Console, stack: ExitStack) -> KeyBackend:
    """A SoftHSM2 token when SoftHSM2 is installed, else the software backend, loudly."""
    try:
        from keycell.adapters.keys.pkcs11 import Pkcs11KeyBackend
        from keycell.testing.softhsm import SoftHsmMissingError, softhsm_token

        token = stack.enter_context(softhsm_token(label="demo-us-east-1"))
        backend: KeyBackend = Pkcs11KeyBackend(token.module, token.label, token.pin)
        console.print(f"key-encryption key in a SoftHSM2 token ({token.module})")
    except (ImportError, SoftHsmMissingError):
        from keycell.adapters.keys.software import BANNER, SoftwareKeyBackend

        backend = SoftwareKeyBackend()
        console.print(f"[bold red on yellow] {BANNER} [/] (install softhsm2 for a real token)")
    stack.callback(backend.close)
    return backend


def _seal_and_barrier(console: Console, folder: Path) -> list[tuple[str, bool, str]]:
    console.rule("[bold]seal, barrier, envelope encryption")
    checks: list[tuple[str, bool, str]] = []
    path = folder / "us-east-1-sealed.db"
    path.unlink(missing_ok=True)
    ledger = SqliteLedger(path)
    barrier = Barrier(ledger)
    seal = Seal(ledger, barrier)
    init = seal.init(5, 3)
    console.print(
        f"initialized: {len(init.shares)} shares, {init.threshold} to unseal (shown once, not printed here)"
    )

    other = SqliteLedger(folder / "other-cell.db")
    foreign = Seal(other, Barrier(other)).init(3, 2)
    other.close()
    seal.unseal(init.shares_hex[0])
    seal.unseal(foreign.shares_hex[1])
    try:
        seal.unseal(init.shares_base64[2])
        wrong_refused = False
    except UnsealError:
        wrong_refused = seal.status().sealed
    checks.append(("a wrong share combination", wrong_refused, "refused, progress reset, still sealed"))

    for share in [init.shares_hex[0], init.shares_base64[2], init.shares_hex[4]]:
        status = seal.unseal(share)
    checks.append(("unseal with 3 of 5 shares (hex and base64)", not status.sealed, "barrier open"))

    with ExitStack() as stack:
        backend = _key_backend(console, stack)
        backend.create_key("cell-kek", KeySpec.AES_256)
        envelopes = Envelopes("us-east-1", backend, "cell-kek")
        barrier.on_seal(envelopes.cache.clear)
        values = {f"secret/payments/db-{n:03d}": f"pw-{secrets.token_hex(12)}".encode() for n in range(100)}
        for path_name, value in values.items():
            key = Key(Kind.SECRET_VERSION, f"{path_name}#1")
            barrier.put_if(key, envelopes.seal(value, str(key).encode()).to_bytes(), 0)
        raw = b"".join(f.read_bytes() for f in folder.glob("us-east-1-sealed.db*"))
        leaked = sum(value in raw for value in values.values())
        checks.append(
            ("100 secrets envelope-encrypted", leaked == 0, f"{leaked} plaintext values in the raw file")
        )

        sample = Key(Kind.SECRET_VERSION, "secret/payments/db-007#1")
        opened = envelopes.open(Envelope.from_bytes(barrier.get(sample).value), str(sample).encode())  # type: ignore[union-attr]
        checks.append(
            ("read back through barrier and HSM", opened == values["secret/payments/db-007"], "matches")
        )

        seal.seal()
        message = "a sealed cell answered a read"
        try:
            barrier.get(sample)
            sealed_refused = False
        except SealedError as exc:
            sealed_refused, message = True, str(exc)
        checks.append(("sealed cell refuses reads", sealed_refused and len(envelopes.cache) == 0, message))
    ledger.close()
    return checks


def _vault(
    url: str, method: str, path: str, body: dict[str, object] | None = None, token: str = ""
) -> tuple[int, dict[str, Any]]:
    """One call to the regional API, as any Vault client makes it."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/v1/{path}", data=data, method=method)  # noqa: S310 - loopback
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("X-Vault-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            raw = answer.read()
            return answer.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else {}


def _regional_api(console: Console, folder: Path) -> list[tuple[str, bool, str]]:
    from keycell.testing.processes import keycell_server

    console.rule("[bold]regional API (Vault's HTTP API), self-hosted")
    checks: list[tuple[str, bool, str]] = []
    data_dir = folder / "api-cell"
    server = keycell_server(data_dir, workers=2)
    url = f"http://127.0.0.1:{server.start()}"
    try:
        console.print(f"keycell server at {url} (2 workers)")
        _, init = _vault(url, "PUT", "sys/init", {"secret_shares": 5, "secret_threshold": 3})
        for key in init["keys"][:3]:
            _, status = _vault(url, "PUT", "sys/unseal", {"key": key})
        root = init["root_token"]
        checks.append(("init and unseal over HTTP", status.get("sealed") is False, "3 of 5 shares"))

        code, _ = _vault(url, "POST", "secret/data/payments/db", {"data": {"password": "pw-demo"}}, root)
        code_read, read = _vault(url, "GET", "secret/data/payments/db", token=root)
        ok = code == 200 and read.get("data", {}).get("data") == {"password": "pw-demo"}
        checks.append(("KV v2 write and read", ok, f"HTTP {code}/{code_read}"))

        _vault(
            url,
            "PUT",
            "sys/policies/acl/payments-read",
            {"policy": 'path "secret/data/payments/*" { capabilities = ["read"] }'},
            root,
        )
        _, created = _vault(
            url, "POST", "auth/token/create", {"policies": ["payments-read"], "ttl": "1h"}, root
        )
        reader = created["auth"]["client_token"]
        allowed, _ = _vault(url, "GET", "secret/data/payments/db", token=reader)
        denied, _ = _vault(url, "POST", "secret/data/payments/db", {"data": {"password": "x"}}, reader)
        checks.append(("ACL policy", allowed == 200 and denied == 403, f"read {allowed}, write {denied}"))

        request = urllib.request.Request(f"{url}/v1/secret/data/payments/db", method="GET")  # noqa: S310
        request.add_header("X-Vault-Token", root)
        request.add_header("X-Vault-Wrap-TTL", "60s")
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            wrapped = json.loads(answer.read())["wrap_info"]["token"]
        first, _ = _vault(url, "POST", "sys/wrapping/unwrap", {"token": wrapped})
        second, _ = _vault(url, "POST", "sys/wrapping/unwrap", {"token": wrapped})
        checks.append(
            ("response wrapping is single-use", first == 200 and second == 400, f"{first}, then {second}")
        )

        _vault(url, "POST", "auth/token/revoke", {"token": reader}, root)
        after, _ = _vault(url, "GET", "secret/data/payments/db", token=reader)
        checks.append(("revoked token refused", after == 403, f"HTTP {after}"))
    finally:
        server.stop()
    return checks

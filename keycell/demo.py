"""`make demo`: three cells on loopback, a breach, two partitions, and the promises
Keycell keeps.

1. Three cells (us-east-1, eu-west-1, ap-southeast-1), each a self-hosted regional API
   (`keycell server`, its own process) over its own SQLite ledger, keys in a SoftHSM2
   token per cell when SoftHSM2 is installed (else the software backend, with a loud
   non-FIPS banner), and its revocation relay. The relays run in this process, each
   on its own loopback gRPC port (every message between cells crosses a real socket),
   so the demo can cut one cell off with the relays' fault injection. The servers run
   the direct revocation path and the freshness heartbeats (KEYCELL_PEER_TOKEN,
   keycell/cells/paths.py); the other cells reach a cell's API through its `Gate`, a
   forwarder on its own port (the cell's address in the cell directory), which the
   demo closes to cut the cell's API off from the others.
2. Workloads get credentials: a `keycell agent` per cell (attested with a join token)
   serves the SPIFFE Workload API on a unix socket; this process, attested by its uid
   and executable, fetches JWT-SVIDs for spiffe://example.org/payments/api and trades
   them at auth/jwt/login for N tokens (policy `payments-read`) spread over the
   cells (`agents=False`, or an agent that does not start: tokens from
   auth/token/create instead, said loudly). A few reader workloads with their own
   tokens (create-orphan, another lease prefix, `on_stale=serve`) read their cell's
   secret throughout.
3. Phase a, relays cut, APIs reachable: every token under auth/jwt/login is presumed
   stolen; the relay mesh to ap-southeast-1 is cut, and the breach runbook
   (keycell/breach.py, as `keycell breach` runs it) revokes the prefix and every token
   through us-east-1 (one revocation per token, each with its own exposure window),
   then rotates the `payments/` secrets in every cell. The direct path carries every
   revocation to every cell within 1 s; the relays heal.
4. Phase b, ap-southeast-1 fully cut off (relays and its API): `payments` tokens
   (bound 1 s, on_stale=refuse) issued in every cell are stolen and revoked through
   us-east-1. No path reaches ap-southeast-1, but its view of the other cells goes
   stale, so after the bound it refuses them (503) while its readers keep reading;
   after the heal every cell holds every revocation.
5. Throughout both phases an attacker tries the stolen tokens in every cell. The
   summary: exposure windows per cell and phase from sys/revocations/:id, stolen
   tokens usable more than 1 s after their revoke call (must be 0), reads served and
   failed in the cut-off cell, secrets rotated, each stolen token tried against every
   cell at the end (must be refused everywhere), and a self-contained HTML report with
   both phases' propagation charts. Exits non-zero if any promise is broken.
"""

from __future__ import annotations

import asyncio
import html
import http.client
import json
import math
import os
import random
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keycell.breach import Api, Credential, Outcome, Plan, State, discover, exposure, report, revoke, rotate
from keycell.cells.paths import FROM_CELL_HEADER
from keycell.control_plane.private_files import private_dir

CELLS = ("us-east-1", "eu-west-1", "ap-southeast-1")
PARTITIONED = "ap-southeast-1"
VIA = "us-east-1"
TOKEN_PREFIX = "auth/token/create"  # noqa: S105 - a path, not a password
SPIFFE_PREFIX = "auth/jwt/login"
AUDIENCE = "keycell"
WORKLOAD_ID = "spiffe://example.org/payments/api"
ROTATE_PREFIX = "payments/"
POLICY = (
    'path "secret/data/payments/*" { capabilities = ["read"] }\n'
    'path "database/creds/payments" { capabilities = ["read"] }'
)
DB_PREFIX = "database/creds/payments"
BOUND = 1.0  # seconds: the payments tokens' max_revocation_staleness, and the promise's bound
ON_STALE = "refuse"  # see PHASE_B in run_demo: the only mode that refuses the cut-off cell's own
READERS_BOUND = {"max_revocation_staleness": BOUND, "on_stale": "serve"}
CREATE_USER = ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"]
T = TypeVar("T")
Check = tuple[str, bool, str]


@dataclass
class Issued:
    cell: str
    token: str = field(repr=False)
    accessor: str = ""
    lease_id: str = ""


@dataclass
class DbCredential:
    cell: str
    lease_id: str
    username: str
    password: str = field(repr=False)


class Readers:
    """Reader workloads: each reads its cell's secret with its own token until stopped
    (bounded by `limit` seconds), counting, per cell URL, the reads served (200) and the
    answers that were not a 200; `snapshot()` gives the counts so far, so a phase can
    report what was served while a cell was cut off."""

    def __init__(self, api: Api, targets: list[tuple[str, str, str]], limit: float) -> None:
        self.api = api
        self.targets = targets  # (cell url, token, secret path)
        self.limit = limit
        self.ok = 0
        self.failed: list[str] = []
        self.counts: dict[str, dict[str, int]] = {url: {"served": 0, "failed": 0} for url, _, _ in targets}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in targets]

    def _run(self, target: tuple[str, str, str]) -> None:
        url, token, path = target
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                status, _ = self.api.call(url, "GET", f"secret/data/{path}", token=token)
                reason = "" if status == 200 else f"HTTP {status}"
            except Exception as exc:
                reason = type(exc).__name__
            with self.lock:
                if reason:
                    self.failed.append(f"{url} {path}: {reason}")
                    self.counts[url]["failed"] += 1
                else:
                    self.ok += 1
                    self.counts[url]["served"] += 1
            self.stop.wait(0.02)

    def snapshot(self, url: str) -> dict[str, int]:
        with self.lock:
            return dict(self.counts[url])

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def _since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


class Prober:
    """The attacker: tries every stolen token against every cell's API (GET
    auth/token/lookup-self), round after round, until stopped (bounded by `limit`
    seconds and `max_tries`), keeping when each try was sent (wall clock, as the revoke
    calls' times are) and the answer (0: no answer). `late(...)` then says which were
    accepted more than the bound after their revoke call."""

    def __init__(
        self, api: Api, urls: dict[str, str], stolen: list[Issued], limit: float, max_tries: int = 300_000
    ) -> None:
        self.api, self.urls, self.stolen = api, urls, stolen
        self.limit, self.max_tries = limit, max_tries
        self.tries: list[tuple[int, str, float, int]] = []  # (index in stolen, cell, sent at, status)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        pairs = [(i, c) for i in range(len(stolen)) for c in urls]
        self.threads = [
            threading.Thread(target=self._run, args=(pairs[n::2],), daemon=True)
            for n in range(2)
            if pairs[n::2]
        ]

    def _run(self, pairs: list[tuple[int, str]]) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            for i, cell in pairs:
                sent = time.time()
                try:
                    status = self.api.call(
                        self.urls[cell], "GET", "auth/token/lookup-self", token=self.stolen[i].token
                    )[0]
                except Exception:
                    status = 0
                with self.lock:
                    if len(self.tries) >= self.max_tries:
                        return
                    self.tries.append((i, cell, sent, status))
            self.stop.wait(0.05)

    def start(self) -> Prober:
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def late(self, called_at: list[float | None], bound: float) -> dict[str, dict[str, Any]]:
        """Per cell: tries, answers by status, tokens accepted more than `bound` seconds
        after their revoke call (`called_at[i]`; None: never revoked, every acceptance
        counts), and the latest acceptance after a revoke call (ms; None if none)."""
        result: dict[str, dict[str, Any]] = {
            c: {"tries": 0, "answers": {}, "late": 0, "last_accepted_ms": None} for c in self.urls
        }
        late: dict[str, set[int]] = {c: set() for c in self.urls}
        with self.lock:
            tries = list(self.tries)
        for i, cell, sent, status in tries:
            fig = result[cell]
            fig["tries"] += 1
            fig["answers"][str(status)] = fig["answers"].get(str(status), 0) + 1
            called = called_at[i]
            if status != 200 or (called is not None and sent < called):
                continue
            after = math.inf if called is None else sent - called
            if after > bound:
                late[cell].add(i)
            if called is not None:
                ms = round(after * 1000)
                fig["last_accepted_ms"] = max(fig["last_accepted_ms"] or 0, ms)
        for cell, found in late.items():
            result[cell]["late"] = len(found)
        return result


class Gate:
    """A cell's regional address as the other cells (and the operator's runbook) reach
    it: an HTTP forwarder on its own loopback port in front of the cell's API, named as
    the cell's `api` in the cell directory. While a cell is in `isolated`, a request to
    its gate, or one it sends to another cell's gate (X-Keycell-From-Cell names it), is
    closed unanswered, as a dropped link looks to the caller. Workloads in the cell's
    own region call its API directly and never pass a gate."""

    HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length", "host"))

    def __init__(self, cell: str, upstream: str, isolated: set[str]) -> None:
        self.cell, self.isolated = cell, isolated
        port = int(upstream.rsplit(":", 1)[1])
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # the head and the body leave in two sends: without TCP_NODELAY the body waits
            # for the caller's delayed ACK of the head (tens of milliseconds per call)
            disable_nagle_algorithm = True
            upstream_conn: http.client.HTTPConnection | None = None

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else None
                if gate.cut(self.headers.get(FROM_CELL_HEADER, "")):
                    self.close_connection = True  # cut: the caller sees a dropped connection
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in gate.HOP}
                if self.upstream_conn is None:
                    self.upstream_conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                try:
                    self.upstream_conn.request(self.command, self.path, body=raw, headers=headers)
                    answer = self.upstream_conn.getresponse()
                    data = answer.read()
                except (OSError, http.client.HTTPException):
                    self.upstream_conn.close()
                    self.upstream_conn = None
                    self.close_connection = True
                    return
                try:
                    self.send_response(answer.status)
                    for name, value in answer.getheaders():
                        if name.lower() not in gate.HOP:
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the caller gave up waiting (its timeout): nothing to answer
                    self.close_connection = True

            def finish(self) -> None:
                if self.upstream_conn is not None:
                    self.upstream_conn.close()
                super().finish()

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name=f"gate-{cell}", daemon=True).start()

    def cut(self, caller: str) -> bool:
        return self.cell in self.isolated or caller in self.isolated

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ThreeCells:
    """The cells: API server processes, each behind its Gate, and the relays on a
    background event loop.

    The cells share one root token, chosen here for this run (as keycell/cells/mesh.py's
    dev cells do): KEYCELL_PEER_TOKEN names a single token that every peer must accept
    on sys/revocations/apply, and only a root token's value can be chosen."""

    def __init__(self, folder: Path, console: Console, stack: ExitStack) -> None:
        self.folder = folder
        self.console = console
        self.stack = stack
        self.urls: dict[str, str] = {}  # in-region: the API server itself
        self.gates: dict[str, Gate] = {}  # cross-region: what the other cells call
        self.isolated: set[str] = set()  # cells whose API the gates cut off from the others
        self.token = "kc.demo-" + secrets.token_urlsafe(24)
        self.api = Api(self.token, timeout=5)  # the demo's own short looks (freshness)
        self.backend = "software"
        self.relays: dict[str, Any] = {}
        self.services: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="demo-relays", daemon=True)
        from keycell.relay.faults import Faults

        self.faults = Faults(rng=random.Random(13))  # noqa: S311 - fault injection, not a secret

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _softhsm(self) -> dict[str, dict[str, str]] | None:
        """One SoftHSM2 token per cell in one token folder, or None without SoftHSM2."""
        import subprocess

        from keycell.testing.softhsm import SoftHsmMissingError, find_module, find_util

        try:
            module, util = find_module(), find_util()
        except SoftHsmMissingError:
            return None
        directory = self.folder / "softhsm"
        private_dir(directory / "tokens")  # the cells' SoftHSM2 tokens: their KEKs
        conf = directory / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)  # this process's relays open the same tokens
        envs = {}
        for cell in CELLS:
            pin = secrets.token_hex(8)
            subprocess.run(  # noqa: S603 - fixed binary, arguments we built
                [
                    util,
                    "--init-token",
                    "--free",
                    "--label",
                    f"kc-{cell}",
                    "--pin",
                    pin,
                    "--so-pin",
                    pin + "so",
                ],
                env={**os.environ, "SOFTHSM2_CONF": str(conf)},
                capture_output=True,
                check=True,
                timeout=60,
            )
            envs[cell] = {
                "SOFTHSM2_CONF": str(conf),
                "KEYCELL_KEY_BACKEND": "pkcs11",
                "KEYCELL_PKCS11_MODULE": module,
                "KEYCELL_PKCS11_TOKEN": f"kc-{cell}",
                "KEYCELL_PKCS11_PIN": pin,
            }
        self.console.print(f"keys: one SoftHSM2 token per cell ({module}); KEKs never leave them")
        return envs

    def cell_env(self, cell: str, hsm: dict[str, dict[str, str]] | None) -> dict[str, str]:
        folder = self.folder / cell
        env = {
            "KEYCELL_CELL": cell,
            "KEYCELL_LEDGER": f"sqlite://{folder / 'cell.db'}",
            "KEYCELL_SEAL": "hsm",
        }
        if hsm is None:
            env |= {
                "KEYCELL_KEY_BACKEND": "software",
                "KEYCELL_SOFTWARE_KEYS": f"sqlite://{folder / 'keys.db'}",
            }
        else:
            env |= hsm[cell]
        return env

    def start(self, workers: int, software_keys: bool = False) -> None:
        from keycell.functions.wiring import services_from_environment
        from keycell.testing.processes import free_port, keycell_server

        hsm = None if software_keys else self._softhsm()
        if hsm is None:
            from keycell.adapters.keys.software import BANNER

            self.console.print(f"[bold red on yellow] {BANNER} [/]")
            self.console.print(
                "[bold red]install softhsm2 (apt-get install softhsm2) to keep keys in a token[/]"
            )
        else:
            self.backend = "softhsm2"
        ports = {cell: free_port() for cell in CELLS}
        envs = {cell: self.cell_env(cell, hsm) for cell in CELLS}
        for cell in CELLS:
            private_dir(self.folder / cell)
            # HSM seal: recovery shares, the cell unseals itself through its KEK; initialized
            # from here so that the root token is the run's chosen one (see the class).
            services = services_from_environment(envs[cell])  # reads its settings from envs[cell] only
            services.seal.init(1, 1, root_token=self.token)
            services.after_unseal()
            self.services[cell] = services  # this process's relay sink for the cell
            env = {
                **envs[cell],
                "KEYCELL_RELAY": f"127.0.0.1:{ports[cell]}",
                "KEYCELL_PEER_TOKEN": self.token,
            }
            server = keycell_server(self.folder / cell, workers=workers, env=env)
            self.urls[cell] = f"http://127.0.0.1:{server.start()}"
            self.stack.callback(server.stop)
            gate = self.gates[cell] = Gate(cell, self.urls[cell], self.isolated)
            self.stack.callback(gate.close)
            self.console.print(
                f"cell {cell}: keycell server at {self.urls[cell]} ({workers} workers), "
                f"reached by the other cells at {gate.url}"
            )
        self.thread.start()
        self.stack.callback(self._stop_relays)
        self.run(self._start_relays(ports))
        for cell in CELLS:
            self.console.print(f"cell {cell}: relay at {self.relays[cell].addr}")

    def regional(self, operator_in: str) -> dict[str, str]:
        """The cells' API URLs for an operator working from `operator_in`: that cell's
        own API, the others' gates."""
        return {c: self.urls[c] if c == operator_in else self.gates[c].url for c in CELLS}

    async def _start_relays(self, ports: dict[str, int]) -> None:
        from keycell.cells.agent import attach
        from keycell.relay.cell import LedgerSink
        from keycell.relay.node import Relay
        from keycell.relay.profiles import LOCAL

        seeds: list[str] = []
        for cell in CELLS:
            services = self.services[cell]
            services.ensure_unsealed()
            relay = Relay(
                "",
                cell,
                port=ports[cell],
                profile=LOCAL,
                sink=LedgerSink(services),
                faults=self.faults,
                seeds=seeds[:1],
                rng=random.Random(len(seeds)),  # noqa: S311
            )
            attach(relay, services, api_url=self.gates[cell].url)  # the directory names the gate
            await relay.start()
            self.faults.groups[relay.addr] = cell
            self.relays[cell] = relay
            seeds.append(relay.addr)

    def _stop_relays(self) -> None:
        async def stop_all() -> None:
            await asyncio.gather(*(r.stop() for r in self.relays.values()), return_exceptions=True)

        try:
            self.run(stop_all(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            for relay in self.relays.values():
                if relay.sink is not None:
                    relay.sink.close()

    def members_converged(self) -> bool:
        for relay in self.relays.values():
            if relay.table is None or len(relay.table.live()) < len(CELLS) - 1:
                return False
        return True

    def cut_relays(self, cell: str) -> None:
        """Phase a: the relay mesh between `cell` and the others is cut (fault injection)."""
        for other in CELLS:
            if other != cell:
                self.faults.partition(cell, other)

    def cut_off(self, cell: str) -> None:
        """Phase b: the relays, and `cell`'s API to and from the other cells (its gate)."""
        self.cut_relays(cell)
        self.isolated.add(cell)

    def heal(self) -> None:
        self.faults.heal()
        self.isolated.clear()

    def freshness(self, cell: str) -> dict[str, Any]:
        """`cell`'s GET sys/revocations/freshness (its view of every peer), {} if it fails."""
        try:
            status, answer = Api(self.token, timeout=5).call(
                self.urls[cell], "GET", "sys/revocations/freshness"
            )
        except Exception:
            return {}
        return answer.get("data", {}) if status == 200 else {}

    def fresh(self) -> bool:
        """Every cell's view of every peer is well within the bound."""
        for cell in CELLS:
            peers = self.freshness(cell).get("peers", {})
            if len(peers) < len(CELLS) - 1:
                return False
            if any(
                p.get("staleness_seconds") is None or p["staleness_seconds"] > BOUND / 2
                for p in peers.values()
            ):
                return False
        return True


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def _bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def run_demo(
    console: Console,
    *,
    workdir: str | None,
    credentials: int = 1000,
    secrets_per_cell: int = 10,
    partition_seconds: float = 5.0,
    workers: int = 1,
    report_path: str | None = None,
    agents: bool = True,
    databases: bool = True,
    software_keys: bool = False,
) -> bool:
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="keycell-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    console.rule("[bold]Keycell: three cells on loopback")
    checks: list[Check] = []
    with ExitStack() as stack:
        cells = ThreeCells(folder, console, stack)
        cells.start(workers, software_keys)
        api = Api(cells.token)
        joined = wait_for(cells.members_converged, 60)
        checks.append(
            ("three cells, each with its API and relay", joined, f"{cells.backend} keys, sqlite ledgers")
        )
        if not joined:
            return _finish(console, checks, None, folder, report_path)
        pg = _postgres(console, stack) if databases else None
        facts = _setup(console, cells, api, secrets_per_cell, checks, pg)
        sockets: dict[str, str] | None = None
        if agents:
            try:
                sockets = _agents(console, cells, api, stack)
                _fetch_svid(sockets[CELLS[0]])
            except Exception as exc:
                console.print(f"[bold yellow]the agents did not start ({exc}); workloads use plain tokens[/]")
                sockets = None
        checks.append(
            (
                "workloads attest through an agent per cell",
                sockets is not None or not agents,
                "SPIFFE ID " + WORKLOAD_ID + " by uid and executable (SO_PEERCRED)"
                if sockets
                else "not used: plain tokens",
            )
        )
        prefix = SPIFFE_PREFIX if sockets else TOKEN_PREFIX
        db_count = credentials // 2 if pg is not None else 0
        issued = _issue(console, cells, api, credentials - db_count, checks, sockets)
        if facts is None or not issued:
            return _finish(console, checks, None, folder, report_path)
        db = _issue_db(console, cells, api, issued[:db_count], checks, pg) if pg is not None else []
        if pg is not None and not db:
            return _finish(console, checks, None, folder, report_path)
        prefixes = [prefix, DB_PREFIX] if pg is not None else [prefix]
        per_cell = max(2, min(20, credentials // 30))  # stolen tokens per cell the attacker keeps trying

        readers = Readers(api, facts["readers"], limit=600)
        readers.start()
        cut_url = cells.urls[PARTITIONED]

        # --- phase a: the relay mesh to PARTITIONED is cut, every API reachable ----------------
        console.rule(f"[bold red]phase a: everything under {', '.join(prefixes)} is presumed stolen")
        sample = [x for c in CELLS for x in [y for y in issued if y.cell == c][:per_cell]]
        prober_a = Prober(api, cells.urls, sample, limit=600).start()
        reads_before = readers.snapshot(cut_url)
        cells.cut_relays(PARTITIONED)
        partitioned_at = time.monotonic()
        console.print(f"[yellow]{PARTITIONED}'s relays are cut off from the other cells; APIs reachable[/]")
        plan = discover(api, cells.regional(VIA), prefixes, via=VIA, rotate_prefix=ROTATE_PREFIX)
        state = State(folder / "breach-state.json", plan.prefix)
        outcome = Outcome()
        with _bars(console) as bars:
            task = bars.add_task(f"revoking via {VIA}", total=len(plan.credentials))
            revoke(api, plan, state, outcome, progress=lambda n: bars.advance(task, n))
            rot = bars.add_task("rotating payments/*", total=sum(len(n) for n in plan.rotations.values()))
            rotate(api, plan, state, outcome, progress=lambda n: bars.advance(rot, n))
        found = len(plan.credentials)
        checks.append(
            (
                "breach runbook: revoke first, then rotate",
                found == len(issued) + len(db) and outcome.revoked_now == found and not outcome.failed,
                f"{outcome.revoked_now}/{len(issued) + len(db)} credentials revoked (one revocation each; "
                f"{len(db)} database users dropped by their cell first) in {outcome.revoke_seconds:.1f}s, "
                f"{outcome.rotated_now} secrets rotated in {outcome.rotate_seconds:.1f}s, {len(outcome.failed)} failed",
            )
        )
        expected_rotations = secrets_per_cell * len(CELLS)
        checks.append(
            (
                "credentials rotated in every cell",
                outcome.rotated_now == expected_rotations and _rotated(api, cells, facts["before"]),
                f"{outcome.rotated_now}/{expected_rotations} secrets have a new CURRENT version",
            )
        )
        during = _during_partition(api, cells, issued)
        if pg is not None:
            for cell in CELLS:
                mine = [x for x in db if x.cell == cell][:20]
                during[cell]["db_tried"] = len(mine)
                during[cell]["db_accepted"] = sum(1 for x in mine if _pg_login(pg, x))
        time.sleep(max(0.0, partition_seconds - (time.monotonic() - partitioned_at)))
        before_heal, _ = exposure(api, plan, state)
        reads_a = _since(reads_before, readers.snapshot(cut_url))
        cells.heal()
        cut_a = time.monotonic() - partitioned_at
        console.print(f"[green]relays healed after {cut_a:.1f}s[/]")

        held = wait_for(lambda: _held_everywhere(api, plan, state), 90, step=0.5)
        figures, records = exposure(api, plan, state)
        prober_a.finish()
        late_a = prober_a.late(_called_at(sample, plan, outcome), BOUND)
        direct_ok = all(
            f["revocations_held"] == f["of"] and 0 <= f["max_s"] <= BOUND for f in before_heal.values()
        )
        checks.append(
            (
                f"phase a (relays cut, APIs reachable): the direct path revokes in every cell within {BOUND:g} s",
                direct_ok,
                "before the heal: "
                + ", ".join(
                    f"{c} {f['revocations_held']}/{f['of']} held, max {f['max_s'] * 1000:.0f} ms"
                    for c, f in before_heal.items()
                ),
            )
        )
        phase_a = {
            "cut": "relays only (fault injection); every cell's API reachable",
            "partitioned": PARTITIONED,
            "cut_seconds": round(cut_a, 2),
            "revocations": found,
            "exposure_before_heal": before_heal,
            "exposure": figures,
            "first_path": _first_paths(records),
            "stolen_probe": late_a,
            "reads_in_cut_off_cell": reads_a,
            "records": records,
        }

        # --- phase b: PARTITIONED fully cut off: relays and its API --------------------------------
        console.rule(f"[bold red]phase b: {PARTITIONED} fully cut off; payments tokens stolen in every cell")
        phase_b, stolen_b = _phase_b(
            console, cells, api, readers, folder, checks, per_cell, max(partition_seconds, 3 * BOUND)
        )
        readers.finish()
        stolen_late = (
            sum(f["late"] for f in late_a.values())
            + sum(f["late"] for f in phase_b.get("stolen_probe", {}).values())
            + phase_b.get("watched_token", {}).get("late", 0)
        )
        probed = len(sample) + len(stolen_b)
        tries = (
            sum(f["tries"] for f in late_a.values())
            + sum(f["tries"] for f in phase_b.get("stolen_probe", {}).values())
            + phase_b.get("watched_token", {}).get("tries", 0)
        )
        # database users: dropped by their own cell before their revocation, so any login
        # after the revoke calls counts (tried in phase a, once every revoke call returned)
        db_late = sum(d.get("db_accepted", 0) for d in during.values())
        db_tried = sum(d.get("db_tried", 0) for d in during.values())
        checks.append(
            (
                f"stolen credentials usable in any cell more than {BOUND:g} s after the revoke call: 0",
                stolen_late == 0 and db_late == 0 and tries > 0 and bool(phase_b),
                f"{stolen_late + db_late} ({probed} stolen tokens tried in all {len(CELLS)} cells through both "
                f"phases, {tries} tries; latest acceptance after a revoke call: phase a "
                f"{_latest(late_a)}, phase b {_latest(phase_b.get('stolen_probe', {}))}"
                + (f"; {db_tried} stolen database users tried on PostgreSQL after theirs" if db_tried else "")
                + ")",
            )
        )
        checks.append(
            (
                "every cell holds every revocation after the heal",
                held and phase_b.get("held_after_heal", False),
                "phase a: "
                + ", ".join(f"{c} {f['revocations_held']}/{f['of']}" for c, f in figures.items())
                + "; phase b: "
                + ", ".join(
                    f"{c} {f['revocations_held']}/{f['of']}" for c, f in phase_b.get("exposure", {}).items()
                ),
            )
        )
        checks.append(
            (
                "live requests failed",
                not readers.failed and readers.ok > 0,
                f"{len(readers.failed)} failed of {readers.ok + len(readers.failed)} reads by "
                f"{len(readers.threads)} workloads (on_stale=serve) through both phases"
                + (f" (first: {readers.failed[0]})" if readers.failed else ""),
            )
        )
        if pg is not None:
            db_logins, db_leases = _db_everywhere(console, api, cells, db, pg)
            checks.append(
                (
                    "stolen database users refused",
                    db_logins == 0 and db_leases == {400: len(db) * len(CELLS)},
                    f"{len(db)} users: {db_logins} PostgreSQL logins accepted; their leases looked up in "
                    f"every cell: {db_leases} (400: no such live lease)",
                )
            )
        every = issued + stolen_b
        answers = _stolen_everywhere(console, api, cells, every)
        refused = answers.get(403, 0)
        checks.append(
            (
                "stolen tokens refused in every cell",
                refused == len(every) * len(CELLS),
                f"{len(every)} tokens (both phases) x {len(CELLS)} cells: {refused} refused (403), "
                f"{answers.get(200, 0)} accepted, {sum(answers.values()) - refused - answers.get(200, 0)} other answers",
            )
        )
        summary = {
            "cells": cells.urls,
            "gates": {c: g.url for c, g in cells.gates.items()},
            "backend": cells.backend,
            "credentials": len(issued) + len(db),
            "tokens": len(issued),
            "database_users": len(db),
            "partitioned": PARTITIONED,
            "partition_seconds": partition_seconds,
            "bound_seconds": BOUND,
            "on_stale": ON_STALE,
            "during_partition": during,
            "breach": report(plan, state, outcome, figures),
            "phases": {"a": phase_a, "b": phase_b},
            "readers": {"ok": readers.ok, "failed": len(readers.failed)},
            "stolen_tries": {str(k): v for k, v in sorted(answers.items())},
            "seconds": round(time.monotonic() - started, 1),
        }
        _print_exposure(console, "phase a: relays cut", figures, records, during)
        if phase_b:
            _print_exposure(console, "phase b: fully cut off", phase_b["exposure"], phase_b["records"], None)
        return _finish(console, checks, summary, folder, report_path)


def _held_everywhere(api: Api, plan: Plan, state: State) -> bool:
    figures, _ = exposure(api, plan, state)
    return all(f["revocations_held"] == f["of"] for f in figures.values())


def _called_at(stolen: list[Issued], plan: Plan, outcome: Outcome) -> list[float | None]:
    """For each stolen token, when its revoke call was sent (None: it was not revoked)."""
    keys = {c.accessor: c.key for c in plan.credentials if c.accessor}
    return [outcome.called_at.get(keys.get(x.accessor, "")) for x in stolen]


def _latest(late: dict[str, dict[str, Any]]) -> str:
    found = [f["last_accepted_ms"] for f in late.values() if f["last_accepted_ms"] is not None]
    return f"+{max(found)} ms" if found else "none"


def _first_paths(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per cell, how many revocations each path brought first, as sys/revocations/:id names
    it ("origin": minted there; "unnamed": a receipt that names no path)."""
    paths: dict[str, dict[str, int]] = {}
    for record in records:
        for cell, held in record.get("cells", {}).items():
            path = "origin" if cell == record.get("origin_cell") else str(held.get("path") or "unnamed")
            paths.setdefault(cell, {})
            paths[cell][path] = paths[cell].get(path, 0) + 1
    return paths


# Phase b, why on_stale=refuse for the payments tokens: a token is valid only in the cell
# that issued it (tokens are not replicated), so every stolen token usable in the cut-off
# cell was issued there. `local-only` serves exactly those (this cell's own) and would
# leave them usable until the heal, however long the cut; `refuse` makes them unusable
# once the cell's view of its peers is older than the bound. The price is stated in the
# report: during the cut, payments tokens are refused in every cell whose view is stale
# (503, naming the stale peers), while the readers (on_stale=serve) keep reading.
#
# Why the bound holds in the cut-off cell (control_plane/freshness.py's terms): its
# watermark of a peer is the stamp of the last heartbeat (or revocation) it got from
# that peer, a minting time at the peer, so no later than the cut, since nothing
# crosses the cut. From cut + BOUND on, its staleness exceeds the bound and every
# payments token is refused there. Every revoke call is sent after the cut, so no
# stolen token is served there more than BOUND after its revoke call, however long
# the cut lasts. The other cells hold the revocation from their commit (us-east-1) or
# the direct path (eu-west-1), and their view of the cut-off cell goes stale too.
def _phase_b(
    console: Console,
    cells: ThreeCells,
    api: Api,
    readers: Readers,
    folder: Path,
    checks: list[Check],
    per_cell: int,
    cut_seconds: float,
) -> tuple[dict[str, Any], list[Issued]]:
    name = f"phase b ({PARTITIONED} fully cut off): payments tokens (bound {BOUND:g} s, on_stale={ON_STALE})"
    if not wait_for(cells.fresh, 60, step=0.2):
        checks.append((name, False, "the cells' revocation views never got fresh before the cut"))
        return {}, []
    bound = {"max_revocation_staleness": BOUND, "on_stale": ON_STALE}
    stolen: list[Issued] = []
    for cell in CELLS:
        for _ in range(per_cell):
            made = api.ok(
                cells.urls[cell],
                "POST",
                "auth/token/create",
                {"policies": ["payments-read"], "ttl": "8h", "display_name": "payments", **bound},
            )["auth"]
            stolen.append(Issued(cell, made["client_token"], made["accessor"], made.get("lease_id", "")))

    def works(x: Issued) -> bool:  # a busy machine may delay a heartbeat past the bound: retry
        return wait_for(
            lambda: api.call(cells.urls[x.cell], "GET", "auth/token/lookup-self", token=x.token)[0] == 200,
            10,
            step=0.2,
        )

    working = sum(1 for x in stolen if works(x))
    prober = Prober(api, cells.urls, stolen, limit=120).start()
    cut_url = cells.urls[PARTITIONED]
    # One of the cut-off cell's own stolen tokens, tried there every ~50 ms: when its
    # stale view starts refusing, against the cut and against the token's revoke call.
    own = next(x for x in stolen if x.cell == PARTITIONED)
    watch = Prober(api, {PARTITIONED: cut_url}, [own], limit=120).start()
    reads_before = readers.snapshot(cut_url)
    cells.cut_off(PARTITIONED)
    cut_at, cut_wall = time.monotonic(), time.time()
    console.print(f"[yellow]{PARTITIONED} is cut off: relays, and its API to and from the other cells[/]")
    plan = Plan([TOKEN_PREFIX], cells.regional(VIA), VIA)
    plan.credentials = [Credential(x.cell, x.lease_id, x.accessor) for x in stolen]
    state = State(folder / "breach-state-b.json", plan.prefix)
    outcome = Outcome()
    with _bars(console) as bars:
        task = bars.add_task(f"revoking via {VIA}", total=len(plan.credentials))
        revoke(api, plan, state, outcome, progress=lambda n: bars.advance(task, n))
    time.sleep(max(0.0, cut_seconds - (time.monotonic() - cut_at)))
    view = cells.freshness(PARTITIONED)  # the cut-off cell's own view, just before the heal
    before_heal, _ = exposure(api, plan, state)
    reads = _since(reads_before, readers.snapshot(cut_url))
    cells.heal()
    cut = time.monotonic() - cut_at
    console.print(f"[green]{PARTITIONED} reconnected after {cut:.1f}s[/]")
    held = wait_for(lambda: _held_everywhere(api, plan, state), 90, step=0.5)
    figures, records = exposure(api, plan, state)
    prober.finish()
    late = prober.late(_called_at(stolen, plan, outcome), BOUND)
    refused_there = late[PARTITIONED]["answers"].get("503", 0)
    watch.finish()
    watched = _watched(watch, cut_wall, _called_at([own], plan, outcome)[0])
    stale = sorted(
        p
        for p, m in view.get("peers", {}).items()
        if m.get("staleness_seconds") is None or m["staleness_seconds"] > BOUND
    )
    checks.append(
        (
            name,
            working == len(stolen)
            and outcome.revoked_now == len(stolen)
            and refused_there > 0
            and late[PARTITIONED]["late"] == 0
            and watched["late"] == 0
            and stale == sorted(c for c in CELLS if c != PARTITIONED),
            f"{working}/{len(stolen)} worked before the cut, {outcome.revoked_now} revoked via {VIA}; in "
            f"{PARTITIONED}: {before_heal[PARTITIONED]['revocations_held']}/{len(stolen)} revocations "
            f"held before the heal, {refused_there} tries refused with 503 (its view of "
            f"{', '.join(stale) or 'no peer'} older than the bound), {late[PARTITIONED]['late']} accepted late; "
            f"one of its own stolen tokens, tried every ~50 ms: last served {_offset(watched['served_until_s'])} "
            f"and refused from {_offset(watched['refused_from_s'])} after the cut, last accepted "
            f"{_offset(watched['last_accepted_after_call_s'])} after its revoke call",
        )
    )
    checks.append(
        (
            "reads served in the cut-off cell during the cut",
            reads["served"] > 0 and reads["failed"] == 0,
            f"{reads['served']} served, {reads['failed']} failed in {PARTITIONED} during the {cut:.1f}s cut "
            "(readers' tokens: on_stale=serve, secrets not revoked)",
        )
    )
    result = {
        "cut": "relays and the cell's API (its gate) to and from the other cells",
        "partitioned": PARTITIONED,
        "cut_seconds": round(cut, 2),
        "bound_seconds": BOUND,
        "on_stale": ON_STALE,
        "stolen_tokens": len(stolen),
        "worked_before_cut": working,
        "revoked": outcome.revoked_now,
        "freshness_in_cut_off_cell": view,
        "exposure_before_heal": before_heal,
        "exposure": figures,
        "held_after_heal": held,
        "first_path": _first_paths(records),
        "stolen_probe": late,
        "watched_token": watched,
        "reads_in_cut_off_cell": reads,
        "records": records,
    }
    return result, stolen


def _watched(watch: Prober, cut_wall: float, called: float | None) -> dict[str, Any]:
    """What the watcher saw of one stolen token in the cut-off cell, in seconds after the
    cut (served until, refused from) and after its revoke call (last accepted)."""
    after_cut = [(sent - cut_wall, status) for _, _, sent, status in watch.tries if sent >= cut_wall]
    served = [t for t, status in after_cut if status == 200]
    refused = [t for t, status in after_cut if status == 503]
    accepted = (
        []
        if called is None
        else [sent - called for _, _, sent, st in watch.tries if st == 200 and sent >= called]
    )
    late = watch.late([called], BOUND)[PARTITIONED]
    return {
        "tries": late["tries"],
        "answers": late["answers"],
        "late": late["late"],
        "served_until_s": round(max(served), 3) if served else None,
        "refused_from_s": round(min(refused), 3) if refused else None,
        "last_accepted_after_call_s": round(max(accepted), 3) if accepted else None,
    }


def _offset(seconds: float | None) -> str:
    return "never" if seconds is None else f"+{seconds * 1000:.0f} ms"


def _setup(
    console: Console,
    cells: ThreeCells,
    api: Api,
    secrets_per_cell: int,
    checks: list[Check],
    pg: Any = None,
) -> dict[str, Any] | None:
    """Policy, one secret homed in each cell, reader tokens, and the rotated secrets."""
    readers: list[tuple[str, str, str]] = []
    before: dict[str, str] = {}
    for cell, url in cells.urls.items():
        api.ok(url, "PUT", "sys/policies/acl/payments-read", {"policy": POLICY})
        if pg is not None:  # dynamic database users on the one PostgreSQL, per cell
            connection = f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/postgres"
            config = {
                "plugin_name": "postgresql-database-plugin",
                "connection_url": connection,
                "username": "postgres",
                "password": pg.superuser_password,
                "allowed_roles": ["payments"],
            }
            api.ok(url, "POST", "database/config/pg", config)
            role = {
                "db_name": "pg",
                "creation_statements": CREATE_USER,
                "default_ttl": "8h",
                "max_ttl": "24h",
            }
            api.ok(url, "POST", "database/roles/payments", role)
        path = f"payments/{cell}/config"

        def wrote(url: str = url, path: str = path) -> bool:
            status, _ = api.call(url, "POST", f"secret/data/{path}", {"data": {"endpoint": "db.internal"}})
            return status == 200

        if not wait_for(wrote, 60, step=0.5):  # a new secret's home needs a majority of cells
            checks.append(("a secret homed in each cell", False, f"{cell} could not claim {path}"))
            return None
        for _ in range(2):
            made = api.ok(
                url,
                "POST",
                "auth/token/create-orphan",
                {"policies": ["payments-read"], "ttl": "1h", **READERS_BOUND},
            )
            readers.append((url, made["auth"]["client_token"], path))
        for i in range(secrets_per_cell):
            name = f"payments/db-{i:03d}"
            api.ok(url, "POST", f"rotation/secrets/{name}", {"target": "generic", "params": {}})
            before[f"{cell}/{name}"] = _current(api, url, name)
    checks.append(
        (
            "secrets, reader workloads and rotated secrets in every cell",
            True,
            f"{len(readers)} readers, {secrets_per_cell * len(cells.urls)} secrets under rotation",
        )
    )
    return {"readers": readers, "before": before}


def _current(api: Api, url: str, name: str) -> str:
    answer = api.ok(url, "GET", f"rotation/creds/{name}")
    return json.dumps(answer.get("data", {}), sort_keys=True)


def _rotated(api: Api, cells: ThreeCells, before: dict[str, str]) -> bool:
    for key, value in before.items():
        cell, name = key.split("/", 1)
        if _current(api, cells.urls[cell], name) == value:
            return False
    return True


def _agents(console: Console, cells: ThreeCells, api: Api, stack: ExitStack) -> dict[str, str]:
    """A `keycell agent` per cell, attested with a join token, serving the Workload API
    on a unix socket; an entry gives this process (its uid and executable) the SPIFFE ID
    WORKLOAD_ID; auth/jwt/login takes the JWT-SVIDs. Returns cell -> socket."""
    import sys

    from keycell.testing.processes import ServerProcess

    folder = Path(tempfile.mkdtemp(prefix="kc-agents-"))  # unix socket paths are short
    stack.callback(lambda: __import__("shutil").rmtree(folder, ignore_errors=True))
    selectors = [f"unix:uid:{os.getuid()}", f"unix:path:{os.path.realpath(sys.executable)}"]
    sockets: dict[str, str] = {}
    for cell, url in cells.urls.items():
        joined = api.ok(url, "POST", "identity/join-token", {"ttl": 300})["data"]
        entry = {"spiffe_id": WORKLOAD_ID, "parent_id": joined["agent_id"], "selectors": selectors}
        api.ok(url, "POST", "identity/entries", entry)
        api.ok(url, "POST", "auth/jwt/config", {"spiffe_trust_domain": True})
        role = {
            "role_type": "jwt",
            "bound_audiences": [AUDIENCE],
            "bound_spiffe_ids": ["spiffe://example.org/payments/*"],
            "token_policies": ["payments-read"],
            "token_ttl": "8h",
        }
        api.ok(url, "POST", "auth/jwt/role/payments", role)
        socket = f"unix://{folder / cell}.sock"
        agent = ServerProcess(
            "keycell",
            ["agent", "--socket", socket, "--address", url, "--join-token", joined["token"]],
            what=f"keycell agent ({cell})",
            startup_timeout=60,
        )
        agent.start()
        stack.callback(agent.stop)
        sockets[cell] = socket
        console.print(f"cell {cell}: keycell agent on {socket} (attested by join token)")
    return sockets


def _fetch_svid(socket: str) -> str:
    """A JWT-SVID for AUDIENCE from the agent, as a workload gets one (the `spiffe`
    library's client); retried while the agent's first sync brings the entry."""
    from spiffe import WorkloadApiClient

    deadline = time.monotonic() + 60
    client = WorkloadApiClient(socket_path=socket, default_timeout=15)
    try:
        while True:
            try:
                return str(client.fetch_jwt_svid(audience={AUDIENCE}).token)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        client.close()


def _issue(
    console: Console,
    cells: ThreeCells,
    api: Api,
    count: int,
    checks: list[Check],
    sockets: dict[str, str] | None,
) -> list[Issued]:
    """`count` workload credentials over the cells: with the agents, tokens from
    auth/jwt/login with a JWT-SVID (one SVID per cell per 50 logins, as a workload
    reuses its SVID while it is fresh); otherwise tokens from auth/token/create."""
    order = [CELLS[i % len(CELLS)] for i in range(count)]
    svids: dict[str, tuple[str, int]] = {}
    lock = threading.Lock()

    def credential(cell: str) -> dict[str, Any]:
        if sockets is None:
            return {"policies": ["payments-read"], "ttl": "8h"}
        with lock:
            svid, uses = svids.get(cell, ("", 50))
            if uses >= 50:
                svid, uses = _fetch_svid(sockets[cell]), 0
            svids[cell] = (svid, uses + 1)
        return {"role": "payments", "jwt": svid}

    def one(cell: str) -> Issued | None:
        body = credential(cell)
        if sockets is None:
            status, made = api.call(cells.urls[cell], "POST", "auth/token/create", body)
        else:
            status, made = api.call(cells.urls[cell], "POST", "auth/jwt/login", body, token="")
        if status != 200:
            return None
        auth = made["auth"]
        return Issued(cell, auth["client_token"], auth["accessor"], auth.get("lease_id", ""))

    issued: list[Issued] = []
    how = "JWT-SVIDs from the agents -> auth/jwt/login" if sockets else "auth/token/create"
    with _bars(console) as bars, ThreadPoolExecutor(max_workers=8) as pool:
        task = bars.add_task(f"issuing workload credentials ({how})", total=count)
        for got in pool.map(one, order):
            if got is not None:
                issued.append(got)
            bars.advance(task)
    sample = issued[:: max(1, len(issued) // 30)]
    live = 0
    for x in sample:
        status, me = api.call(cells.urls[x.cell], "GET", "auth/token/lookup-self", token=x.token)
        bound = sockets is None or me.get("data", {}).get("meta", {}).get("spiffe_id") == WORKLOAD_ID
        live += status == 200 and bound
    checks.append(
        (
            f"{count} workload tokens issued across the cells",
            len(issued) == count and live == len(sample),
            f"{len(issued)} tokens via {how} "
            f"({', '.join(f'{c}: {sum(1 for x in issued if x.cell == c)}' for c in CELLS)}); "
            f"{live}/{len(sample)} sampled work before the breach"
            + (f", bound to {WORKLOAD_ID}" if sockets else ""),
        )
    )
    return issued if len(issued) == count else []


def _postgres(console: Console, stack: ExitStack) -> Any:
    """A real PostgreSQL for dynamic database users, or None (said) when not installed."""
    from keycell.testing.postgres import PostgresServer, find_bin_dir

    try:
        find_bin_dir()
    except RuntimeError as exc:
        console.print(f"[yellow]{exc}: the credentials are tokens only[/]")
        return None
    pg = PostgresServer().start()
    stack.callback(pg.stop)
    console.print(f"PostgreSQL on 127.0.0.1:{pg.port}: dynamic database users (database/creds/payments)")
    return pg


def _pg_login(pg: Any, cred: DbCredential) -> bool:
    import psycopg

    try:
        psycopg.connect(pg.dsn(cred.username, cred.password), connect_timeout=10).close()
        return True
    except psycopg.OperationalError:
        return False


def _issue_db(
    console: Console, cells: ThreeCells, api: Api, holders: list[Issued], checks: list[Check], pg: Any
) -> list[DbCredential]:
    """One database user per workload token (database/creds/payments with that token)."""

    def one(holder: Issued) -> DbCredential | None:
        status, made = api.call(cells.urls[holder.cell], "GET", DB_PREFIX, token=holder.token)
        if status != 200:
            return None
        data = made["data"]
        return DbCredential(holder.cell, made["lease_id"], data["username"], data["password"])

    db: list[DbCredential] = []
    with _bars(console) as bars, ThreadPoolExecutor(max_workers=8) as pool:
        task = bars.add_task("workloads fetch dynamic PostgreSQL users", total=len(holders))
        for got in pool.map(one, holders):
            if got is not None:
                db.append(got)
            bars.advance(task)
    sample = db[:: max(1, len(db) // 15)]
    live = sum(1 for x in sample if _pg_login(pg, x))
    checks.append(
        (
            f"{len(holders)} dynamic PostgreSQL users issued",
            len(db) == len(holders) and live == len(sample),
            f"{len(db)} users, each fetched with a workload's token; {live}/{len(sample)} sampled log in",
        )
    )
    return db if len(db) == len(holders) else []


def _db_everywhere(
    console: Console, api: Api, cells: ThreeCells, db: list[DbCredential], pg: Any
) -> tuple[int, dict[int, int]]:
    """Each stolen database user: a PostgreSQL login, and its lease looked up in every cell."""
    leases: dict[int, int] = {}
    logins = 0
    lock = threading.Lock()

    def one(cred: DbCredential) -> None:
        nonlocal logins
        accepted = _pg_login(pg, cred)
        statuses = [
            api.call(cells.urls[c], "PUT", "sys/leases/lookup", {"lease_id": cred.lease_id})[0] for c in CELLS
        ]
        with lock:
            logins += accepted
            for status in statuses:
                leases[status] = leases.get(status, 0) + 1

    with _bars(console) as bars, ThreadPoolExecutor(max_workers=8) as pool:
        task = bars.add_task("trying every stolen database user", total=len(db))
        for _ in pool.map(one, db):
            bars.advance(task)
    return logins, leases


def _during_partition(api: Api, cells: ThreeCells, issued: list[Issued]) -> dict[str, Any]:
    """Phase a: what the stolen tokens could do right after the breach, before the heal:
    refused in every cell the revocations reached: with the relay mesh to the cut-off
    cell down, the direct path (the servers' and the runbook's breach.DirectFanout)
    still reaches its API."""
    result: dict[str, Any] = {}
    for cell in CELLS:
        mine = [x for x in issued if x.cell == cell][:20]
        accepted = sum(
            1
            for x in mine
            if api.call(cells.urls[cell], "GET", "auth/token/lookup-self", token=x.token)[0] == 200
        )
        result[cell] = {"tried": len(mine), "accepted": accepted}
    return result


def _stolen_everywhere(console: Console, api: Api, cells: ThreeCells, issued: list[Issued]) -> dict[int, int]:
    """Each stolen token against each cell: HTTP status -> count (403 is a refusal;
    anything else, an error included, breaks the promise)."""
    answers: dict[int, int] = {}
    lock = threading.Lock()

    def one(pair: tuple[Issued, str]) -> None:
        cred, cell = pair
        status, _ = api.call(cells.urls[cell], "GET", "auth/token/lookup-self", token=cred.token)
        with lock:
            answers[status] = answers.get(status, 0) + 1

    pairs = [(x, c) for x in issued for c in CELLS]
    with _bars(console) as bars, ThreadPoolExecutor(max_workers=8) as pool:
        task = bars.add_task("trying every stolen token in every cell", total=len(pairs))
        for _ in pool.map(one, pairs):
            bars.advance(task)
    return answers


def _within(records: list[dict[str, Any]], cell: str, seconds: float) -> int:
    """How many of the phase's revocations `cell` held within `seconds` of the revoke call."""
    return sum(
        1
        for r in records
        if cell in r.get("cells", {}) and float(r["cells"][cell]["exposure_seconds"]) <= seconds
    )


def _print_exposure(
    console: Console,
    title: str,
    figures: dict[str, Any],
    records: list[dict[str, Any]],
    during: dict[str, Any] | None,
) -> None:
    table = Table(title=f"{title}: exposure window per cell (revoke call -> cell's ledger holds it)")
    db = during is not None and any("db_tried" in d for d in during.values())
    columns = ["cell", "revocations held", f"held within {BOUND:g} s", "p50", "p99", "max"]
    if during is not None:
        columns.append("own stolen tokens usable before heal")
    for column in columns + (["own stolen DB users usable before heal"] if db else []):
        table.add_column(column)
    for cell, fig in figures.items():
        row = [
            cell + (" (partitioned)" if cell == PARTITIONED else ""),
            f"{fig['revocations_held']}/{fig['of']}",
            f"{_within(records, cell, BOUND)}/{fig['of']}",
            f"{fig['p50_s'] * 1000:.0f} ms",
            f"{fig['p99_s'] * 1000:.0f} ms",
            f"{fig['max_s'] * 1000:.0f} ms",
        ]
        if during is not None:
            row.append(f"{during[cell]['accepted']}/{during[cell]['tried']}")
        if db and during is not None:
            row.append(f"{during[cell]['db_accepted']}/{during[cell]['db_tried']}")
        table.add_row(*row)
    console.print(table)


def _finish(
    console: Console,
    checks: list[Check],
    summary: dict[str, Any] | None,
    folder: Path,
    report_path: str | None,
) -> bool:
    table = Table(title="promises")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for name, ok, detail in checks:
        table.add_row(name, "[green]kept[/]" if ok else "[bold red]BROKEN[/]", detail)
    console.print(table)
    ok = all(ok for _, ok, _ in checks)
    path = Path(report_path) if report_path else folder / "breach-report.html"
    path.write_text(render_html(checks, summary))
    if summary is not None:
        (folder / "breach-report.json").write_text(json.dumps({**summary, "checks": checks}, indent=1))
    console.print(f"report: {path}")
    console.print("[bold green]all promises kept[/]" if ok else "[bold red]a promise was broken[/]")
    return ok


def _chart(records: list[dict[str, Any]], cells: list[str]) -> str:
    """Cumulative share of revocations each cell holds against seconds since the
    revoke call: one line per cell, as inline SVG."""
    colours = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd"]
    series = {
        c: sorted(float(r["cells"][c]["exposure_seconds"]) for r in records if c in r.get("cells", {}))
        for c in cells
    }
    longest = max((v[-1] for v in series.values() if v), default=1.0) or 1.0
    total = max(1, len(records))
    width, height, left, bottom, top = 640, 300, 50, 30, 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 20}" height="{height + 55}" font-size="11">'
    ]
    parts.append(f'<line x1="{left}" y1="{height}" x2="{width}" y2="{height}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height}" stroke="black"/>')
    parts.append(f'<text x="{left}" y="12">revocations held</text>')
    parts.append(
        f'<text x="{width}" y="{height + 28}" text-anchor="end">seconds since the revoke call</text>'
    )
    for i in range(5):
        frac = i / 4
        x = left + frac * (width - left)
        y = height - frac * (height - top)
        parts.append(f'<text x="{x:.0f}" y="{height + 15}" text-anchor="middle">{frac * longest:.2f}s</text>')
        parts.append(f'<text x="{left - 5}" y="{y:.0f}" text-anchor="end">{frac * 100:.0f}%</text>')
    for n, (cell, values) in enumerate(series.items()):
        points: list[tuple[float, float]] = [(float(left), float(height))]
        for i, value in enumerate(values):
            x = left + value / longest * (width - left)
            points += [(x, points[-1][1]), (x, height - (i + 1) / total * (height - top))]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        colour = colours[n % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(
            f'<text x="{left + 10 + n * 170}" y="{height + bottom + 15}" fill="{colour}">{html.escape(cell)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(checks: list[Check], summary: dict[str, Any] | None) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class={'ok' if ok else 'bad'}>{'kept' if ok else 'BROKEN'}</td>"
        f"<td>{html.escape(detail)}</td></tr>"
        for name, ok, detail in checks
    )
    body = [f"<h2>Promises</h2><table><tr><th>check</th><th>result</th><th>detail</th></tr>{rows}</table>"]
    if summary is not None:
        body.append(
            f"<p>Payments tokens carry max_revocation_staleness={summary['bound_seconds']:g} s, "
            f"on_stale={html.escape(summary['on_stale'])}; revocations were committed in "
            f"{html.escape(summary['breach']['via'])}.</p>"
        )
        titles = {
            "a": f"Phase a: {summary['partitioned']}'s relays cut, every API reachable (direct path)",
            "b": f"Phase b: {summary['partitioned']} fully cut off (relays and its API), then healed",
        }
        for key, phase in summary["phases"].items():
            if not phase:
                continue
            figures = phase["exposure"]
            exp = "".join(
                f"<tr><td>{html.escape(c)}</td><td>{f['revocations_held']}/{f['of']}</td>"
                f"<td>{_within(phase['records'], c, summary['bound_seconds'])}/{f['of']}</td><td>{f['p50_s'] * 1000:.0f} ms</td>"
                f"<td>{f['p99_s'] * 1000:.0f} ms</td><td>{f['max_s'] * 1000:.0f} ms</td></tr>"
                for c, f in figures.items()
            )
            reads = phase["reads_in_cut_off_cell"]
            body.append(
                f"<h2>{html.escape(titles[key])}</h2><p>Cut for {phase['cut_seconds']}s; reads in the cut-off "
                f"cell during the cut: {reads['served']} served, {reads['failed']} failed.</p>"
                f"<table><tr><th>cell</th><th>held</th><th>within {summary['bound_seconds']:g} s</th><th>p50</th>"
                f"<th>p99</th><th>max</th></tr>{exp}</table>"
                "<p>Share of the phase's revocations each cell's ledger holds, against seconds since the "
                "revoke call.</p>" + _chart(phase["records"], list(figures))
            )
        safe = {
            **summary,
            "phases": {
                k: {n: v for n, v in p.items() if n != "records"} for k, p in summary["phases"].items()
            },
        }
        body.append(f"<h2>Run</h2><pre>{html.escape(json.dumps(safe, indent=1))}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}.ok{color:green}.bad{color:red;font-weight:bold}"
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>Keycell breach report</title><style>{style}</style>"
        f"</head><body><h1>Keycell breach report</h1>{''.join(body)}</body></html>"
    )

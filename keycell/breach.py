"""The breach runbook: revoke everything under lease prefixes in every cell, then
rotate what the stolen credentials reached. `keycell breach` and `keycell demo` both
run it through this module.

1. Discover (read-only, what `--dry-run` shows): in every cell, the leases under the
   prefix (LIST sys/leases/lookup, recursively) and, for a token's lease, its accessor
   (PUT sys/leases/lookup); the rotated secrets under `rotate_prefix`
   (LIST rotation/secrets).
2. Revoke first: one revocation per credential (by accessor for a token, by lease id
   otherwise), all committed in one cell (`via`) and gossiped by the relays to every
   other cell. A lease on an outside system (a dynamic database user) is first revoked
   in its own cell (PUT sys/leases/revoke), whose revoker drops the user there. Each has its own id, so sys/revocations/:id gives every credential's
   exposure window per cell. With `tombstone`, a prefix revocation (POST
   sys/revocations {prefix}) goes first: it also covers leases in a cell discovery
   could not reach, and every lease issued under the prefix afterwards (a prefix
   revocation stays in the set), so use it when the path itself is burnt.
3. Then rotate: POST rotation/rotate/:name in each cell, each under a token derived
   from the run id, so a resumed run never rotates a secret twice.

Progress lives in a state file written after every step (atomically): running the same
breach again skips what is done.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from keycell.client.errors import ConnectionFailed
from keycell.client.transport import Transport
from keycell.control_plane.private_files import write_private

MAX_DEPTH = 8  # lease paths are a few segments deep; a listing deeper than this is refused


class BreachError(RuntimeError):
    """A step of the runbook failed; the message says which call and why."""


class Api:
    """Vault-style calls to the cells' APIs, one keep-alive connection per thread and
    host. Answers (status, body); raises BreachError only when a cell cannot be reached
    or answers with a body that is not JSON."""

    def __init__(self, token: str, timeout: float = 15.0, tokens: dict[str, str] | None = None) -> None:
        self.token = token
        self.tokens = dict(tokens or {})  # API URL -> the token for that cell, when cells differ
        self.timeout = timeout
        self._transports: dict[str, Transport] = {}
        self._lock = threading.Lock()

    def _transport(self, url: str) -> Transport:
        with self._lock:
            transport = self._transports.get(url)
            if transport is None:
                try:
                    transport = self._transports[url] = Transport(url, timeout=self.timeout)
                except ValueError:
                    raise BreachError(f"{url!r} is not an http:// or https:// URL") from None
            return transport

    def call(
        self, url: str, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One call through the client's transport (a keep-alive connection per thread;
        a request is sent again only on a kept-alive connection the server had closed,
        never after a timeout, so a revocation is never made twice)."""
        headers = {"X-Vault-Token": self.tokens.get(url, self.token) if token is None else token}
        try:
            reply = self._transport(url).send(method, path, headers, body)
        except ConnectionFailed as exc:
            raise BreachError(f"cannot reach {url}: {'; '.join(exc.errors)}") from None
        if not reply.body:
            return reply.status, {}
        try:
            return reply.status, json.loads(reply.body)
        except ValueError:
            # Say which call got what (a proxy's or a crashed worker's page) instead of a
            # bare JSONDecodeError; never the body itself, which may hold a secret.
            kind = reply.headers.get("content-type", "no content type")
            raise BreachError(
                f"{method} {path} at {url}: HTTP {reply.status} with a body that is not JSON "
                f"({len(reply.body)} bytes, {kind})"
            ) from None

    def ok(self, url: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, answer = self.call(url, method, path, body)
        if status >= 300:
            errors = "; ".join(answer.get("errors") or []) or "no reason given"
            raise BreachError(f"{method} {path} at {url}: HTTP {status}: {errors}")
        return answer


@dataclass(frozen=True)
class Credential:
    cell: str
    lease_id: str
    accessor: str = ""  # a token's accessor; empty for other leases

    @property
    def subject(self) -> dict[str, str]:
        return {"accessor": self.accessor} if self.accessor else {"lease_id": self.lease_id}

    @property
    def key(self) -> str:
        return f"{self.cell}:{self.lease_id}"


@dataclass
class Plan:
    prefixes: list[str]
    cells: dict[str, str]  # name -> API URL
    via: str
    credentials: list[Credential] = field(default_factory=list)
    rotations: dict[str, list[str]] = field(default_factory=dict)  # cell -> secret names
    rotate_prefix: str = ""
    unreachable: dict[str, str] = field(default_factory=dict)  # cell -> why discovery failed there

    @property
    def prefix(self) -> str:
        return ",".join(self.prefixes)

    def summary(self) -> dict[str, Any]:
        per_cell = {c: sum(1 for x in self.credentials if x.cell == c) for c in self.cells}
        return {
            "prefix": self.prefix,
            "prefixes": self.prefixes,
            "via": self.via,
            "credentials": len(self.credentials),
            "credentials_per_cell": per_cell,
            "tokens": sum(1 for x in self.credentials if x.accessor),
            "other_leases": sum(1 for x in self.credentials if not x.accessor),
            "rotate_prefix": self.rotate_prefix,
            "secrets_to_rotate": {c: len(n) for c, n in self.rotations.items()},
            "unreachable": self.unreachable,
        }


def check_prefix(prefix: str) -> str:
    cleaned = prefix.strip().strip("/")
    if not cleaned or any(not part for part in cleaned.split("/")) or ".." in cleaned.split("/"):
        raise BreachError(f"--prefix must name at least one path segment, not {prefix!r}")
    if not all(0x21 <= ord(ch) <= 0x7E for ch in cleaned):
        raise BreachError("--prefix must be printable ASCII without spaces")
    return cleaned


def _list_leases(api: Api, url: str, prefix: str, depth: int = 0) -> list[str]:
    if depth > MAX_DEPTH:
        raise BreachError(f"leases under {prefix!r} nest deeper than {MAX_DEPTH} segments")
    status, answer = api.call(url, "LIST", "sys/leases/lookup/" + quote(prefix) + "/")
    if status == 404:
        return []
    if status >= 300:
        raise BreachError(f"listing leases under {prefix!r} at {url}: HTTP {status}")
    found: list[str] = []
    for key in answer.get("data", {}).get("keys", []):
        if key.endswith("/"):
            found += _list_leases(api, url, f"{prefix}/{key.rstrip('/')}", depth + 1)
        else:
            found.append(f"{prefix}/{key}")
    return found


def discover(
    api: Api,
    cells: dict[str, str],
    prefix: str | list[str],
    *,
    via: str | None = None,
    rotate_prefix: str = "",
    concurrency: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Plan:
    """Everything the breach would touch; reads only. A cell that cannot be reached is
    named in `plan.unreachable` and skipped (the `via` cell must answer)."""
    prefixes = [check_prefix(p) for p in ([prefix] if isinstance(prefix, str) else prefix)]
    if not prefixes:
        raise BreachError("name at least one --prefix")
    if not cells:
        raise BreachError("name at least one cell")
    via = via or next(iter(cells))
    if via not in cells:
        raise BreachError(f"--via {via!r} is not one of the cells ({', '.join(cells)})")
    plan = Plan(prefixes, dict(cells), via, rotate_prefix=rotate_prefix)

    def describe(cell: str, lease_id: str) -> Credential | None:
        status, answer = api.call(cells[cell], "PUT", "sys/leases/lookup", {"lease_id": lease_id})
        if progress is not None:
            progress(1)
        if status != 200:
            return None  # expired or revoked since the listing: nothing to do
        return Credential(cell, lease_id, str(answer.get("data", {}).get("token_accessor") or ""))

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for cell, url in cells.items():
            try:
                ids = [lid for p in prefixes for lid in _list_leases(api, url, p)]
            except BreachError as exc:
                if cell == via:
                    raise
                # A cell the operator cannot reach (the partition, perhaps) must not hold
                # up the others: the runbook goes on and names it; its leases are covered
                # only by --tombstone until it is reachable and the breach is run again.
                plan.unreachable[cell] = str(exc)
                continue
            for found in pool.map(lambda lid, c=cell: describe(c, lid), ids):
                if found is not None:
                    plan.credentials.append(found)
            if rotate_prefix:
                status, answer = api.call(url, "LIST", "rotation/secrets/" + quote(rotate_prefix))
                names = answer.get("data", {}).get("keys", []) if status == 200 else []
                plan.rotations[cell] = [n for n in names if isinstance(n, str) and not n.endswith("/")]
    return plan


class State:
    """What a breach run has done, kept in a JSON file (written atomically)."""

    def __init__(self, path: Path | None, prefix: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path is not None and path.exists():
            self.data = json.loads(path.read_text())
            if self.data.get("prefix") != prefix:
                raise BreachError(
                    f"the state file {path} belongs to a breach of {self.data.get('prefix')!r}; "
                    "pass another --state-file or --new-run"
                )
        if not self.data:
            self.data = {"run": "breach-" + secrets.token_hex(6), "prefix": prefix}
        self.data.setdefault("prefix_revocations", {})  # prefix -> revocation id (--tombstone)
        self.data.setdefault("enforced", [])  # credential keys whose lease was revoked in its own cell
        self.data.setdefault("revoked", {})  # credential key -> revocation id
        self.data.setdefault("rotated", {})  # cell/name -> outcome
        self.lock = threading.Lock()

    @property
    def resumed(self) -> bool:
        return bool(self.data["revoked"] or self.data["rotated"] or self.data["prefix_revocations"])

    def save(self) -> None:
        if self.path is None:
            return
        with self.lock:
            write_private(self.path, json.dumps(self.data).encode())


def default_state_file(cells: dict[str, str], prefix: str) -> Path:
    """`prefix`: Plan.prefix (the prefixes joined by commas)."""
    key = hashlib.sha256(json.dumps([sorted(cells.items()), prefix]).encode()).hexdigest()[:12]
    return Path(f".keycell-breach-{key}.json")


@dataclass
class Outcome:
    revoked_now: int = 0
    revoked_before: int = 0
    rotated_now: int = 0
    rotated_before: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    revoke_seconds: float = 0.0
    rotate_seconds: float = 0.0
    # credential key -> wall-clock time its revoke call was sent (this run only): what
    # "usable N s after the revoke call" is measured from
    called_at: dict[str, float] = field(default_factory=dict)


def revoke(
    api: Api,
    plan: Plan,
    state: State,
    outcome: Outcome,
    *,
    concurrency: int = 8,
    progress: Callable[[int], None] | None = None,
    reason: str = "breach",
    tombstone: bool = False,
) -> None:
    """One revocation per credential, all through `plan.via`; with `tombstone`, first
    one for the whole prefix, which also kills leases the discovery could not see (a
    cell it could not reach) and every lease issued under the prefix from then on."""
    url = plan.cells[plan.via]
    started = time.monotonic()
    direct = DirectFanout(api, plan)
    for prefix in plan.prefixes if tombstone else []:
        if prefix not in state.data["prefix_revocations"]:
            answer = api.ok(url, "POST", "sys/revocations", {"prefix": prefix, "reason": reason})
            state.data["prefix_revocations"][prefix] = answer["data"]["id"]
            state.save()
            direct.deliver(answer["data"])
    enforced = set(state.data["enforced"])
    todo = [c for c in plan.credentials if c.key not in state.data["revoked"]]
    outcome.revoked_before += len(plan.credentials) - len(todo)
    if progress is not None and len(plan.credentials) > len(todo):
        progress(len(plan.credentials) - len(todo))

    def one(cred: Credential) -> None:
        try:
            if not cred.accessor and cred.key not in enforced:
                # A lease on an outside system (a database user): its own cell runs the
                # lease's revoker there (drops the user, ends its sessions) before the
                # revocation that every cell will refuse it by.
                status, answer = api.call(
                    plan.cells[cred.cell], "PUT", "sys/leases/revoke", {"lease_id": cred.lease_id}
                )
                if status >= 300 and status != 400:  # 400: gone already (a resumed run)
                    raise BreachError(
                        f"sys/leases/revoke in {cred.cell}: HTTP {status}: {answer.get('errors')}"
                    )
                with state.lock:
                    state.data["enforced"].append(cred.key)
            called = time.time()
            answer = api.ok(url, "POST", "sys/revocations", {**cred.subject, "reason": reason})
            direct.deliver(answer["data"])
        except BreachError as exc:
            with state.lock:
                outcome.failed[cred.key] = str(exc)
        else:
            with state.lock:
                state.data["revoked"][cred.key] = answer["data"]["id"]
                outcome.called_at[cred.key] = called
                outcome.revoked_now += 1
        if progress is not None:
            progress(1)

    saved = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for _ in pool.map(one, todo):
            if time.monotonic() - saved > 0.5:
                state.save()
                saved = time.monotonic()
    state.save()
    outcome.revoke_seconds += time.monotonic() - started


DIRECT_ATTEMPTS = 2
DIRECT_TIMEOUT = 1.0  # seconds per try: a cut-off cell must not hold the runbook up
_RECORD_FIELDS = ("id", "subject", "origin_cell", "revoked_at", "reason", "seq")


class DirectFanout:
    """The direct path from the runbook too (issue 18): each revocation `plan.via`
    commits goes to every other cell's API (POST sys/revocations/apply), in parallel,
    at most DIRECT_ATTEMPTS tries of DIRECT_TIMEOUT each, besides the relays and the via
    cell's own direct path. Idempotent. A cell that fails is not tried again in this
    run: the other paths (and the relays' anti-entropy after a heal) still carry it."""

    def __init__(self, api: Api, plan: Plan) -> None:
        self.api = Api(api.token, timeout=DIRECT_TIMEOUT, tokens=api.tokens)
        self.cells = {c: u for c, u in plan.cells.items() if c != plan.via and c not in plan.unreachable}
        self.down: set[str] = set()
        self.delivered: dict[str, int] = dict.fromkeys(self.cells, 0)
        self._lock = threading.Lock()

    def deliver(self, record: dict[str, Any]) -> None:
        body = {"revocations": [{k: record.get(k) for k in _RECORD_FIELDS}]}
        targets = {c: u for c, u in self.cells.items() if c not in self.down}
        if not targets:
            return
        with ThreadPoolExecutor(max_workers=len(targets)) as pool:
            for cell, took in zip(
                targets, pool.map(lambda u: self._send(u, body), targets.values()), strict=True
            ):
                with self._lock:
                    if took:
                        self.delivered[cell] += 1
                    else:
                        self.down.add(cell)

    def _send(self, url: str, body: dict[str, Any]) -> bool:
        for _ in range(DIRECT_ATTEMPTS):
            try:
                status, _answer = self.api.call(url, "POST", "sys/revocations/apply", body)
            except BreachError:
                continue
            if status == 200:
                return True
        return False


def rotate(
    api: Api,
    plan: Plan,
    state: State,
    outcome: Outcome,
    *,
    concurrency: int = 4,
    progress: Callable[[int], None] | None = None,
) -> None:
    """After the revocations: rotate each secret in its cell, idempotently per run."""
    started = time.monotonic()
    every = [(cell, name) for cell, names in plan.rotations.items() for name in names]
    todo = [(c, n) for c, n in every if f"{c}/{n}" not in state.data["rotated"]]
    outcome.rotated_before += len(every) - len(todo)
    if progress is not None and len(every) > len(todo):
        progress(len(every) - len(todo))

    def one(item: tuple[str, str]) -> None:
        cell, name = item
        token = f"{state.data['run']}-{hashlib.sha256(f'{cell}/{name}'.encode()).hexdigest()[:16]}"
        try:
            answer = api.ok(plan.cells[cell], "POST", "rotation/rotate/" + quote(name), {"token": token})
        except BreachError as exc:
            with state.lock:
                outcome.failed[f"{cell}/{name}"] = str(exc)
        else:
            with state.lock:
                state.data["rotated"][f"{cell}/{name}"] = answer.get("data", {}).get("outcome", "rotated")
                outcome.rotated_now += 1
        if progress is not None:
            progress(1)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(one, todo))
    state.save()
    outcome.rotate_seconds += time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def exposure(
    api: Api, plan: Plan, state: State, *, concurrency: int = 8
) -> tuple[dict[str, dict[str, float | int]], list[dict[str, Any]]]:
    """Per cell, the exposure windows (seconds) of the run's revocations as
    sys/revocations/:id in the `via` cell shows them: p50/p99/max and how many
    revocations that cell holds. Also every revocation's per-cell times."""
    url = plan.cells[plan.via]
    ids = list(state.data["revoked"].values()) + list(state.data["prefix_revocations"].values())

    def read(rid: str) -> dict[str, Any]:
        status, answer = api.call(url, "GET", f"sys/revocations/{rid}")
        return answer.get("data", {}) if status == 200 else {"id": rid, "cells": {}}

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        records = list(pool.map(read, ids))
    figures: dict[str, dict[str, float | int]] = {}
    for cell in plan.cells:
        windows = [float(r["cells"][cell]["exposure_seconds"]) for r in records if cell in r.get("cells", {})]
        figures[cell] = {
            "revocations_held": len(windows),
            "of": len(records),
            "p50_s": round(percentile(windows, 0.50), 4) if windows else -1,
            "p99_s": round(percentile(windows, 0.99), 4) if windows else -1,
            "max_s": round(max(windows), 4) if windows else -1,
        }
    return figures, records


def report(plan: Plan, state: State, outcome: Outcome, figures: dict[str, Any] | None) -> dict[str, Any]:
    return {
        **plan.summary(),
        "run": state.data["run"],
        "state_file": str(state.path) if state.path else None,
        "prefix_revocations": state.data["prefix_revocations"],
        "revoked_now": outcome.revoked_now,
        "revoked_before": outcome.revoked_before,
        "rotated_now": outcome.rotated_now,
        "rotated_before": outcome.rotated_before,
        "failed": outcome.failed,
        "revoke_seconds": round(outcome.revoke_seconds, 3),
        "rotate_seconds": round(outcome.rotate_seconds, 3),
        "exposure": figures,
    }

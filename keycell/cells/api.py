"""The regional API's side of cells under partition: KV writes go to the secret's
home, reads are served from this cell's replica with its age, and a read may bound
the age it accepts.

- Every KV change (POST/PUT/PATCH/DELETE secret/data/:path, POST secret/delete/,
  undelete/ and destroy/:path, POST/PATCH/DELETE secret/metadata/:path): at the home
  (or for a new secret, which this cell then homes) it is CP in this cell's ledger and
  the local relay is told to push it; for a secret homed elsewhere its arguments are
  sealed to the home cell's public key (from the cell directory) and forwarded through
  the local relay to a relay of the home cell, which applies it with Vault's
  check-and-set and version rules and answers as it would itself (its 400 on a cas
  mismatch comes back as is). When the home cannot be reached: 503 naming the home
  cell, and nothing changed anywhere; a timeout after sending says the outcome is
  unknown.
- GET secret/data/:path: served from this cell's ledger, with `X-Keycell-Replica-Age`
  (seconds the copy may be behind its home; 0 at the home) and `X-Keycell-Home-Cell`.
  `X-Keycell-Max-Staleness: 2s` (or `2`, `500ms`) asks for a copy no older than that:
  an older replica is refreshed from the home first, and when the home cannot be
  reached the read is refused with 412 (nothing stale is served under a bound).

`install(router, services, relay_addr)` wraps the KV routes of a built router; the
server does it when KEYCELL_RELAY names the cell's relay (functions/wiring.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

import grpc

from keycell.cells._pb import cells_pb2 as pb
from keycell.cells._pb import cells_pb2_grpc as pb_grpc
from keycell.cells.agent import CHANNEL_OPTIONS, forward_aad, unknown_outcome
from keycell.control_plane import directory as directory_mod
from keycell.control_plane.cellkeys import CellKey, seal_to
from keycell.control_plane.engines.kv import changes as kvchange
from keycell.control_plane.errors import InvalidRequest, NotFound, RequestError
from keycell.control_plane.freshness import enforce
from keycell.control_plane.replicas import Home, NoMajority, NotHome, Replicas
from keycell.control_plane.router import Context, Operation, OperationDoc, Result, RouteDoc, Router
from keycell.control_plane.routes.openapi import STR, STR_LIST, obj, ok
from keycell.relay import tls as relay_tls

AGE_HEADER = "X-Keycell-Replica-Age"
HOME_HEADER = "X-Keycell-Home-Cell"
MAX_STALENESS_HEADER = "x-keycell-max-staleness"
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)?")


class StaleReplica(RequestError):
    status = 412


def parse_staleness(text: str) -> float:
    """Seconds from `2`, `2.5`, `2s`, `500ms`, `1m`; InvalidRequest otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidRequest(f"{MAX_STALENESS_HEADER} takes a duration such as 2s, 500ms or 0")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


class CellsFrontend:
    def __init__(
        self,
        services: Any,
        relay_addr: str | None,
        *,
        timeout: float = 5.0,
        tls: relay_tls.RelayTLS | None = None,
    ) -> None:
        """`tls`: this process's certificate (an API identity of its cell) for a relay with mTLS."""
        self.tls = tls
        self.services = services
        self.cell: str = services.config.cell_id
        self.relay_addr = relay_addr
        self.timeout = timeout
        self._key: CellKey | None = None
        self.replicas = Replicas(
            services.barrier, services.kv, self.cell, self._cell_key, clock=services.clock
        )
        self._stub: Any = None

    def _cell_key(self) -> CellKey:
        if self._key is None:
            self._key = CellKey.load_or_create(self.services.barrier)
        return self._key

    def stub(self) -> Any:
        if self._stub is None and self.relay_addr:
            channel = relay_tls.channel(self.relay_addr, self.tls, CHANNEL_OPTIONS)
            self._stub = pb_grpc.CellsStub(channel)  # type: ignore[no-untyped-call]
        return self._stub

    # --- writes -----------------------------------------------------------------------

    def change(self, secret: str, op: str, args: dict[str, Any]) -> dict[str, Any] | None:
        """Any KV change (control_plane/engines/kv/changes.py): at the secret's home, CP in this
        cell's ledger, then pushed to the other cells; for a secret homed elsewhere, its
        arguments sealed to the home's key and forwarded through the local relay."""
        path = self.replicas.full_path(secret)
        kvchange.check(self.services.kv, secret, op, args)  # bad input is refused before anything travels
        if kvchange.changes_nothing(op, args):
            return None
        home = self.replicas.confirmed_home(path) or self._find_home(path, op)
        if home is None:  # no cell homes it: the change answers here as it would anywhere (404 or no-op)
            return kvchange.run(self.services.kv, secret, op, args)
        if home.home == self.cell and home.state == "home":
            out = self.replicas.change(secret, op, args)
            self._written(path)
            return out
        if home.state != "home":
            raise NotHome(path, home)
        public = self._public_key(home.home)
        stub = self.stub()
        if public is None or stub is None:
            raise NotHome(path, home, reachable=False)
        request = pb.ForwardRequest(
            path=path,
            home=home.home,
            op=op,
            sealed_args=seal_to(public, json.dumps(args).encode(), forward_aad(path, op)),
            origin_cell=self.cell,
        )
        try:
            reply = stub.Forward(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RequestError(unknown_outcome(path, home.home, op), status=503) from None
            raise NotHome(path, home, reachable=False) from None
        body = json.loads(reply.body or b"{}")
        if reply.status != 200:
            errors = body.get("errors") or ["the home cell refused the change"]
            raise RequestError(str(errors[0]), status=reply.status, data=body.get("data"))
        return body.get("data")  # type: ignore[no-any-return]

    def _find_home(self, path: str, op: str) -> Home | None:
        """The home of a secret this cell holds no confirmed home for. A change that
        may create it claims it (`_claim`); any other asks the other cells through the
        relay (this cell may not have heard of it yet): None when no cell homes it."""
        if op in kvchange.CREATES:
            return self._claim(path)
        stub = self.stub()
        if stub is None:
            return None
        try:
            stub.Refresh(pb.RefreshRequest(path=path), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise RequestError(
                f"this cell holds no copy of {path} and cannot ask every other cell whether one "
                "homes it now; retry later, or send the change to the secret's home cell",
                status=503,
            ) from None
        return self.replicas.confirmed_home(path)

    def _claim(self, path: str) -> Home:
        """The home of a secret this cell has no confirmed home for: found in another
        cell, or claimed for this one with a majority of cells."""
        stub = self.stub()
        if stub is None:  # a lone cell (no relay): it is every secret's home
            return self.replicas.confirm(path)
        try:
            reply = stub.Claim(pb.ClaimRequest(path=path), timeout=self.timeout)
        except grpc.RpcError:
            raise RequestError(
                f"{path} is a new secret, and its home is claimed with a majority of the cells "
                "through this cell's relay, which cannot be reached; retry later or create it in "
                "another cell",
                status=503,
            ) from None
        if not reply.HasField("home"):
            raise NoMajority(path, reply.votes, reply.cells)
        return Home(reply.home.home, reply.home.epoch, reply.home.state or "home", reply.home.to)

    def _public_key(self, cell: str) -> str | None:
        record = directory_mod.get(self.services.barrier, cell)
        if record is None or record.removed or not record.record.public_key:
            return None
        return record.record.public_key

    def _written(self, path: str) -> None:
        stub = self.stub()
        if stub is None:
            return
        with contextlib.suppress(grpc.RpcError):  # else the home's digest brings the other cells up to date
            stub.Written(pb.WrittenRequest(path=path), timeout=self.timeout)

    def handover(self, secret: str, to: str) -> dict[str, Any]:
        path = self.replicas.full_path(secret)
        home = self.replicas.confirmed_home(path)
        if home is None:
            raise NotFound(f"no home is known for {path} in this cell")
        if home.home != self.cell:
            raise NotHome(path, home)
        stub = self.stub()
        if stub is None:
            raise RequestError("this cell has no relay to hand the secret over with", status=503)
        try:
            reply = stub.Handover(pb.HandoverRequest(path=path, to=to), timeout=self.timeout * 3)
        except grpc.RpcError:
            raise RequestError(
                "this cell's relay cannot be reached; retry the handover", status=503
            ) from None
        body = json.loads(reply.body or b"{}")
        if reply.status != 200:
            raise RequestError(str((body.get("errors") or ["the handover failed"])[0]), status=reply.status)
        return body["data"]  # type: ignore[no-any-return]

    # --- reads ------------------------------------------------------------------------

    def before_read(self, secret: str, bound_header: str | None) -> tuple[float | None, str]:
        """(age, home) of this cell's copy, refreshed from the home first when a bound
        asks for fresher than that (or this cell has no copy at all)."""
        path = self.replicas.full_path(secret)
        if bound_header is None:
            return self._age_and_home(path)
        bound = parse_staleness(bound_header)
        age, home_cell = self._age_and_home(path)
        if age is not None and age <= bound:
            return age, home_cell
        stub = self.stub()
        if stub is None:
            if age is None:
                return age, home_cell  # a lone cell: what it lacks does not exist
        else:
            try:
                stub.Refresh(pb.RefreshRequest(path=path), timeout=self.timeout)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None, ""  # no cell homes it: the read answers 404
            else:
                # Fetched from the home during this request: what is read now is at
                # least as new as the home's state at some instant inside the request.
                return self._age_and_home(path)
        held = f"is {age:.3f}s old" if age is not None else "does not exist here"
        where = f"its home cell {home_cell!r}" if home_cell else "the other cells"
        raise StaleReplica(
            f"this cell's copy of {path} {held}, more than the {bound:g}s asked for, and {where} "
            "cannot be reached to refresh it; retry, or read without X-Keycell-Max-Staleness"
        )

    def _age_and_home(self, path: str) -> tuple[float | None, str]:
        home = self.replicas.confirmed_home(path)
        if home is None:
            return None, ""
        return self.replicas.age(path, home), home.home


def install(
    router: Router, services: Any, relay_addr: str | None, tls: relay_tls.RelayTLS | None = None
) -> CellsFrontend:
    """Wrap the KV v2 routes at secret/ of `router` with homes and replica ages, and
    add sys/cells (the cell directory: service discovery for clients)."""
    front = CellsFrontend(services, relay_addr, tls=tls)

    def cells(ctx: Context) -> dict[str, Any]:
        entries = directory_mod.load(services.barrier)
        now = time.time()
        return {
            "cell": front.cell,
            "cells": {
                cell: {
                    **{k: v for k, v in entry.record.as_json().items() if k != "cell"},
                    # the entry is refreshed every 30 s: much older, the cell has gone quiet
                    "age_seconds": round(max(0.0, now - entry.record.updated_at), 3),
                }
                for cell, entry in sorted(entries.items())
                if not entry.removed
            },
        }

    record = obj(
        {
            "api": STR,
            "relays": STR_LIST,
            "fingerprint": STR,
            "public_key": STR,
            "health": STR,
            "updated_at": {"type": "number"},
            "age_seconds": {"type": "number"},
        }
    )
    router.add(
        r"sys/cells",
        {Operation.READ: cells},
        family="sys",
        doc=RouteDoc(
            "/sys/cells",
            "The cell directory: every cell's API, relays, sealing-key fingerprint and health.",
            operations={
                Operation.READ: OperationDoc(
                    "List the cells",
                    "This cell's replica of the directory CRDT the relays gossip.",
                    responses=ok(
                        obj({"cell": STR, "cells": {"type": "object", "additionalProperties": record}})
                    ),
                )
            },
        ),
    )

    def read_home(ctx: Context) -> dict[str, Any]:
        path = front.replicas.full_path(ctx.params["path"])
        home = front.replicas.confirmed_home(path)
        if home is None:
            raise NotFound(f"no home is known for {path} in this cell")
        return {**home.as_json(), "path": path, "replica_age": front.replicas.age(path)}

    def move_home(ctx: Context) -> dict[str, Any]:
        to = ctx.data.get("to")
        if not isinstance(to, str) or not to:
            raise InvalidRequest("'to' names the cell that becomes the home")
        return front.handover(ctx.params["path"], to)

    home_schema = obj({"home": STR, "epoch": {"type": "integer"}, "state": STR, "to": STR, "path": STR})
    router.add(
        r"sys/homes/secret/(?P<path>.+)",
        {Operation.READ: read_home, Operation.UPDATE: move_home},
        family="sys",
        sudo=True,
        doc=RouteDoc(
            "/sys/homes/secret/{path}",
            "A KV secret's home cell, and moving it (fenced, two steps).",
            params={"path": "The secret's path under secret/ (may span segments)."},
            operations={
                Operation.READ: OperationDoc("Read a secret's home", responses=ok(home_schema)),
                Operation.UPDATE: OperationDoc(
                    "Move a secret's home",
                    "Run in the current home: it stops taking writes, copies the secret to the new "
                    "home, which takes over at the next epoch.",
                    body=obj({"to": STR}, ("to",)),
                    body_required=True,
                    responses=ok(home_schema),
                ),
            },
        ),
    )
    for route in router.routes:
        pattern = route.pattern.pattern
        if pattern.startswith("secret/data/"):
            _wrap_reads(route.handlers, front)
        for prefix, ops in _CHANGES.items():
            if pattern.startswith(prefix):
                for operation, extract in ops.items():
                    if operation in route.handlers:
                        route.handlers[operation] = _forwarding(front, extract)
    return front


def _wrap_reads(handlers: dict[Operation, Any], front: CellsFrontend) -> None:
    read = handlers[Operation.READ]

    def read_with_age(ctx: Context) -> Result:
        age, home = front.before_read(ctx.params["path"], ctx.request.headers.get(MAX_STALENESS_HEADER))
        data = read(ctx)
        headers = {HOME_HEADER: home} if home else {}
        if age is not None:
            headers[AGE_HEADER] = f"{age:.3f}"
        return Result(data=data, headers=headers)

    handlers[Operation.READ] = read_with_age


# What each KV route's change is, with its arguments taken from the request as
# control_plane/engines/kv/routes.py and control_plane/engines/transit/routes.py takes them: (kvchange op, args).
Extract = Callable[[Context], tuple[str, dict[str, Any]]]


def _options(ctx: Context) -> dict[str, Any]:
    options = ctx.data.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'options' must be a map")
    return options


def _data(op: str) -> Extract:
    def extract(ctx: Context) -> tuple[str, dict[str, Any]]:
        if "data" not in ctx.data:
            raise InvalidRequest("no data provided")
        return op, {"data": ctx.data["data"], "cas": _options(ctx).get("cas")}

    return extract


def _versions(op: str) -> Extract:
    return lambda ctx: (op, {"versions": ctx.data.get("versions")})


def _metadata(op: str) -> Extract:
    names = ("max_versions", "cas_required", "delete_version_after", "custom_metadata")
    return lambda ctx: (op, {name: ctx.data.get(name) for name in names})


def _bare(op: str) -> Extract:
    return lambda ctx: (op, {})


_CHANGES: dict[str, dict[Operation, Extract]] = {
    "secret/data/": {
        Operation.UPDATE: _data("write"),
        Operation.PATCH: _data("patch"),
        Operation.DELETE: _bare("delete_latest"),
    },
    "secret/delete/": {Operation.UPDATE: _versions("delete_versions")},
    "secret/undelete/": {Operation.UPDATE: _versions("undelete_versions")},
    "secret/destroy/": {Operation.UPDATE: _versions("destroy_versions")},
    "secret/metadata/": {
        Operation.UPDATE: _metadata("write_metadata"),
        Operation.PATCH: _metadata("patch_metadata"),
        Operation.DELETE: _bare("delete_metadata"),
    },
}


def _forwarding(front: CellsFrontend, extract: Extract) -> Callable[[Context], dict[str, Any] | None]:
    def change(ctx: Context) -> dict[str, Any] | None:
        view = getattr(front.services, "freshness", None)
        if view is not None and ctx.entry is not None:  # the mount's bound (issue 18), before any work
            enforce(view, front.services.kv.stale_bound(), ctx.entry.cell, "secret/")
        op, args = extract(ctx)
        return front.change(ctx.params["path"], op, args)

    return change

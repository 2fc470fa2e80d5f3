"""The router: Vault's HTTP API semantics over the engines, independent of any web framework.

A `Request` (method, path under /v1/, JSON data, token, headers) goes in, a `Response`
(status, Vault-shaped JSON body, headers) comes out. In between, for every route:

1. find the route (a path pattern per endpoint family) and the operation
   (GET read, LIST or GET ?list=true list, POST/PUT create-or-update, DELETE, PATCH);
2. unless the route is unauthenticated (sys/init, sys/unseal, sys/health, ...):
   refuse when sealed (503), look the token up (revoked tokens are refused by the
   token store, which checks the cell's local revocation set: no network), and
   check the ACL for the path and operation (403 otherwise; `sudo` where Vault asks);
3. call the handler, which calls an engine and returns Vault's `data` (or `auth`);
4. wrap the response when `X-Vault-Wrap-TTL` asks for it;
5. shape Vault's envelope, or `{"errors": [...]}` with the status the error carries.
   Anything unexpected is logged by type and answered 500 with no detail.

`functions/` adapts Chalice (on Lambda, under `chalice local`, or self-hosted) to this.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from keycell.control_plane.barrier import SealedError
from keycell.control_plane.errors import (
    InvalidRequest,
    PermissionDenied,
    RequestError,
    UnsupportedOperation,
)
from keycell.control_plane.freshness import STALENESS_HEADER, bound_from_record, enforce, header_value
from keycell.control_plane.keys import KeyBackendError
from keycell.control_plane.ledger import InvalidItemError, InvalidKeyError, LedgerUnavailableError

log = logging.getLogger("keycell.router")


class Operation(StrEnum):
    READ = "read"
    LIST = "list"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    PATCH = "patch"


# POST and PUT are "create or update": the ACL accepts either capability unless the
# route says which (Vault decides by whether the path exists).
_WRITE = (Operation.CREATE, Operation.UPDATE)
_READS = (Operation.READ, Operation.LIST)


@dataclass
class Request:
    method: str  # GET, POST, PUT, DELETE, PATCH, LIST
    path: str  # below /v1/, no leading slash
    data: dict[str, Any] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    token: str | None = None
    remote_addr: str = ""

    @property
    def operation(self) -> Operation:
        method = self.method.upper()
        if method == "LIST" or (method == "GET" and self.query.get("list") in ("true", "1")):
            return Operation.LIST
        return {
            "GET": Operation.READ,
            "HEAD": Operation.READ,
            "POST": Operation.UPDATE,
            "PUT": Operation.UPDATE,
            "DELETE": Operation.DELETE,
            "PATCH": Operation.PATCH,
        }.get(method, Operation.READ)


@dataclass
class Response:
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)
    text: str | bytes | None = None  # a non-JSON body (sys/metrics, DER); Content-Type in `headers`


@dataclass
class Result:
    """What a handler returns when `data` alone is not enough."""

    data: dict[str, Any] | None = None
    auth: dict[str, Any] | None = None
    lease_id: str = ""
    lease_duration: int = 0
    renewable: bool = False
    warnings: list[str] | None = None
    status: int | None = None  # overrides 200/204
    raw: dict[str, Any] | None = None  # a body that is not Vault's envelope (sys/health, sys/init)
    text: str | bytes | None = None  # text or bytes instead of JSON (sys/metrics, a DER CRL)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """What a handler sees: the request, its route's captures, and who is asking."""

    request: Request
    params: dict[str, str]
    token: str | None = None
    entry: Any = None  # the caller's TokenEntry (None on unauthenticated routes)
    acl: Any = None

    @property
    def data(self) -> dict[str, Any]:
        return self.request.data


Handler = Callable[[Context], "dict[str, Any] | Result | None"]


# --- documentation (sys/openapi is generated from the route table) --------------------------

JsonSchema = dict[str, Any]


@dataclass(frozen=True)
class Content:
    """A response body that is not JSON (sys/metrics' Prometheus text)."""

    media_type: str
    schema: JsonSchema = field(default_factory=lambda: {"type": "string"})


# A documented response: a JSON schema (application/json), a `Content`, or None (no body).
ResponseDoc = JsonSchema | Content | None


@dataclass(frozen=True)
class OperationDoc:
    """One operation of a route as sys/openapi documents it. Error responses (400, 403,
    404, 405, 429, 503 with Vault's `{"errors": [...]}`) are added to every operation."""

    summary: str = ""
    description: str = ""
    body: JsonSchema | None = None  # the request body's JSON schema; None: none is read
    body_required: bool = False
    query: dict[str, JsonSchema] = field(default_factory=dict)  # optional query parameters
    headers: dict[str, JsonSchema] = field(default_factory=dict)  # required request headers
    # The successful responses by status ("default" for a client-chosen status).
    responses: dict[int | str, ResponseDoc] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteDoc:
    """How a route appears in sys/openapi. `path` is the OpenAPI template below /v1/
    (`/secret/data/{path}`); `more_paths` are further templates the same pattern serves
    (an optional trailing segment such as transit's `/sign/{name}/{hash}`). `params`
    describes the path parameters; a parameter that may span segments (a KV path like
    `app/db`) says so there. `token_accepted` marks an unauthenticated route that still
    reads X-Vault-Token (the wrapping endpoints take the wrapping token that way)."""

    path: str
    summary: str = ""
    description: str = ""
    params: dict[str, str] = field(default_factory=dict)
    param_schemas: dict[str, JsonSchema] = field(default_factory=dict)  # default: a non-empty string
    operations: dict[Operation, OperationDoc] = field(default_factory=dict)
    more_paths: tuple[str, ...] = ()
    token_accepted: bool = False


@dataclass
class Route:
    pattern: re.Pattern[str]
    handlers: dict[Operation, Handler]
    authenticated: bool = True
    sudo: bool = False  # Vault marks some sys paths root-protected
    wrappable: bool = True
    family: str = ""  # for metrics: "kv", "sys", "auth", ...
    # For POST/PUT, which capability to require: None accepts create or update.
    write_capability: Callable[[Context], Operation] | None = None
    doc: RouteDoc | None = None  # for sys/openapi
    # READ and LIST here change nothing (no lease, no credential, no counter): one
    # audit entry after the answer suffices, as an unrecorded answer is withheld.
    pure_reads: bool = False


class Router:
    """Routes are added by the route modules (`control_plane.routes`)."""

    def __init__(self, services: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.clock = clock
        # path -> the router of the enabled mount that path is under, or None.
        self.mounted: Callable[[str], Router | None] | None = None
        # every enabled mount's router, for sys/openapi (routes/mounts.py sets both)
        self.mounted_routers: Callable[[], list[Router]] | None = None
        self.routes: list[Route] = []
        self._by_mount: dict[str, list[Route]] = {}
        self._unindexed: list[Route] = []
        self._by_mount_count = -1
        self.observers: list[Callable[[Request, Route | None, int, float], None]] = []
        # control_plane.audit.Auditor (None: not audited): `before` once the caller is
        # known and before the handler runs, `after` with the response.
        self.auditor: Any = None

    def add(
        self,
        pattern: str,
        handlers: dict[Operation, Handler],
        *,
        authenticated: bool = True,
        sudo: bool = False,
        wrappable: bool = True,
        family: str = "",
        write_capability: Callable[[Context], Operation] | None = None,
        doc: RouteDoc | None = None,
        pure_reads: bool = False,
    ) -> None:
        self.routes.append(
            Route(
                re.compile(pattern + r"\Z"),
                handlers,
                authenticated,
                sudo,
                wrappable,
                family or pattern.split("/")[0],
                write_capability,
                doc,
                pure_reads,
            )
        )

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        # Routes are tried in the order they were added, but only those whose literal
        # first segment (the mount: sys, auth, secret, transit) is the path's own.
        if self._by_mount_count != len(self.routes):
            self._index_routes()
        candidates = self._by_mount.get(path.split("/", 1)[0], self._unindexed)
        for route in candidates:
            found = route.pattern.match(path)
            if found is not None:
                return route, {k: v for k, v in found.groupdict().items() if v is not None}
        # Not a built-in path: the mount enabled at its longest prefix, if any
        # (routes/mounted.py builds each enabled mount's own routes).
        mounted = self.mounted(path) if self.mounted is not None else None
        return mounted.match(path) if mounted is not None else None

    def static_mounts(self) -> set[str]:
        """The first path segments the built-in routes answer under ("sys", "secret",
        "auth", ...): no mount can be enabled over them."""
        if self._by_mount_count != len(self.routes):
            self._index_routes()
        return set(self._by_mount)

    def _index_routes(self) -> None:
        by_mount: dict[str, list[Route]] = {}
        unindexed: list[Route] = []
        for route in self.routes:
            head = re.match(r"[A-Za-z0-9_-]+/", route.pattern.pattern)
            if head is None:
                unindexed.append(route)
            else:
                by_mount.setdefault(head.group(0)[:-1], []).append(route)
        # A route whose mount is not a plain literal could match any path: keep order.
        for mount, routes in by_mount.items():
            by_mount[mount] = [r for r in self.routes if r in routes or r in unindexed]
        self._by_mount, self._unindexed, self._by_mount_count = by_mount, unindexed, len(self.routes)

    # --- the request path -------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """One request, start to finish; audit entries are committed on this thread."""
        steps = self.steps(request)
        try:
            record = next(steps)
            while True:
                record = steps.send(self.auditor.commit(record))
        except StopIteration as done:
            response: Response = done.value
            return response

    async def handle_async(
        self, request: Request, commit: Callable[[dict[str, Any]], Awaitable[bool]]
    ) -> Response:
        """The same request path for an event loop: `commit` (an audit.AsyncCommitter's)
        chains each audit entry off the loop, in a batch with the entries of every other
        request in flight; the engine work runs on the loop, as it does unaudited."""
        steps = self.steps(request)
        try:
            record = next(steps)
            while True:
                record = steps.send(await commit(record))
        except StopIteration as done:
            response: Response = done.value
            return response

    def steps(self, request: Request) -> Generator[dict[str, Any], bool, Response]:
        """The request path as steps: with an auditor, it yields each audit record (the
        request entry, before the handler runs; the response entry, at the end) and
        takes back whether the entry was committed (or may be skipped: fail-open)."""
        started = time.perf_counter()
        request_id = str(uuid.uuid4())
        matched: Route | None = None
        ctx: Context | None = None
        auditor = self.auditor
        try:
            operation = request.operation
            request.path, acl_path = acl_paths(request.path, operation)
            # Before matching: a path under an enabled mount is resolved through the
            # mount table, which this process can read only once its barrier is open.
            self.services.ensure_unsealed()  # HSM seal mode: a fresh process opens the barrier itself
            found = self.match(request.path)
            if found is None:
                raise UnsupportedOperation(f"no handler for route {request.path!r}", status=404)
            matched, params = found
            handler = matched.handlers.get(operation)
            if handler is None:
                raise UnsupportedOperation(f"unsupported operation {operation.value!r} on {request.path!r}")
            ctx = Context(request, params)
            if matched.authenticated:
                self._authenticate(ctx, matched, operation, acl_path)
            if (
                auditor is not None
                and not (matched.pure_reads and operation in _READS)
                and not (yield auditor.request_record(ctx, request_id))
            ):
                auditor.refuse()  # fail closed: raises Unavailable (503), the handler never runs
            result = handler(ctx)
            response = self._shape(request_id, request, matched, result)
        except RequestError as exc:
            response = self._error(request_id, exc.status, exc.message, exc.data)
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                response.headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        except SealedError:
            response = self._error(request_id, 503, "Vault is sealed")
        except LedgerUnavailableError as exc:
            log.warning("ledger unavailable on %s: %s", request.path, type(exc).__name__)
            response = self._error(request_id, 503, "the cell's ledger is unavailable; retry later")
        except KeyBackendError as exc:
            # The HSM refused or failed: a dependency, not the client's input.
            log.warning("key backend error on %s: %s", request.path, type(exc).__name__)
            response = self._error(request_id, 503, "the cell's key backend is unavailable; retry later")
        except Exception as exc:  # a bug: never leak detail, always log the type
            log.exception("internal error on %s %s (%s)", request.method, request.path, type(exc).__name__)
            response = self._error(request_id, 500, "internal error")
        if ctx is not None and ctx.entry is not None:
            self._stamp_staleness(response)
        elapsed = time.perf_counter() - started
        if auditor is not None and not (
            yield auditor.response_record(request_id, request, ctx, response, elapsed)
        ):
            response = auditor.withheld()
        for observe in self.observers:
            observe(request, matched, response.status, elapsed)
        return response

    def _stamp_staleness(self, response: Response) -> None:
        """Every authenticated answer says how stale this cell's revocation view may be
        (freshness.py): the max over peers, in seconds."""
        view = getattr(self.services, "freshness", None)
        if view is None:
            return
        try:
            response.headers[STALENESS_HEADER] = header_value(view.staleness())
        except (LedgerUnavailableError, SealedError):
            response.headers[STALENESS_HEADER] = "inf"  # unknown is as stale as it gets

    def _authenticate(self, ctx: Context, route: Route, operation: Operation, path: str) -> None:
        services = self.services
        if services.barrier.sealed:
            raise SealedError()
        token = ctx.request.token
        if not token:
            raise PermissionDenied("permission denied: no token; send X-Vault-Token")
        entry = services.tokens.use(token)  # counts a use of a use-limited token
        if entry.stale_bound and getattr(services, "freshness", None) is not None:
            # the token's role bounds how stale this cell's revocation view may be (issue 18)
            enforce(services.freshness, bound_from_record(entry.stale_bound), entry.cell, "refused")
        acl = services.policies.acl_for(entry.policies)
        if operation in _WRITE:
            candidates = list(_WRITE)
            # Whether a write creates or updates costs a read of what is there (KV's
            # data_exists): asked only when the policy grants one but not the other.
            if route.write_capability and not all(acl.allows(path, c.value) for c in candidates):
                wanted = route.write_capability(ctx)
                if wanted is not None:
                    candidates = [wanted]
            allowed = any(acl.allows(path, c.value) for c in candidates)
        else:
            allowed = acl.allows(path, operation.value)
        if allowed and route.sudo:
            allowed = acl.allows(path, "sudo")
        if not allowed:
            raise PermissionDenied(f"permission denied: {operation.value} on {path!r}")
        ctx.token, ctx.entry, ctx.acl = token, entry, acl

    def _shape(
        self, request_id: str, request: Request, route: Route, result: dict[str, Any] | Result | None
    ) -> Response:
        if not isinstance(result, Result):
            result = Result(data=result)
        if result.raw is not None:
            return Response(result.status or 200, result.raw, result.headers)
        if result.text is not None:
            headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8", **result.headers}
            return Response(result.status or 200, None, headers, text=result.text)
        wrap_ttl = request.headers.get("x-vault-wrap-ttl")
        if wrap_ttl and route.wrappable and (result.data is not None or result.auth is not None):
            ttl = self.services.wrapping_ttl(wrap_ttl)
            inner = self._envelope(request_id, result)
            # Vault names the accessor of a token (or AppRole secret ID) the response carries.
            accessor = str(
                (result.auth or {}).get("accessor") or (result.data or {}).get("secret_id_accessor") or ""
            )
            wrap_info = self.services.wrapping.wrap(
                inner, ttl=ttl, creation_path=request.path, wrapped_accessor=accessor
            )
            body = self._envelope(request_id, Result())
            body["wrap_info"] = wrap_info
            return Response(200, body, result.headers)
        if result.data is None and result.auth is None and result.warnings is None:
            return Response(result.status or 204, None, result.headers)
        return Response(result.status or 200, self._envelope(request_id, result), result.headers)

    @staticmethod
    def _envelope(request_id: str, result: Result) -> dict[str, Any]:
        return {
            "request_id": request_id,
            "lease_id": result.lease_id,
            "renewable": result.renewable,
            "lease_duration": result.lease_duration,
            "data": result.data,
            "wrap_info": None,
            "warnings": result.warnings,
            "auth": result.auth,
            "mount_type": "",
        }

    @staticmethod
    def _error(request_id: str, status: int, message: str, data: dict[str, Any] | None = None) -> Response:
        body: dict[str, Any] = {"errors": [message] if status != 404 or data is None else []}
        if data is not None:
            body.update({"request_id": request_id, "data": data})
        return Response(status, body)


def acl_paths(path: str, operation: Operation) -> tuple[str, str]:
    """The path routes match (no trailing slash) and the path the ACL checks. A list is
    checked as Vault checks it, on the folder with its trailing "/" (so a rule for
    "team/" grants LIST team and LIST team/, and sys/capabilities-self on "team/" says
    what LIST does); anything else on the path the handler acts on, so a rule for
    "conf/" never grants a read of "conf". An empty segment ("a//b", also "a/%2Fb" once
    decoded) is refused here, before routing: it would name a second path for the same
    secret, and a `+` rule would match it."""
    path = path.removeprefix("/")
    if "" in path.split("/")[:-1]:
        raise InvalidRequest("invalid path: it has an empty segment ('//')")
    routed = path.removesuffix("/")
    return routed, routed + "/" if operation is Operation.LIST else routed


# --- helpers the route modules share ------------------------------------------------------


def field_int(data: Mapping[str, Any], name: str, default: int | None = None) -> int | None:
    """An integer field that clients may send as a number or a numeric string."""
    value = data.get(name, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise InvalidRequest(f"{name!r} must be an integer")


def field_bool(data: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = data.get(name, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidRequest(f"{name!r} must be a boolean")


def field_str(data: Mapping[str, Any], name: str, default: str | None = None) -> str | None:
    value = data.get(name, default)
    if value is None or isinstance(value, str):
        return value
    raise InvalidRequest(f"{name!r} must be a string")


def field_list(data: Mapping[str, Any], name: str) -> list[str]:
    """A list of strings, sent as a JSON list or a comma-separated string (as Vault allows)."""
    value = data.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidRequest(f"{name!r} must be a list of strings")


def client_errors(handler: Handler) -> Handler:
    """Ledger refusals a request can cause (an unprintable name, a value too large) are
    the client's: 400, nothing written."""

    def wrapped(ctx: Context) -> Any:
        try:
            return handler(ctx)
        except (InvalidKeyError, InvalidItemError) as exc:
            raise InvalidRequest(f"refused: {exc}") from None

    return wrapped


def add_refusing_bad_input(
    router: Router, pattern: str, handlers: dict[Operation, Handler], **options: Any
) -> None:
    """`router.add`, with each handler's ledger refusals answered as the client's (400)."""
    router.add(pattern, {op: client_errors(h) for op, h in handlers.items()}, **options)

"""Fuzzing the API as an outsider would, over real HTTP against `keycell server`
(uvicorn, one worker) on 127.0.0.1: no request input may produce a 5xx (issue 20).

- schemathesis against the served OpenAPI document (GET /v1/sys/openapi): every
  documented operation with the stateless checks (no 5xx, and every response conforms
  to the spec: status code, content type, body schema), positive and negative data;
- a fuzz of the request-body parser (hypothesis): arbitrary bytes, JSON of every
  shape, nesting far past the depth limit, truncated and mutated bodies, first into
  the parser in process, then POSTed and PUT to the cell's write paths.

Generation is bounded by KEYCELL_FUZZ_EXAMPLES (examples per operation and mode; 25
in `make test`, no shrinking); `make fuzz` runs the same tests bigger and each prints
how many cases ran and how many answered 5xx (must be 0).

Two servers, because some operations would take the server under test away:
- a dev server (initialized, unsealed, a root token) for everything but the seal
  lifecycle;
- a Shamir-sealed server of its own for sys/init, sys/unseal, sys/seal and sys/rekey/*:
  sys/seal would seal the dev server (every later request 503) and a rekey would
  replace its recovery keys. This server is initialized by the test, which keeps its
  shares and unseals it again before each case, so sys/seal is exercised too.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.mounts import Mount
from keycell.control_plane.router import Operation, Router
from keycell.control_plane.routes import build_router
from keycell.control_plane.routes.mounts import MountedRoutes
from keycell.control_plane.routes.openapi import documented_operations
from keycell.control_plane.services import CellServices
from keycell.functions.api import http
from keycell.testing.processes import keycell_server

ROOT = "kc.dev-root-token-for-schemathesis"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = int(os.environ.get("KEYCELL_FUZZ_EXAMPLES", "25"))  # per operation and generation mode
SPEC_PATH = "/v1/sys/openapi"
CALLS: Counter[tuple[str, str]] = Counter()  # requests sent, by operation
SERVER_ERRORS: Counter[tuple[str, str]] = Counter()  # 5xx answers the client did not ask for, by operation
# Operations that change the seal (or the shares): fuzzed on a server of their own.
SEAL_LIFECYCLE = {
    ("GET", "/sys/init"),
    ("POST", "/sys/init"),
    ("POST", "/sys/unseal"),
    ("POST", "/sys/seal"),
    ("GET", "/sys/rekey/init"),
    ("POST", "/sys/rekey/init"),
    ("DELETE", "/sys/rekey/init"),
    ("POST", "/sys/rekey/update"),
}


# Engines and auth methods enabled on the dev server before it is fuzzed, so the routes
# of enabled mounts (which sys/openapi documents to a token that may read sys/mounts)
# are fuzzed too: (table, path, type).
FUZZ_MOUNTS = (
    ("mounts", "kv-fuzz", "kv-v2"),
    ("mounts", "transit-fuzz", "transit"),
    ("mounts", "pki-fuzz", "pki"),
    ("auth", "approle", "approle"),
    ("auth", "kubernetes", "kubernetes"),
)


@pytest.fixture(scope="module")
def dev_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = keycell_server(tmp_path_factory.mktemp("openapi-dev"), dev_root_token=ROOT, workers=1)
    port = server.start()
    url = f"http://127.0.0.1:{port}"
    for table, path, kind in FUZZ_MOUNTS:
        enabled = requests.post(
            f"{url}/v1/sys/{table}/{path}", headers={"X-Vault-Token": ROOT}, json={"type": kind}, timeout=30
        )
        assert enabled.status_code == 204, enabled.text
    try:
        yield url
    finally:
        log = server.log_tail(20000)
        server.stop()
        if "Traceback" in log:  # a 5xx's cause, shown with the failure
            print(log)


class SealedServer:
    """A Shamir-sealed server the test initialized: its shares and root token."""

    def __init__(self, url: str) -> None:
        self.url = url
        body = requests.post(
            f"{url}/v1/sys/init", json={"secret_shares": 3, "secret_threshold": 2}, timeout=30
        )
        body.raise_for_status()
        self.keys: list[str] = body.json()["keys"]
        self.root: str = body.json()["root_token"]
        self.unseal()

    def unseal(self) -> None:
        status = requests.get(f"{self.url}/v1/sys/seal-status", timeout=30).json()
        if not status["sealed"]:
            return
        requests.post(f"{self.url}/v1/sys/unseal", json={"reset": True}, timeout=30).raise_for_status()
        for key in self.keys[:2]:
            requests.post(f"{self.url}/v1/sys/unseal", json={"key": key}, timeout=30).raise_for_status()
        assert requests.get(f"{self.url}/v1/sys/seal-status", timeout=30).json()["sealed"] is False


@pytest.fixture(scope="module")
def sealed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SealedServer]:
    server = keycell_server(tmp_path_factory.mktemp("openapi-sealed"), workers=1)
    port = server.start()
    try:
        yield SealedServer(f"http://127.0.0.1:{port}")
    finally:
        server.stop()


def route_table(folder: Path) -> Router:
    """The route table of a real cell (SQLite ledger, software keys) in `folder`."""
    ledger = SqliteLedger(folder / "cell.db")
    return build_router(CellServices(ledger, lambda barrier: SoftwareKeyBackend(store=barrier)))


def mounted_route_tables(router: Router) -> list[Router]:
    """The route sets FUZZ_MOUNTS's mounts have (built as the server builds them)."""
    built = MountedRoutes(router.services, {})
    kinds = {"kv-v2": "kv"}
    return [
        built.build(
            Mount(
                path=f"{path}/",
                type=kinds.get(kind, kind),
                uuid="",
                accessor="",
                description="",
                options=None,
                default_lease_ttl=0,
                max_lease_ttl=0,
                builtin=False,
            ),
            table == "auth",
        )
        for table, path, kind in FUZZ_MOUNTS
    ]


def _label(operation: Any) -> tuple[str, str]:
    return operation.method.upper(), operation.path


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(
    operation: Any,
    base_url: str,
    headers: Callable[[], dict[str, str]],
    before: Callable[[], None] | None = None,
) -> list[str]:
    """Run the checks on `operation`, positive then negative data; the failures found."""
    failures: list[str] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            _fuzz_mode(operation, mode, base_url, headers, before, failures)
        except Unsatisfiable:
            # Negative data needs something to break: an operation without parameters
            # or body has none (GET sys/init).
            assert mode is GenerationMode.NEGATIVE, operation.label
    return failures


def _fuzz_mode(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    headers: Callable[[], dict[str, str]],
    before: Callable[[], None] | None,
    failures: list[str],
) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=timedelta(seconds=5),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report the first failure as found
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if failures:
            return  # one failure per operation is enough to report
        if before is not None:
            before()
        checks = CHECKS
        if _label(operation) == ("GET", "/sys/health") and _asks_for_5xx(case):
            # sys/health answers the status code the client chose (Vault's activecode,
            # sealedcode, ...): a 5xx asked for is not a server error.
            checks = [check for check in CHECKS if check is not not_a_server_error]
        sent = headers()
        CALLS[_label(operation)] += 1
        try:
            response = case.call(base_url=base_url, headers=sent, timeout=15)
            if response.status_code >= 500 and not_a_server_error in checks:
                SERVER_ERRORS[_label(operation)] += 1
            case.validate_response(response, checks=checks)
        except (Exception, FailureGroup) as exc:  # a failed check, or the server went away
            curl = case.as_curl_command(headers=sent)
            failures.append(f"{' '.join(_label(operation))} [{mode.value}]: {exc}\n  {curl}")

    run()


@pytest.mark.timeout(900)  # every documented operation, fuzzed: minutes on two loaded cores
def test_every_operation_passes_schemathesis(
    dev_url: str, sealed_server: SealedServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    schema = schemathesis.openapi.from_url(dev_url + SPEC_PATH, timeout=30, headers={"X-Vault-Token": ROOT})
    operations = _operations(schema)
    # schemathesis leaves out the endpoint the document was loaded from: take it from
    # the same document loaded as a dict, so that sys/openapi is fuzzed too.
    assert ("GET", "/sys/openapi") not in {_label(op) for op in operations}
    same = _operations(schemathesis.openapi.from_dict(schema.raw_schema))
    operations += [op for op in same if _label(op) == ("GET", "/sys/openapi")]
    router = route_table(tmp_path_factory.mktemp("routes"))
    expected = sum(
        len(documented_operations(route)) * (1 + len(route.doc.more_paths))
        for table in (router, *mounted_route_tables(router))
        for route in table.routes
        if route.doc is not None
    )
    assert len(operations) == expected
    for _, path, _ in FUZZ_MOUNTS:  # every enabled mount's routes are in the spec, and fuzzed
        assert any(
            _label(op)[1].startswith(f"/{path}/") or f"/auth/{path}/" in _label(op)[1] for op in operations
        )

    def root_headers() -> dict[str, str]:
        return {"X-Vault-Token": ROOT}

    def fresh_token() -> dict[str, str]:
        # revoke-self would revoke the root token: each case gets a token of its own.
        reply = requests.post(f"{dev_url}/v1/auth/token/create", headers=root_headers(), json={}, timeout=15)
        return {"X-Vault-Token": reply.json()["auth"]["client_token"]}

    failures: list[str] = []
    tested: set[tuple[str, str]] = set()
    for operation in operations:
        label = _label(operation)
        if label in SEAL_LIFECYCLE:
            failures += _fuzz(
                operation,
                sealed_server.url + "/v1",
                lambda: {"X-Vault-Token": sealed_server.root},
                before=sealed_server.unseal,
            )
        elif label == ("POST", "/auth/token/revoke-self"):
            failures += _fuzz(operation, dev_url + "/v1", fresh_token)
        else:
            failures += _fuzz(operation, dev_url + "/v1", root_headers)
        tested.add(label)

    assert len(tested) == len(operations) == expected
    # Every operation was really called (at least once; most MAX_EXAMPLES times per mode).
    assert {label for label, count in CALLS.items() if count > 0} == tested
    assert tested >= SEAL_LIFECYCLE
    # The dev server is still usable: nothing the fuzzing sent took it away.
    health = requests.get(f"{dev_url}/v1/sys/health", timeout=15)
    assert health.status_code == 200
    print(
        f"\nfuzz: schemathesis {sum(CALLS.values())} cases over {len(tested)} operations, "
        f"{sum(SERVER_ERRORS.values())} answered 5xx"
    )
    assert sum(SERVER_ERRORS.values()) == 0, dict(SERVER_ERRORS)
    assert not failures, f"{len(failures)} operation(s) failed:\n\n" + "\n\n".join(failures)


def test_enabled_mounts_are_documented_only_to_a_token_that_may_read_sys_mounts(dev_url: str) -> None:
    def paths(headers: dict[str, str]) -> set[str]:
        reply = requests.get(dev_url + SPEC_PATH, headers=headers, timeout=15)
        assert reply.status_code == 200
        spec = reply.json()
        schemathesis.openapi.from_dict(spec).validate()
        return set(spec["paths"])

    def mounted(found: set[str]) -> set[str]:
        return {
            p for p in found for _, path, _ in FUZZ_MOUNTS if p.startswith((f"/{path}/", f"/auth/{path}/"))
        }

    default_only = requests.post(
        f"{dev_url}/v1/auth/token/create",
        headers={"X-Vault-Token": ROOT},
        json={"policies": ["default"]},
        timeout=15,
    ).json()["auth"]["client_token"]
    assert mounted(paths({})) == set()
    assert mounted(paths({"X-Vault-Token": "not-a-token"})) == set()
    assert mounted(paths({"X-Vault-Token": default_only})) == set()
    with_mounts = paths({"X-Vault-Token": ROOT})
    assert {"/kv-fuzz/data/{path}", "/transit-fuzz/keys/{name}", "/auth/approle/login"} <= mounted(
        with_mounts
    )
    assert paths({}) <= with_mounts  # the built-in routes are documented to everyone


def test_spec_is_valid_openapi_31_and_documents_every_route(dev_url: str, tmp_path: Path) -> None:
    reply = requests.get(dev_url + SPEC_PATH, timeout=15)  # no token: the spec is public
    assert reply.status_code == 200
    spec = reply.json()
    assert spec["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(spec)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    operations = _operations(schema)  # every operation loads (no invalid schema inside)

    router = route_table(tmp_path)
    undocumented = [route.pattern.pattern for route in router.routes if route.doc is None]
    assert undocumented == []
    documented = {_label(op) for op in operations}
    for route in router.routes:
        assert route.doc is not None
        for template in (route.doc.path, *route.doc.more_paths):
            # The template leads back to this very route (no other pattern shadows it) ...
            concrete = template.strip("/").format(**{name: _sample(name) for name in _params(template)})
            found = router.match(concrete)
            assert found is not None and found[0] is route, template
            # ... and each of its operations is in the served spec, LIST as GET ?list=true.
            for method, ops in documented_operations(route).items():
                assert (method.upper(), template) in documented, (method, template)
                item = spec["paths"][template][method]
                if ops == [Operation.LIST]:
                    assert any(p["name"] == "list" and p["required"] for p in item["parameters"])
                secured = item["security"]
                assert (secured == []) is (not route.authenticated and not route.doc.token_accepted)


def _asks_for_5xx(case: Any) -> bool:
    code = str((case.query or {}).get("activecode", ""))
    return code.isdigit() and int(code) >= 500


def _params(template: str) -> list[str]:
    return [part[1:-1] for part in template.split("/") if part.startswith("{")]


def _sample(name: str) -> str:
    return {"hash": "sha2-256", "path": "app/db", "lease": "auth/token/create/abc", "prefix": "auth/jwt"}.get(
        name, "sample"
    )


# --- the request-body parser ----------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    """Nesting around the depth limit and far past it, closed or not."""
    depth = draw(
        st.integers(1, 3)
        | st.integers(http.MAX_JSON_DEPTH - 3, http.MAX_JSON_DEPTH + 3)
        | st.integers(1, 50_000)
    )
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'{"data":{"v":[', b"]}}")]))
    body = opener * depth + draw(st.sampled_from([b"1", b'""', b"", b"[]"]))
    return body + (closer * depth if draw(st.booleans()) else b"")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid JSON object, cut short, with bytes flipped or inserted."""
    body = bytearray(json.dumps({"data": draw(JSON_VALUES)}).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["flip", "insert", "cut"]))
        if action == "cut":
            del body[at:]
        elif action == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif at < len(body):
            body[at] ^= draw(st.integers(1, 255))
    return bytes(body)


BODIES = (
    st.binary(max_size=512)
    | JSON_VALUES.map(lambda value: json.dumps(value).encode())
    | st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6).map(
        lambda value: json.dumps(value).encode()
    )
    | st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass"))
    | st.sampled_from(
        [b"NaN", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1' + b"0" * 5000 + b"}", b"\xef\xbb\xbf{}"]
    )
    | deep()
    | mutated()
)
# Write paths a body reaches (none that revokes: a body must not take the root token away).
BODY_PATHS = [
    "secret/data/fuzz",
    "secret/metadata/fuzz",
    "secret/config",
    "transit/keys/fuzz",
    "transit/encrypt/fuzz",
    "auth/token/create",
    "auth/token/lookup",
    "auth/jwt/login",
    "sys/policies/acl/fuzz",
    "sys/wrapping/wrap",
    "sys/leases/lookup",
    "sys/capabilities-self",
    "identity/entries",
    "database/roles/fuzz",
]


@settings(
    max_examples=MAX_EXAMPLES * 40, deadline=None, database=None, phases=[Phase.explicit, Phase.generate]
)
@given(body=BODIES)
def test_body_parser_answers_an_object_or_a_reason_for_any_bytes(body: bytes) -> None:
    parsed = http.parse_body(body)
    assert isinstance(parsed, dict | str)
    if isinstance(parsed, dict):
        assert not http.too_deep(parsed, http.MAX_JSON_DEPTH)


def test_bodies_never_answer_5xx(dev_url: str) -> None:
    session = requests.Session()
    statuses: Counter[int] = Counter()
    bad: list[str] = []

    @settings(
        max_examples=MAX_EXAMPLES * 16,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(body=BODIES, path=st.sampled_from(BODY_PATHS), method=st.sampled_from(["POST", "PUT"]))
    def send(body: bytes, path: str, method: str) -> None:
        reply = session.request(
            method, f"{dev_url}/v1/{path}", data=body, headers={"X-Vault-Token": ROOT}, timeout=15
        )
        statuses[reply.status_code] += 1
        if reply.status_code >= 500 or (reply.status_code >= 400 and "errors" not in reply.json()):
            bad.append(f"{method} {path} {body[:80]!r} -> {reply.status_code} {reply.text[:200]}")

    send()
    server_errors = sum(count for status, count in statuses.items() if status >= 500)
    print(
        f"\nfuzz: bodies {sum(statuses.values())} cases, {server_errors} answered 5xx; statuses {dict(statuses)}"
    )
    assert not bad, "\n".join(bad[:20])
    assert requests.get(f"{dev_url}/v1/sys/health", timeout=15).status_code == 200

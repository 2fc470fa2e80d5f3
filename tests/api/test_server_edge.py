"""The self-hosted server's edge against what an outsider or a careless operator sends
(issue 20): request-body limits and admission, malformed JSON and HTTP, unknown
methods, the dev-mode command line, and the event stream of a sealed cell. Every case
runs against `keycell server` over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from keycell import server
from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.routes import build_router
from keycell.control_plane.services import CellConfig, CellServices
from keycell.functions.api import http
from keycell.functions.api.app import configure
from keycell.testing.processes import keycell_server

ROOT = "kc.dev-root-token-for-edge-tests"
LIMIT = 64 * 1024  # the small max_request_size of the limited server


@pytest.fixture(scope="module")
def dev_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = keycell_server(tmp_path_factory.mktemp("edge-dev"), dev_root_token=ROOT, workers=1)
    port = server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A dev server with a 64 KiB body limit and an in-flight window of one request."""
    env = {"KEYCELL_MAX_REQUEST_SIZE": str(LIMIT), "KEYCELL_MAX_INFLIGHT": "1", "KEYCELL_MAX_QUEUE": "0"}
    server = keycell_server(tmp_path_factory.mktemp("edge-limited"), dev_root_token=ROOT, workers=1, env=env)
    port = server.start()
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.stop()


def raw(port: int, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send `request` as is on a fresh connection; everything the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"".join(chunks).endswith(b"\r\n0\r\n\r\n"):
                break
            if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in b"".join(chunks).lower():
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head.lower())
                if length and len(body) >= int(length.group(1)):
                    break
        return b"".join(chunks)


def status_and_json(answer: bytes) -> tuple[int, dict[str, object], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        joined = b""
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            joined, body = joined + rest[:size], rest[size + 2 :]
        body = joined
    return status, json.loads(body), head.lower()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# --- item 2: request-body limit, read under the admission gate ------------------------------


def test_body_over_max_request_size_is_413_in_vaults_shape(limited: tuple[str, int]) -> None:
    url, _ = limited
    headers = {"X-Vault-Token": ROOT}
    ok = requests.post(f"{url}/v1/secret/data/edge-small", json={"data": {"v": "x" * 1000}}, headers=headers)
    assert ok.status_code == 200
    big = json.dumps({"data": {"v": "x" * LIMIT}})
    reply = requests.post(f"{url}/v1/secret/data/edge-big", data=big, headers=headers, timeout=15)
    assert reply.status_code == 413
    assert reply.json() == {"errors": [f"the request body is larger than max_request_size ({LIMIT} bytes)"]}
    # Nothing was written.
    assert requests.get(f"{url}/v1/secret/data/edge-big", headers=headers).status_code == 404


def test_declared_length_over_limit_is_refused_before_the_body_is_sent(limited: tuple[str, int]) -> None:
    _, port = limited
    head = f"POST /v1/sys/health HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT + 1}\r\n\r\n".encode()
    status, body, _ = status_and_json(raw(port, head))
    assert status == 413 and "max_request_size" in body["errors"][0]  # type: ignore[index]


def test_chunked_body_over_limit_is_413(limited: tuple[str, int]) -> None:
    url, _ = limited

    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b" " * (LIMIT // 4)

    reply = requests.post(
        f"{url}/v1/secret/data/edge-chunked", data=chunks(), headers={"X-Vault-Token": ROOT}
    )
    assert reply.status_code == 413
    assert "errors" in reply.json()


def test_default_max_request_size_is_vaults_32_mib(dev_url: str) -> None:
    head = b"POST /v1/sys/health HTTP/1.1\r\nHost: x\r\nContent-Length: 33554433\r\n\r\n"
    status, body, _ = status_and_json(raw(port_of(dev_url), head))
    assert status == 413 and "33554432" in body["errors"][0]  # type: ignore[index]


def slot_comes_back(url: str) -> int:
    """The status of a health read once the one admission slot is free again. The slot is
    released after the response has been handed to the socket, which the client can see a
    moment before the release: allow that moment (5 s at most), not more."""
    deadline = time.monotonic() + 5.0
    while (status := requests.get(f"{url}/v1/sys/health", timeout=10).status_code) == 429:
        assert time.monotonic() < deadline, "the finished request never gave back its slot"
        time.sleep(0.05)
    return status


def test_a_body_being_uploaded_holds_an_admission_slot(limited: tuple[str, int]) -> None:
    """Reading the body happens inside the in-flight window: a slow upload is counted, so
    a flood of them is shed with 429 instead of piling up in memory unseen."""
    url, port = limited
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"POST /v1/sys/health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        time.sleep(0.3)  # the server has the headers and waits for the rest of the body
        shed = requests.get(f"{url}/v1/sys/health", timeout=10)
        assert shed.status_code == 429 and "errors" in shed.json()
        slow.sendall(b'"a": 1}   ')
        assert slow.recv(65536).startswith(b"HTTP/1.1 ")
    assert slot_comes_back(url) == 200


def test_a_body_that_does_not_arrive_in_time_is_408_and_frees_its_slot(tmp_path: Path) -> None:
    env = {"KEYCELL_HTTP_READ_TIMEOUT": "0.5", "KEYCELL_MAX_INFLIGHT": "1", "KEYCELL_MAX_QUEUE": "0"}
    server = keycell_server(tmp_path, dev_root_token=ROOT, workers=1, env=env)
    port = server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"POST /v1/sys/health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
            answer = b""
            while b"\r\n0\r\n\r\n" not in answer:
                chunk = slow.recv(65536)
                if not chunk:
                    break
                answer += chunk
        status, body, _ = status_and_json(answer)
        assert status == 408 and body == {"errors": ["the request body did not arrive in time"]}
        assert slot_comes_back(f"http://127.0.0.1:{port}") == 200
    finally:
        server.stop()


# --- item 3: malformed JSON is a 400, never a 5xx ---------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"data": {"v": ' + b"[" * 301 + b"]" * 301 + b"}}",
        b"\xff\xfe\x00garbage",
        b'{"a": "\xed\xa0\x80"}',
        b'{"a": 1' + b"0" * 10_000 + b"}",
    ],
    ids=["open-arrays", "nested-objects", "past-max-depth", "not-utf8", "surrogate", "huge-int"],
)
def test_malformed_or_deep_json_is_400(dev_url: str, body: bytes) -> None:
    reply = requests.post(f"{dev_url}/v1/secret/data/edge-json", data=body, headers={"X-Vault-Token": ROOT})
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    assert list(reply.json()) == ["errors"]


def test_json_at_max_depth_is_stored_and_read_back(dev_url: str) -> None:
    value: object = "leaf"
    for _ in range(http.MAX_JSON_DEPTH - 2):  # the body and its "data" object are two levels
        value = [value]
    headers = {"X-Vault-Token": ROOT}
    reply = requests.post(f"{dev_url}/v1/secret/data/edge-deep", json={"data": {"v": value}}, headers=headers)
    assert reply.status_code == 200
    read = requests.get(f"{dev_url}/v1/secret/data/edge-deep", headers=headers)
    assert read.json()["data"]["data"]["v"] == value


def test_parser_refuses_depth_past_the_limit_without_recursing() -> None:
    deep = "[" * (http.MAX_JSON_DEPTH + 1) + "]" * (http.MAX_JSON_DEPTH + 1)
    refused = http.to_request("POST", "secret/data/x", {}, {}, '{"a": ' + deep + "}")
    assert isinstance(refused, tuple) and refused[0] == 400
    assert json.loads(refused[2])["errors"] == [
        f"the request body is nested deeper than {http.MAX_JSON_DEPTH} levels"
    ]


# --- item 6: unknown methods are 405, not reads ---------------------------------------------


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS", "PROPFIND", "CONNECT"])
def test_unknown_methods_are_405_and_return_no_data(dev_url: str, method: str) -> None:
    headers = {"X-Vault-Token": ROOT}
    requests.post(f"{dev_url}/v1/secret/data/edge-405", json={"data": {"pw": "hunter22"}}, headers=headers)
    if method == "CONNECT":
        answer = raw(
            port_of(dev_url),
            b"CONNECT /v1/secret/data/edge-405 HTTP/1.1\r\nHost: x\r\n"
            + f"X-Vault-Token: {ROOT}\r\n\r\n".encode(),
        )
        status, body, _ = status_and_json(answer)
    else:
        reply = requests.request(method, f"{dev_url}/v1/secret/data/edge-405", headers=headers)
        status, body = reply.status_code, reply.json()
    assert status == 405
    assert body == {"errors": [f"unsupported method {method}"]}


# --- item 10: smaller things ----------------------------------------------------------------


def test_malformed_http_is_400_in_vaults_json_shape(dev_url: str) -> None:
    answer = raw(port_of(dev_url), b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nBad Header\x01: y\r\n\r\n")
    status, body, head = status_and_json(answer)
    assert status == 400
    assert b"content-type: application/json" in head
    assert body == {"errors": ["malformed HTTP request"]}


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keycell", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_short_dev_root_token_is_a_one_line_error(tmp_path: Path) -> None:
    done = run_cli(
        "server", "--dev", "--dev-root-token", "root", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "--dev-root-token" in lines[0] and "8" in lines[0]


def test_vault_style_dev_root_token_id_outside_dev_is_refused(tmp_path: Path) -> None:
    done = run_cli(
        "server", "-dev-root-token-id=root", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--dev" in done.stderr


def start_dev(*args: str) -> tuple[subprocess.Popen[str], int, str]:
    """`keycell server` in dev mode with its own temporary folder: process, port, stderr read so far."""
    process = subprocess.Popen(
        [sys.executable, "-m", "keycell", "server", "--listen", "127.0.0.1:0", "--workers", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    assert line.startswith("READY "), process.stderr.read()
    os.set_blocking(process.stderr.fileno(), False)
    return process, int(line.split()[1]), process.stderr.read() or ""


def test_vault_style_dev_root_token_id_works_in_dev_mode_with_a_warning() -> None:
    process, port, stderr = start_dev("-dev", "-dev-root-token-id=root")
    try:
        assert "warning" in stderr.lower() and "root token" in stderr.lower()
        reply = requests.get(
            f"http://127.0.0.1:{port}/v1/auth/token/lookup-self", headers={"X-Vault-Token": "root"}
        )
        assert reply.status_code == 200 and "root" in reply.json()["data"]["policies"]
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_dev_data_folder_is_removed_on_sigterm() -> None:
    process, port, stderr = start_dev("--dev", "--dev-root-token", ROOT)
    match = re.search(r"the ledger in (\S+)", stderr)
    assert match, stderr
    folder = Path(match.group(1))
    assert folder.is_dir() and any(folder.iterdir())
    assert requests.get(f"http://127.0.0.1:{port}/v1/sys/health").status_code == 200
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert not folder.exists()


def test_wrapped_token_create_names_the_wrapped_accessor(dev_url: str) -> None:
    headers = {"X-Vault-Token": ROOT, "X-Vault-Wrap-TTL": "60s"}
    wrapped = requests.post(
        f"{dev_url}/v1/auth/token/create", json={"policies": ["default"]}, headers=headers
    )
    info = wrapped.json()["wrap_info"]
    assert info["wrapped_accessor"]
    unwrapped = requests.post(f"{dev_url}/v1/sys/wrapping/unwrap", headers={"X-Vault-Token": info["token"]})
    assert unwrapped.json()["auth"]["accessor"] == info["wrapped_accessor"]


def test_event_stream_of_a_cell_that_cannot_unseal_is_503_in_vaults_shape(tmp_path: Path) -> None:
    """An HSM-sealed cell whose key backend refuses to unwrap the root key (its KEK
    disabled) stays sealed: the event stream says so as Vault does, not with a 500."""
    keys = SoftwareKeyBackend(store=SqliteLedger(tmp_path / "keys.db"))
    services = CellServices(SqliteLedger(tmp_path / "cell.db"), keys, CellConfig(cell_id="t", hsm_seal=True))
    services.seal.init(1, 1, root_token=ROOT)
    services.after_unseal()
    services.seal.seal()
    assert services.seal.kek is not None
    keys.disable(services.seal.kek)
    configure(build_router(services))
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": server.EVENTS_PATH,
        "headers": [(b"x-vault-token", ROOT.encode())],
    }
    try:
        asyncio.run(server.revocation_stream(scope, receive, send))
    finally:
        configure(None)
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"]) == {"errors": ["Vault is sealed"]}  # type: ignore[arg-type]


def test_answers_carry_their_length_and_a_chunked_body_is_still_read(dev_url: str) -> None:
    port = int(dev_url.rsplit(":", 1)[1])
    token = f"X-Vault-Token: {ROOT}\r\n".encode()
    body = b'{"data":{"k":"chunked"}}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    wrote = raw(
        port,
        b"POST /v1/secret/data/framing HTTP/1.1\r\nHost: x\r\n"
        + token
        + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunked,
    )
    head, _, payload = wrote.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), wrote[:200]
    assert b"transfer-encoding" not in head.lower()
    assert int(re.search(rb"content-length: (\d+)", head.lower()).group(1)) == len(payload)  # type: ignore[union-attr]
    read = raw(
        port, b"GET /v1/secret/data/framing HTTP/1.1\r\nHost: x\r\n" + token + b"Connection: close\r\n\r\n"
    )
    head, _, payload = read.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert json.loads(payload)["data"]["data"] == {"k": "chunked"}
    gone = raw(
        port, b"DELETE /v1/secret/data/framing HTTP/1.1\r\nHost: x\r\n" + token + b"Connection: close\r\n\r\n"
    )
    assert gone.startswith(b"HTTP/1.1 204") and b"content-length" not in gone.lower()

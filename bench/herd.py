"""The thundering herd: N simulated clients whose credentials all expire at the same
instant, against a real self-hosted cell (`keycell server --dev`, two workers).

    python -m bench.herd [--quick] [--clients 10000]

Simulated in one process: each client's renewal time comes from the real scheduling
code (keycell.client.watcher.RenewalPlan with the default 50-80% window); a bounded
pool of threads then sends every one of those renewals (`--quick`: a sample) as a
real HTTP request through keycell.client.Client (its client token bucket and
jittered retries that honour Retry-After), time-compressed, so the server's
behaviour under the herd is real while the run stays short.

Figures:
- peak-to-mean request rate in 1 s buckets (simulated seconds) over the renewal
  window (50-80% of the TTL, the seconds in which every client must renew), without
  splay (every client renews at the same point of its TTL, as a naive client does)
  and with splay and buckets: measured from the instants the requests were actually
  sent (`real_requests.*.sent_peak_to_mean`; the headline figure) and, beside it,
  from the plan alone; target <= 1.25 with;
- authentication requests saved by the wrapped-token cache over a fleet that
  restarts several times within one credential lifetime (real requests, real cache
  files; auth is a wrapped `auth/token/create`, the path a JWT login takes through
  the cache); target >= 80%;
- server 5xx during the herd (both bursts): must be 0.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import machine
from keycell.client import (
    Client,
    Credential,
    KeycellError,
    RateLimiter,
    RenewalPlan,
    RenewalWindow,
    RetryPolicy,
    WrappedSecretCache,
)
from keycell.testing.clock import ManualClock
from keycell.testing.processes import ServerProcess, keycell_server

ROOT = "kc.bench-herd-root-token"
TTL = 60.0  # simulated seconds: every credential issued at 0, expiring at 60


def renewal_times(clients: int, *, splay: bool, seed: int) -> list[float]:
    """When each client renews (simulated seconds), by the watcher's own plan."""
    rng = random.Random(seed)
    times = []
    for _ in range(clients):
        window = RenewalWindow(rng=rng) if splay else RenewalWindow(2 / 3, 2 / 3, rng=rng)
        credential = Credential("token", "x", ttl=TTL, renewable=True, obtained_at=0.0)
        first = RenewalPlan(credential, window, clock=ManualClock(0.0)).first()
        assert isinstance(first, float)
        times.append(first)
    return times


def peak_to_mean(times: list[float], window: tuple[float, float], *, scale: float = 1.0) -> dict[str, float]:
    """Requests per 1 s bucket (simulated seconds): the busiest against the mean over
    the renewal window. `scale` turns a sample's counts into the fleet's."""
    buckets = Counter(int(t) for t in times)
    seconds = window[1] - window[0]
    mean = len(times) / seconds
    peak = max(buckets.values())
    return {
        "peak_per_s": round(peak * scale, 1),
        "mean_per_s": round(mean * scale, 1),
        "peak_to_mean": round(peak / mean, 3),
    }


def start_server(folder: str) -> ServerProcess:
    server = keycell_server(folder, dev_root_token=ROOT, workers=2)
    server.start()
    return server


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[int] = Counter()
        self.sent = 0

    def add(self, client: Client, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1


def replay(
    url: str,
    tokens: list[Credential],
    times: list[float],
    *,
    window: tuple[float, float],
    compress: float,
    pool: int,
) -> dict[str, Any]:
    """Send one renewal per scheduled time (simulated seconds / `compress` = real
    seconds from now) through a bounded pool; count the answers."""
    tally = Tally()
    start = time.monotonic() + 0.2
    order = sorted(times)
    local = threading.local()
    sent: list[float] = []  # when each request actually left (list.append is atomic)

    def one(i: int, at: float) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = Client(
                url, retry=RetryPolicy(attempts=5, base=0.05, cap=2.0), rate_limiter=RateLimiter(200, 20)
            )
        delay = start + (at - order[0]) / compress - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent.append(time.monotonic())
        credential = tokens[i % len(tokens)]
        try:
            client.renew(credential)
            tally.add(client, 200)
        except KeycellError as error:
            tally.add(client, error.status)

    began = time.monotonic()
    with ThreadPoolExecutor(pool) as executor:
        list(executor.map(one, range(len(order)), order))
    elapsed = time.monotonic() - began
    simulated = [order[0] + (t - start) * compress for t in sent]
    return {
        "requests": len(order),
        "sent_peak_to_mean": peak_to_mean(simulated, window, scale=len(times) / len(order)),
        "seconds": round(elapsed, 2),
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "server_5xx": sum(v for k, v in tally.statuses.items() if k >= 500),
    }


def wrapped_cache_savings(
    url: str, root: Client, folder: Path, *, fleet: int, restarts: int
) -> dict[str, Any]:
    """Each member of the fleet starts `restarts + 1` times within one credential
    lifetime. Without the cache every start authenticates; with it only the first."""
    with_cache = 0
    for member in range(fleet):
        path = folder / f"member-{member}" / "cache.json"
        for _ in range(restarts + 1):
            cache = WrappedSecretCache(path)  # a new process: new client, new cache instance
            client = Client(url)
            credential = cache.credential("login")
            if credential is None:
                info = root.create_token(ttl="300s", policies=["default"], wrap_ttl="60s")
                with_cache += 1
                cache.unwrap(client, str(info["token"]), key="login")
                credential = cache.credential("login")
                assert credential is not None
            client.use_credential(credential)
            client.lookup_self()  # it works
    without = fleet * (restarts + 1)
    return {
        "fleet": fleet,
        "restarts": restarts,
        "auth_requests_without_cache": without,
        "auth_requests_with_cache": with_cache,
        "saved_fraction": round(1 - with_cache / without, 3),
        "target": 0.8,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    clients = args.clients or (2000 if quick else 10_000)
    real = min(clients, 400) if quick else clients
    window = (0.5 * TTL, 0.8 * TTL)
    naive = renewal_times(clients, splay=False, seed=1)
    splayed = renewal_times(clients, splay=True, seed=2)
    report: dict[str, Any] = {
        "benchmark": "herd",
        "machine": machine(),
        "clients": clients,
        "ttl_s": TTL,
        "renewal_window_s": list(window),
        "planned": {
            "without_splay": peak_to_mean(naive, window),
            "with_splay_and_buckets": peak_to_mean(splayed, window),
        },
        "target_peak_to_mean_with": 1.25,
    }
    with tempfile.TemporaryDirectory(prefix="keycell-herd-") as folder:
        server = start_server(folder)
        try:
            url = f"http://127.0.0.1:{server.port}"
            root = Client(url, token=ROOT, retry=RetryPolicy(attempts=6))
            tokens = [
                root.create_token(ttl="600s", policies=["default"])
                for _ in range(min(real, 100 if quick else 300))
            ]
            sample = random.Random(3)
            # The real window: long enough that the splayed herd stays well inside what
            # the server (and this one client process) can carry, about 500 renewals/s.
            compress = (window[1] - window[0]) / (2.0 if quick else max(8.0, real / 500))
            herd = {
                "sent_requests": real,
                "time_compression": round(compress, 2),
                "without_splay": replay(
                    url, tokens, sample.sample(naive, real), window=window, compress=compress, pool=32
                ),
                "with_splay_and_buckets": replay(
                    url, tokens, sample.sample(splayed, real), window=window, compress=compress, pool=32
                ),
            }
            herd["server_5xx"] = (
                herd["without_splay"]["server_5xx"] + herd["with_splay_and_buckets"]["server_5xx"]
            )
            report["real_requests"] = herd
            report["wrapped_token_cache"] = wrapped_cache_savings(
                url, root, Path(folder) / "caches", fleet=20 if quick else 100, restarts=5
            )
        finally:
            server.stop()
    report["server_5xx"] = report["real_requests"]["server_5xx"]
    report["peak_to_mean"] = {
        name: report["real_requests"][name]["sent_peak_to_mean"]["peak_to_mean"]
        for name in ("without_splay", "with_splay_and_buckets")
    }
    report["meets_targets"] = (
        report["peak_to_mean"]["with_splay_and_buckets"] <= 1.25
        and report["wrapped_token_cache"]["saved_fraction"] >= 0.8
        and report["server_5xx"] == 0
    )
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.herd", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small and short (the test suite)")
    parser.add_argument("--clients", type=int, default=0, help="simulated clients (default 10000)")
    report = run(parser.parse_args(argv))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

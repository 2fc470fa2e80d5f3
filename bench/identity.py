"""Workload identity figures: SVID issuance through the key adapter, and how evenly
renewals spread over time.

    python -m bench.identity [--ops N] [--workloads N] [--periods N]

1. **Issuance per core.** X.509-SVIDs and JWT-SVIDs signed per second by `IdentityCA`
   (the cell's side: building the certificate or token, one signature inside the key
   backend, assembling the result) from one thread, so one core; for the software
   backend and for PKCS#11 on a SoftHSM2 token. The workload key is made once: the
   agent's key generation and CSR are not the cell's cost.

2. **Peak-to-mean issuance rate over a rotation period.** N workloads renew their
   X.509-SVID at half-life +/- 10% (the agent's own `renewal_time`). The rate is
   counted in buckets of 1/30 of a rotation period (half the TTL), and the peak bucket
   divided by the mean over the last simulated period. Three ways workloads start:
   - `staggered`: start times spread uniformly over the first period (steady state);
   - `waves`: 20 rollouts of N/20 workloads, each rollout starting within one second,
     at random moments of the first period (bursts the jitter must smear out);
   - `cold_start`: all at once (an agent restart with an empty cache).
   The same schedule without jitter is shown next to each. Target: <= 1.25.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from bench.common import machine, ops_per_second
from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.agent.agent import renewal_time
from keycell.control_plane.keys import KeyBackend
from keycell.control_plane.svid import IdentityCA
from keycell.testing.cells import open_cell

TTL = 3600.0  # the X.509-SVID default: one rotation period is half of it
BUCKETS_PER_PERIOD = 30
TARGET = 1.25
MAX_SECONDS = 5.0  # per figure: bounds the run


def issuance(backend: KeyBackend, ops: int, folder: Path) -> dict[str, float]:
    ledger = SqliteLedger(folder / f"{backend.provider}.db")
    cell = open_cell(ledger)
    ca = IdentityCA(cell.barrier, backend, trust_domain="example.org")
    ca.authorities()  # root and first authority made outside the timing
    workload = ec.generate_private_key(ec.SECP256R1()).public_key()

    def x509_svid(i: int) -> None:
        ca.sign_x509(f"spiffe://example.org/bench/{i}", workload, 3600)

    def jwt_svid(i: int) -> None:
        ca.sign_jwt(f"spiffe://example.org/bench/{i}", ["bench"], 300)

    figures = {
        "x509_svids_per_s_per_core": round(ops_per_second(x509_svid, ops, max_seconds=MAX_SECONDS), 1),
        "jwt_svids_per_s_per_core": round(ops_per_second(jwt_svid, ops, max_seconds=MAX_SECONDS), 1),
    }
    ledger.close()
    return figures


def simulate(starts: list[float], periods: int, jitter: bool, rng: random.Random) -> dict[str, Any]:
    """Issue at each start, renew at `renewal_time` until `periods` rotation periods have
    passed; peak-to-mean of issuances per bucket over the last period (and the first)."""
    period = TTL / 2
    horizon = period * (periods + 1)
    bucket = period / BUCKETS_PER_PERIOD
    counts = [0] * (int(horizon / bucket) + 1)
    for start in starts:
        t = start
        while t < horizon:
            counts[int(t / bucket)] += 1
            t = renewal_time(t, t + TTL, rng) if jitter else t + TTL / 2

    def ratio(first_bucket: int) -> float:
        window = counts[first_bucket : first_bucket + BUCKETS_PER_PERIOD]
        mean = sum(window) / len(window)
        return round(max(window) / mean, 3) if mean else 0.0

    ratios = [ratio(k * BUCKETS_PER_PERIOD) for k in range(1, periods + 1)]
    settled = next((k for k in range(len(ratios)) if all(r <= TARGET for r in ratios[k:])), None)
    return {
        "first_period": ratios[0],
        "last_period": ratios[-1],
        # From which rotation period on every period stays within the target (None: never).
        "within_target_from_period": None if settled is None else settled + 1,
    }


def spread(workloads: int, periods: int, seed: int = 6) -> dict[str, Any]:
    rng = random.Random(seed)  # a simulation, not secrets
    period = TTL / 2
    waves = [rng.uniform(0, period) for _ in range(20)]
    scenarios: dict[str, Callable[[], list[float]]] = {
        "staggered": lambda: [rng.uniform(0, period) for _ in range(workloads)],
        "waves": lambda: [waves[i % 20] + rng.uniform(0, 1) for i in range(workloads)],
        "cold_start": lambda: [0.0] * workloads,
    }
    out: dict[str, Any] = {}
    for name, make in scenarios.items():
        starts = make()
        out[name] = {
            "with_jitter": simulate(starts, periods, True, rng),
            "without_jitter": simulate(starts, periods, False, rng),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="SVIDs to issue per figure (bounded by time)")
    parser.add_argument("--workloads", type=int, default=10_000)
    parser.add_argument("--periods", type=int, default=48, help="rotation periods to simulate")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        backends: dict[str, dict[str, float]] = {
            "software": issuance(SoftwareKeyBackend(), args.ops, Path(folder))
        }
        from keycell.testing.key_backends import pkcs11_backend
        from keycell.testing.softhsm import softhsm_token

        with softhsm_token("bench-identity") as token:
            backends["pkcs11_softhsm2"] = issuance(pkcs11_backend(token), args.ops, Path(folder))

    renewals = spread(args.workloads, args.periods)
    report = {
        "benchmark": "identity",
        "machine": machine(),
        "issuance": backends,
        "renewal_spread": {
            "workloads": args.workloads,
            "svid_ttl_s": TTL,
            "rotation_period_s": TTL / 2,
            "bucket_s": TTL / 2 / BUCKETS_PER_PERIOD,
            "periods_simulated": args.periods,
            "jitter": "renew at half-life +/- 10%",
            "peak_to_mean": renewals,
            "target": TARGET,
            "staggered_meets_target": renewals["staggered"]["with_jitter"]["last_period"] <= TARGET,
            "waves_meet_target": renewals["waves"]["with_jitter"]["last_period"] <= TARGET,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

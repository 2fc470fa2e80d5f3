"""Shared by the benchmarks: the machine description every JSON report carries, and
a bounded timing loop."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def ops_per_second(op: Callable[[int], object], count: int, *, max_seconds: float = 10.0) -> float:
    """Run `op(i)` for i in range(count), stopping early after `max_seconds`."""
    start = time.perf_counter()
    deadline = start + max_seconds
    done = 0
    for i in range(count):
        op(i)
        done += 1
        if (i & 63) == 0 and time.perf_counter() > deadline:
            break
    return done / (time.perf_counter() - start)


def interleaved(
    runs: dict[str, Callable[[], dict[str, float]]], rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Run each contender `rounds` times, alternating, and keep the median of every
    figure, so a noisy neighbour hurts every contender alike."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run())
    return {
        name: {figure: round(statistics.median(s[figure] for s in runs_), 1) for figure in runs_[0]}
        for name, runs_ in samples.items()
    }


def run_report(module: str, *args: str, timeout: float = 300.0) -> dict[str, Any]:
    """Run `python -m module args...` as a user would, in its own process, from the
    repository root, and return the JSON report it prints (the tests run every
    benchmark this way, small)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"{module} failed:\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report

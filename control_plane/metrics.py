"""Request metrics in the Prometheus text exposition format (sys/metrics).

Counted per process: each worker of a self-hosted server, or each Lambda instance,
reports its own series (label `pid`), which Prometheus sums. No secret, token or
path beyond the endpoint family ever becomes a label.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from typing import Any

# Seconds; chosen around the API's targets (p99 < 10 ms).
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self._sums: dict[str, float] = defaultdict(float)

    def observe(self, request: Any, route: Any, status: int, seconds: float) -> None:
        family = route.family if route is not None else "unrouted"
        with self._lock:
            self._requests[(family, str(request.method).upper(), str(status))] += 1
            counts = self._buckets[family]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1
            self._sums[family] += seconds

    def render(self, *, sealed: bool) -> str:
        pid = os.getpid()
        lines = [
            "# HELP keycell_requests_total API requests by endpoint family, method and status.",
            "# TYPE keycell_requests_total counter",
        ]
        with self._lock:
            for (family, method, status), count in sorted(self._requests.items()):
                lines.append(
                    f'keycell_requests_total{{family="{family}",method="{method}",status="{status}",pid="{pid}"}} {count}'
                )
            lines += [
                "# HELP keycell_request_duration_seconds API request latency by endpoint family.",
                "# TYPE keycell_request_duration_seconds histogram",
            ]
            for family, counts in sorted(self._buckets.items()):
                for bound, count in zip(BUCKETS, counts, strict=False):
                    lines.append(
                        f'keycell_request_duration_seconds_bucket{{family="{family}",le="{bound}",pid="{pid}"}} {count}'
                    )
                lines.append(
                    f'keycell_request_duration_seconds_bucket{{family="{family}",le="+Inf",pid="{pid}"}} {counts[-1]}'
                )
                lines.append(
                    f'keycell_request_duration_seconds_sum{{family="{family}",pid="{pid}"}} {self._sums[family]:.6f}'
                )
                lines.append(
                    f'keycell_request_duration_seconds_count{{family="{family}",pid="{pid}"}} {counts[-1]}'
                )
        lines += [
            "# HELP keycell_sealed Whether this process sees the cell sealed (1) or unsealed (0).",
            "# TYPE keycell_sealed gauge",
            f'keycell_sealed{{pid="{pid}"}} {1 if sealed else 0}',
        ]
        return "\n".join(lines) + "\n"

"""sys/metrics: Prometheus text (format=prometheus, the only format served)."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.metrics import Metrics
from keycell.control_plane.router import Content, Context, Operation, OperationDoc, Result, RouteDoc, Router


def register(router: Router, services: Any) -> None:
    metrics = Metrics()
    router.observers.append(metrics.observe)

    def read(ctx: Context) -> Result:
        fmt = ctx.request.query.get("format", "prometheus")
        if fmt != "prometheus":
            raise InvalidRequest("sys/metrics serves format=prometheus only")
        return Result(text=metrics.render(sealed=services.barrier.sealed), status=200)

    router.add(
        r"sys/metrics",
        {Operation.READ: read},
        family="sys",
        doc=RouteDoc(
            "/sys/metrics",
            "Request metrics of this process (Prometheus text).",
            operations={
                Operation.READ: OperationDoc(
                    "Read the metrics",
                    query={"format": {"type": "string", "enum": ["prometheus"]}},
                    responses={200: Content("text/plain")},
                )
            },
        ),
    )

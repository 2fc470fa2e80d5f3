"""sys/audit-hash/:device: the HMAC an audit device writes for a value, so an operator
can find a known value (a leaked token, a password) in the audit trail."""

from __future__ import annotations

from typing import Any

from keycell.control_plane.audit import AuditKey
from keycell.control_plane.errors import InvalidRequest
from keycell.control_plane.router import Context, Operation, OperationDoc, RouteDoc, Router
from keycell.control_plane.routes.openapi import STR, obj, ok


def register(router: Router, services: Any) -> None:
    fallback = AuditKey(services.barrier)  # the same key, when this process audits nothing

    def audit_hash(ctx: Context) -> dict[str, Any]:
        value = ctx.data.get("input")
        if not isinstance(value, str):
            raise InvalidRequest("'input' is required and must be a string")
        auditor = router.auditor
        devices = auditor.devices if auditor is not None else []
        if ctx.params["device"] not in devices:
            known = ", ".join(devices) or "none"
            raise InvalidRequest(f"no audit device {ctx.params['device']!r} (enabled devices: {known})")
        return {"hash": auditor.audit_hash(value) if auditor is not None else fallback.hasher().digest(value)}

    router.add(
        r"sys/audit-hash/(?P<device>[^/]+)",
        {Operation.UPDATE: audit_hash},
        family="sys",
        sudo=True,
        wrappable=False,
        doc=RouteDoc(
            "/sys/audit-hash/{device}",
            "The HMAC an audit device writes for a value.",
            params={"device": "The audit device: file, stdout or s3."},
            operations={
                Operation.UPDATE: OperationDoc(
                    "Hash a value with the audit key",
                    description="Answers `hmac-sha256:<hex>`, as the value appears in the audit trail.",
                    body=obj({"input": STR}, ("input",)),
                    body_required=True,
                    responses=ok(obj({"hash": STR}, ("hash",))),
                )
            },
        ),
    )

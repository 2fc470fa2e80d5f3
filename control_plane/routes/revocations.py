"""sys/revocations: the revocation function (issue 8).

POST sys/revocations names what to kill (one of lease_id, prefix, accessor, token,
spiffe_id, svid). The revocation is committed to this cell's ledger first (CP: once
the call returns, this cell refuses it), then handed to the cell's local relay, which
gossips it to every cell; the reply carries the revocation id. GET
sys/revocations/:id shows which cells hold it and since when: the exposure window
measured from the revoke call.

The hand-over is `services.relay_handoff` (set by functions/wiring.py from
KEYCELL_RELAY), a callable taking the RevocationRecord. Without one, or when the relay
is down, the revocation still stands here and the relay picks it up from the ledger.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from keycell.control_plane.errors import InvalidRequest, NotFound, PermissionDenied
from keycell.control_plane.revocations import (
    SVID_ID,
    RevocationLog,
    RevocationRecord,
    spiffe_subject,
    svid_subject,
)
from keycell.control_plane.router import Context, Operation, OperationDoc, RouteDoc, Router, field_str
from keycell.control_plane.routes.openapi import STR, nullable, obj, ok
from keycell.control_plane.svid import SpiffeId, SvidError

_WAYS = ("lease_id", "prefix", "accessor", "token", "spiffe_id", "svid")
_ID = re.compile(r"rv_[0-9a-f]{24}")
_SAFE = re.compile(r"[\x21-\x7e]{1,512}")
_NUMBER: dict[str, Any] = {"type": "number"}


def subject_of_svid(svid: str) -> str:
    """The revocation subject of one SVID, as the identity layer checks it: an
    X.509-SVID's serial (`svid:<hex>`) or a JWT-SVID's `jti` (`svid:<jti>`), so that
    revoking an SVID refuses that SVID and not every SVID of its SPIFFE ID (use
    `spiffe_id` for that). Not verified: revoking only takes rights away, so a
    caller allowed to revoke may name any SVID, even a forged one."""
    text = svid.strip()
    if text.startswith("-----BEGIN CERTIFICATE-----"):
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(text.encode())
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = uris.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, x509.ExtensionNotFound):
            raise InvalidRequest("'svid' is not an X.509-SVID with a spiffe:// URI SAN") from None
        if len([n for n in names if n.startswith("spiffe://")]) != 1:
            raise InvalidRequest("an X.509-SVID carries exactly one spiffe:// URI SAN")
        return svid_subject(f"{cert.serial_number:x}")
    parts = text.split(".")
    if len(parts) != 3:
        raise InvalidRequest("'svid' is a JWT-SVID (header.payload.signature) or a PEM X.509-SVID")
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        raise InvalidRequest("the JWT-SVID's payload is not base64url JSON") from None
    sub = payload.get("sub") if isinstance(payload, dict) else None
    if not isinstance(sub, str) or _spiffe_id(sub) is None:
        raise InvalidRequest("the JWT-SVID's 'sub' is not a SPIFFE ID")
    jti = payload.get("jti")
    if not isinstance(jti, str) or not SVID_ID.fullmatch(jti):
        raise InvalidRequest(
            "this JWT-SVID has no 'jti' to revoke it by; revoke its SPIFFE ID with 'spiffe_id'"
        )
    return svid_subject(jti)


def _spiffe_id(text: str) -> SpiffeId | None:
    """The SPIFFE ID in `text` as the identity layer checks it (canonical form), or None."""
    try:
        return SpiffeId.parse(text)
    except SvidError:
        return None


def subject_of(services: Any, data: dict[str, Any]) -> str:
    given = [way for way in _WAYS if data.get(way) not in (None, "")]
    if len(given) != 1:
        raise InvalidRequest("name exactly one of " + ", ".join(_WAYS))
    way = given[0]
    value = field_str(data, way) or ""
    if way == "svid":
        if len(value) > 16384:
            raise InvalidRequest("'svid' is at most 16 KiB")
        return subject_of_svid(value)
    if not _SAFE.fullmatch(value):
        raise InvalidRequest(f"'{way}' must be 1 to 512 printable ASCII characters without spaces")
    if way == "lease_id":
        return "lease:" + value
    if way == "prefix":
        prefix = value.strip("/")
        if not prefix:
            raise InvalidRequest("'prefix' must name at least one path segment")
        return "lease-prefix:" + prefix + "/"
    if way == "accessor":
        return "token:" + value
    if way == "token":
        try:
            entry = services.tokens.lookup(value)
        except PermissionDenied:
            raise InvalidRequest(
                "that token is not valid in this cell; revoke it by accessor in any cell"
            ) from None
        return "token:" + str(entry.accessor)
    if way == "spiffe_id":
        spiffe_id = _spiffe_id(value)
        if spiffe_id is None:
            raise InvalidRequest("'spiffe_id' must look like spiffe://trust-domain/path")
        return spiffe_subject(spiffe_id)
    raise AssertionError(way)  # every way in _WAYS is handled above


def register(router: Router, services: Any) -> None:
    log = RevocationLog(services.revocations)

    def revoke(ctx: Context) -> dict[str, Any]:
        subject = subject_of(services, ctx.data)
        reason = field_str(ctx.data, "reason") or "sys/revocations"
        if len(reason) > 256:
            raise InvalidRequest("'reason' is at most 256 characters")
        rec = log.record(subject, reason=reason)
        handoff = getattr(services, "relay_handoff", None)
        relay = "not-configured"
        if handoff is not None:
            try:
                handoff(rec)
                relay = "handed-over"
            except Exception:  # the relay picks it up from the ledger later
                relay = "unreachable"
        return {**_describe(rec), "relay": relay}

    def read(ctx: Context) -> dict[str, Any]:
        rid = ctx.params["id"]
        found = log.describe(rid) if _ID.fullmatch(rid) else None
        if found is None:
            raise NotFound(f"no revocation {rid} in this cell (yet)")
        rec, receipts = found
        cells = {
            r.cell: {
                "applied_at": r.applied_at,
                "exposure_seconds": round(max(0.0, r.applied_at - rec.revoked_at), 6),
            }
            for r in receipts
        }
        return {
            **_describe(rec),
            "cells": cells,
            "exposure_window_seconds": max(c["exposure_seconds"] for c in cells.values()) if cells else None,
        }

    cell_schema = obj({"applied_at": _NUMBER, "exposure_seconds": _NUMBER})
    record_schema = {"id": STR, "subject": STR, "origin_cell": STR, "revoked_at": _NUMBER, "reason": STR}
    router.add(
        r"sys/revocations",
        {Operation.UPDATE: revoke},
        sudo=True,
        family="sys",
        doc=RouteDoc(
            "/sys/revocations",
            "Revoke a lease, lease prefix, token, SPIFFE ID or SVID in every cell.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Revoke",
                    "Committed to this cell's ledger, then gossiped to every cell by the relay.",
                    body=obj({**{way: STR for way in _WAYS}, "reason": STR}),
                    body_required=True,
                    responses=ok(obj({**record_schema, "relay": STR})),
                )
            },
        ),
    )
    router.add(
        r"sys/revocations/(?P<id>[^/]+)",
        {Operation.READ: read},
        family="sys",
        doc=RouteDoc(
            "/sys/revocations/{id}",
            "Where a revocation has been applied, and its exposure window.",
            params={"id": "The revocation id (rv_...)."},
            operations={
                Operation.READ: OperationDoc(
                    "Read a revocation",
                    responses=ok(
                        obj(
                            {
                                **record_schema,
                                "cells": {"type": "object", "additionalProperties": cell_schema},
                                "exposure_window_seconds": nullable(_NUMBER),
                            }
                        )
                    ),
                )
            },
        ),
    )


def _describe(rec: RevocationRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "subject": rec.subject,
        "origin_cell": rec.origin_cell,
        "revoked_at": rec.revoked_at,
        "reason": rec.reason,
    }

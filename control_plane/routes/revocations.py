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
import math
import re
from typing import Any

from keycell.control_plane.errors import InvalidRequest, NotFound, PermissionDenied
from keycell.control_plane.freshness import Heartbeat, max_staleness
from keycell.control_plane.revocations import (
    SVID_ID,
    RevocationLog,
    RevocationRecord,
    check_subject,
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
        paths = getattr(services, "revocation_paths", None)  # direct and ledger (issue 18)
        if paths is not None:
            paths.deliver(rec)  # in the background, with bounded retries: the reply never waits
        return {**_describe(rec), "relay": relay, "seq": rec.seq}

    def apply(ctx: Context) -> dict[str, Any]:
        """A peer cell delivers revocations (and its heartbeat) directly: each is applied
        as the relay would (idempotent), and the reply is this cell's receipts."""
        records = _records(ctx.data.get("revocations", []), services.config.cell_id)
        heartbeat = _heartbeat(ctx.data.get("heartbeat"), services.config.cell_id)
        applied: dict[str, Any] = {}
        for rec in records:
            at = log.apply(rec, "direct")
            receipt = log.receipt(rec.id, services.config.cell_id)
            applied[rec.id] = {"applied_at": at, "path": receipt.path if receipt else "direct"}
        if heartbeat is not None:
            services.freshness.freshness.note_heartbeat(heartbeat, "direct")
        return {"cell": services.config.cell_id, "applied": applied}

    def freshness(ctx: Context) -> dict[str, Any]:
        marks = services.freshness.freshness.watermarks(services.peer_cells())
        worst = max_staleness(marks)
        return {
            "cell": services.config.cell_id,
            "peers": {peer: mark.as_json() for peer, mark in marks.items()},
            "max_staleness_seconds": None if math.isinf(worst) else round(worst, 6),
            "stale_peers_unknown": sorted(p for p, m in marks.items() if m.watermark is None),
        }

    def read(ctx: Context) -> dict[str, Any]:
        rid = ctx.params["id"]
        found = log.describe(rid) if _ID.fullmatch(rid) else None
        if found is None:
            raise NotFound(f"no revocation {rid} in this cell (yet)")
        rec, receipts = found
        cells: dict[str, dict[str, Any]] = {
            r.cell: {
                "applied_at": r.applied_at,
                "path": r.path or None,
                "exposure_seconds": round(max(0.0, r.applied_at - rec.revoked_at), 6),
            }
            for r in receipts
        }
        return {
            **_describe(rec),
            "cells": cells,
            "exposure_window_seconds": (
                max(float(c["exposure_seconds"]) for c in cells.values()) if cells else None
            ),
        }

    cell_schema = obj({"applied_at": _NUMBER, "exposure_seconds": _NUMBER, "path": nullable(STR)})
    peer_schema = obj(
        {
            "watermark": nullable(_NUMBER),
            "staleness_seconds": nullable(_NUMBER),
            "contiguous_seq": {"type": "integer"},
            "path": nullable(STR),
        }
    )
    router.add(
        r"sys/revocations/freshness",
        {Operation.READ: freshness},
        family="sys",
        doc=RouteDoc(
            "/sys/revocations/freshness",
            "Per peer cell: the time up to which this cell holds every revocation minted there.",
            operations={
                Operation.READ: OperationDoc(
                    "Read revocation freshness",
                    responses=ok(
                        obj(
                            {
                                "cell": STR,
                                "peers": {"type": "object", "additionalProperties": peer_schema},
                                "max_staleness_seconds": nullable(_NUMBER),
                                "stale_peers_unknown": {"type": "array", "items": STR},
                            }
                        )
                    ),
                )
            },
        ),
    )
    router.add(
        r"sys/revocations/apply",
        {Operation.UPDATE: apply},
        sudo=True,
        family="sys",
        doc=RouteDoc(
            "/sys/revocations/apply",
            "Another cell delivers revocations it minted (the direct path), and its heartbeat.",
            operations={
                Operation.UPDATE: OperationDoc(
                    "Apply revocations from a peer cell",
                    body=obj(
                        {
                            "revocations": {"type": "array", "items": {"type": "object"}},
                            "heartbeat": obj({"cell": STR, "seq": {"type": "integer"}, "at": _NUMBER}),
                        }
                    ),
                    body_required=True,
                    responses=ok(obj({"cell": STR, "applied": {"type": "object"}})),
                )
            },
        ),
    )
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


MAX_APPLY = 500  # revocations per direct delivery


def _records(value: object, cell: str) -> list[RevocationRecord]:
    """Peer-delivered records, checked before any is applied (no partial write)."""
    if not isinstance(value, list) or len(value) > MAX_APPLY:
        raise InvalidRequest(f"'revocations' is a list of at most {MAX_APPLY} revocation records")
    out = []
    for item in value:
        try:
            rec = RevocationRecord.from_json(item)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InvalidRequest(
                "each revocation has id, subject, origin_cell, revoked_at, reason, seq"
            ) from None
        if not _ID.fullmatch(rec.id) or rec.seq < 0 or not math.isfinite(rec.revoked_at):
            raise InvalidRequest("a revocation's id is rv_ + 24 hex digits, its seq >= 0")
        if not _SAFE.fullmatch(rec.origin_cell) or rec.origin_cell == cell:
            raise InvalidRequest("a delivered revocation names another cell as its origin")
        check_subject(rec.subject)
        out.append(rec)
    return out


def _heartbeat(value: object, cell: str) -> Heartbeat | None:
    if value is None:
        return None
    try:
        hb = Heartbeat.from_json(value)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InvalidRequest("'heartbeat' is {cell, seq, at}") from None
    if hb.seq < 0 or not math.isfinite(hb.at) or not _SAFE.fullmatch(hb.cell) or hb.cell == cell:
        raise InvalidRequest("'heartbeat' names another cell, a seq >= 0 and a time")
    return hb


def _describe(rec: RevocationRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "subject": rec.subject,
        "origin_cell": rec.origin_cell,
        "revoked_at": rec.revoked_at,
        "reason": rec.reason,
    }

"""Relay metrics in the Prometheus text format, one series per relay (label `relay`):
members by state, suspicions started, messages by kind, revocations applied, and the
exposure window (revoke call -> applied by this relay's cell) as a histogram."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from keycell.relay.membership import State
from keycell.relay.node import Relay


def render(relays: Iterable[Relay]) -> str:
    lines = [
        "# HELP keycell_relay_members Members this relay knows, by state.",
        "# TYPE keycell_relay_members gauge",
    ]
    relays = [r for r in relays if r.table is not None]
    for r in relays:
        assert r.table is not None
        for state in State:
            count = r.table.count(state)
            lines.append(
                f'keycell_relay_members{{relay="{r.name}",cell="{r.cell}",state="{state.name.lower()}"}} {count}'
            )
    lines += _per_relay(
        "keycell_relay_suspicions_total",
        "counter",
        "Suspicions this relay started or joined.",
        [(r, r.table.suspicions_started if r.table is not None else 0) for r in relays],
    )
    lines += _per_relay(
        "keycell_relay_local_health",
        "gauge",
        "Lifeguard local health multiplier (0 is healthy).",
        [(r, r.awareness.score) for r in relays],
    )
    lines += [
        "# HELP keycell_relay_messages_total Envelopes sent by kind, and dropped (fault injection) or unsent (no stream).",
        "# TYPE keycell_relay_messages_total counter",
    ]
    for r in relays:
        for key, value in sorted(r.counters.items()):
            if key.startswith("sent_"):
                lines.append(f'keycell_relay_messages_total{{relay="{r.name}",kind="{key[5:]}"}} {value}')
            elif key in ("dropped", "unsent", "received"):
                lines.append(f'keycell_relay_messages_total{{relay="{r.name}",kind="{key}"}} {value}')
    lines += _per_relay(
        "keycell_relay_revocation_messages_total",
        "counter",
        "Envelopes sent that carry a revocation or revocation ids (the broadcast's cost).",
        [(r, r.counters["revocation_messages"]) for r in relays],
    )
    lines += _per_relay(
        "keycell_relay_revocations_applied_total",
        "counter",
        "Revocations this relay's cell ledger holds, as applied by it.",
        [(r, r.counters["revocations_applied"]) for r in relays],
    )
    lines += _per_relay(
        "keycell_relay_entries",
        "gauge",
        "Revocation and receipt entries this relay holds.",
        [(r, len(r.store)) for r in relays],
    )
    lines += _per_relay(
        "keycell_relay_entries_expired_total",
        "counter",
        "Entries dropped once their revocation expired (expires_at + grace).",
        [(r, r.counters["entries_expired"]) for r in relays],
    )
    lines += _per_relay(
        "keycell_relay_expired_refused_total",
        "counter",
        "Expired entries refused (submitted, gossiped or offered by anti-entropy).",
        [(r, r.counters["expired_refused"]) for r in relays],
    )
    lines += [
        "# HELP keycell_relay_exposure_seconds From the revoke call to applied in this relay's cell.",
        "# TYPE keycell_relay_exposure_seconds histogram",
    ]
    for r in relays:
        hist = r.exposure
        for bound, n in zip(hist.bounds, hist.counts, strict=True):
            lines.append(f'keycell_relay_exposure_seconds_bucket{{relay="{r.name}",le="{bound}"}} {n}')
        lines.append(f'keycell_relay_exposure_seconds_bucket{{relay="{r.name}",le="+Inf"}} {hist.count}')
        lines.append(f'keycell_relay_exposure_seconds_sum{{relay="{r.name}"}} {hist.sum:.6f}')
        lines.append(f'keycell_relay_exposure_seconds_count{{relay="{r.name}"}} {hist.count}')
    return "\n".join(lines) + "\n"


def _per_relay(name: str, kind: str, text: str, samples: list[tuple[Relay, object]]) -> list[str]:
    """One metric family with one sample per relay (label `relay`)."""
    return [
        f"# HELP {name} {text}",
        f"# TYPE {name} {kind}",
        *(f'{name}{{relay="{r.name}"}} {value}' for r, value in samples),
    ]


async def serve_metrics(host: str, port: int, relays: Callable[[], Iterable[Relay]]) -> asyncio.Server:
    """GET /metrics on HOST:PORT (plain HTTP/1.0 answers; Prometheus scrapes it)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body, status = render(relays()).encode(), b"200 OK"
                ctype = b"text/plain; version=0.0.4"
            else:
                body, status, ctype = b"not found: try /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.0 "
                + status
                + b"\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)

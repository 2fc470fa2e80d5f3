"""Time as Vault writes it: RFC 3339 in UTC with microseconds (`...T12:00:00.123456Z`).

One formatter for every record that carries a time (audit entries, leases, wrapping
tokens). The date and time of day are formatted once a second: strftime costs more
than the rest of an audit entry's fields together, and the audit trail formats a time
for every request.
"""

from __future__ import annotations

from datetime import UTC, datetime

_second: tuple[int, str] = (-1, "")


def rfc3339(epoch: float) -> str:
    global _second
    whole = int(epoch // 1)
    cached = _second
    if cached[0] != whole:
        cached = _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{int((epoch - whole) * 1_000_000):06d}Z"

"""Ledger adapters and the one place a ledger URL becomes a ledger.

    sqlite:///var/lib/keycell/us-east-1.db          (embedded default, one file per cell)
    sqlite://relative/path/cell.db
    sqlite:///tmp/dev/cell.db?synchronous=off       (development cells: commits never fsynced)
    dynamodb://TABLE?region=eu-west-1               (real AWS)
    dynamodb://TABLE?endpoint=http://127.0.0.1:5000&create=1   (moto server, LocalStack)

For `dynamodb://`, a missing `endpoint` falls back to `AWS_ENDPOINT_URL_DYNAMODB`
and then `AWS_ENDPOINT_URL`, as the AWS SDKs do.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit

from keycell.control_plane.ledger import Ledger


def default_ledger_url() -> str:
    """The embedded default: one SQLite file per cell in the user's data folder."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return f"sqlite://{os.path.join(base, 'keycell', 'cell.db')}"


class LedgerURLError(ValueError):
    """The ledger URL names an unknown scheme or lacks a required part."""


def open_ledger(url: str) -> Ledger:
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "sqlite":
        from keycell.adapters.ledgers.sqlite import SqliteLedger

        path = parts.netloc + parts.path
        if not path:
            raise LedgerURLError(f"{url!r} names no file; use sqlite:///ABSOLUTE/PATH.db")
        synchronous = query.get("synchronous", "full").lower()
        if synchronous not in ("full", "off"):
            raise LedgerURLError(f"{url!r}: synchronous is full (the default) or off (development only)")
        return SqliteLedger(path, synchronous=synchronous)
    if parts.scheme == "dynamodb":
        from keycell.adapters.ledgers.dynamodb import DynamoLedger

        if not parts.netloc:
            raise LedgerURLError(f"{url!r} names no table; use dynamodb://TABLE?region=REGION")
        endpoint = (
            query.get("endpoint")
            or os.environ.get("AWS_ENDPOINT_URL_DYNAMODB")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        region = query.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return DynamoLedger(
            parts.netloc, region=region, endpoint_url=endpoint, create=query.get("create") == "1"
        )
    raise LedgerURLError(f"unknown ledger scheme {parts.scheme!r} in {url!r}; use sqlite:// or dynamodb://")

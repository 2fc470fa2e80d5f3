"""Ledger throughput: CAS writes/s and consistent reads/s for each adapter, and for
SQLite the ratio to raw `sqlite3` running the same statements, in the same run.

    python -m bench.ledger [--ops N]

Single writer, one key per write (create then update), fsync on every commit
(synchronous=FULL, the adapter's setting). DynamoDB runs against a moto server on
127.0.0.1 started here (or AWS_ENDPOINT_URL), so its figures measure the adapter
plus an emulator, not the AWS service.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench.common import interleaved, machine, ops_per_second
from keycell.adapters.ledgers.dynamodb import DynamoLedger
from keycell.adapters.ledgers.sqlite import SCHEMA, SELECT_ONE, UPSERT, SqliteLedger
from keycell.control_plane.ledger import Key, Kind, Ledger
from keycell.testing.moto_server import FAKE_AWS_ENV, MotoServer

VALUE = os.urandom(256)  # a barrier-sized ciphertext


def _keys(count: int) -> list[Key]:
    return [Key(Kind.SECRET_META, f"bench/secret-{i:06d}") for i in range(count)]


def adapter_rates(ledger: Ledger, count: int) -> dict[str, float]:
    keys = _keys(count)
    versions = [0] * count

    def cas(i: int) -> None:
        versions[i] = ledger.put_if(keys[i], VALUE, versions[i]).version

    writes = ops_per_second(cas, count)
    reads = ops_per_second(lambda i: ledger.get(keys[i], consistent=True), count)
    return {"cas_writes_per_s": writes, "consistent_reads_per_s": reads}


def raw_sqlite_rates(path: Path, count: int) -> dict[str, float]:
    """The adapter's statements, issued directly: BEGIN IMMEDIATE, read the version,
    upsert, COMMIT; and the same single-row SELECT for reads."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(SCHEMA)
    keys = [(Kind.SECRET_META.value, k.path) for k in _keys(count)]
    versions = [0] * count

    def cas(i: int) -> None:
        kind, key_path = keys[i]
        db.execute("BEGIN IMMEDIATE")
        row = db.execute(SELECT_ONE, (kind, key_path)).fetchone()
        current = 0 if row is None else row[0]
        if current != versions[i]:
            db.execute("ROLLBACK")
            raise RuntimeError("unexpected conflict")
        db.execute(UPSERT, (kind, key_path, current + 1, VALUE, None))
        db.execute("COMMIT")
        versions[i] = current + 1

    writes = ops_per_second(cas, count)
    reads = ops_per_second(lambda i: db.execute(SELECT_ONE, keys[i]).fetchone(), count)
    db.close()
    return {"cas_writes_per_s": writes, "consistent_reads_per_s": reads}


def run(ops: int, dynamo_ops: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        files = (Path(tmp) / f"{n}.db" for n in range(10**6))

        def sqlite_adapter() -> dict[str, float]:
            ledger = SqliteLedger(next(files))
            try:
                return adapter_rates(ledger, ops)
            finally:
                ledger.close()

        sqlite = interleaved(
            {
                "adapter": sqlite_adapter,
                "raw_sqlite3": lambda: raw_sqlite_rates(next(files), ops),
            }
        )
    ratio = {
        figure: round(sqlite["adapter"][figure] / sqlite["raw_sqlite3"][figure], 3)
        for figure in sqlite["adapter"]
    }

    for k, v in FAKE_AWS_ENV.items():
        os.environ.setdefault(k, v)
    external = os.environ.get("AWS_ENDPOINT_URL")
    with MotoServer() as moto:
        endpoint = external or moto.endpoint_url
        table = f"bench-{uuid.uuid4().hex[:8]}"
        dynamo = adapter_rates(DynamoLedger(table, endpoint_url=endpoint, create=True), dynamo_ops)

    return {
        "benchmark": "ledger",
        "machine": machine(),
        "ops_per_run": {"sqlite": ops, "dynamodb": dynamo_ops},
        "sqlite": sqlite,
        "sqlite_adapter_to_raw_ratio": ratio,
        "dynamodb": {
            "backend": "external endpoint" if external else "moto server (serial), 127.0.0.1",
            **{k: round(v, 1) for k, v in dynamo.items()},
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="ledger throughput")
    parser.add_argument("--ops", type=int, default=2000, help="operations per SQLite run")
    parser.add_argument("--dynamo-ops", type=int, default=500, help="operations per DynamoDB run")
    args = parser.parse_args(argv)
    report = run(args.ops, args.dynamo_ops)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

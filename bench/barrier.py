"""Sealed storage through the barrier against plain in-process AES-GCM, same data,
same run.

    python -m bench.barrier [--ops N] [--value-bytes B]

Sealed write: a fresh data key per value, wrapped by the cell's KEK in a SoftHSM2
token (pkcs11 backend), the value sealed under it, the envelope sealed again by the
barrier's term key with the ledger key as associated data, and a compare-and-set
write to the cell's SQLite ledger. Sealed read: the ledger read, the barrier
decryption and the envelope opened with the data key from the cache (hot) or
unwrapped by the token (cold). Plain: AES-256-GCM encrypt / decrypt of the same
values in process, nothing else. The ratio says what the safety costs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.common import interleaved, machine, ops_per_second
from keycell.adapters.keys.pkcs11 import Pkcs11KeyBackend
from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.envelope import DataKeyCache, Envelope, Envelopes
from keycell.control_plane.keys import KeySpec
from keycell.control_plane.ledger import Key, Kind
from keycell.testing.cells import open_cell
from keycell.testing.softhsm import softhsm_token


def run(ops: int, value_bytes: int) -> dict[str, Any]:
    values = [os.urandom(value_bytes) for _ in range(ops)]
    keys = [Key(Kind.SECRET_VERSION, f"bench/secret-{i:06d}#1") for i in range(ops)]
    aads = [str(k).encode() for k in keys]
    with softhsm_token(label="bench-barrier") as token, tempfile.TemporaryDirectory() as tmp:
        backend = Pkcs11KeyBackend(token.module, token.label, token.pin)
        backend.create_key("cell-kek", KeySpec.AES_256)
        files = (Path(tmp) / f"{n}.db" for n in range(10**6))

        def sealed() -> dict[str, float]:
            ledger = SqliteLedger(next(files))
            cell = open_cell(ledger)
            envelopes = Envelopes("bench", backend, "cell-kek", DataKeyCache(max_entries=ops + 1))
            cell.barrier.on_seal(envelopes.cache.clear)

            def write(i: int) -> None:
                cell.barrier.put_if(keys[i], envelopes.seal(values[i], aads[i]).to_bytes(), 0)

            def read(i: int) -> None:
                item = cell.barrier.get(keys[i])
                assert item is not None
                envelopes.open(Envelope.from_bytes(item.value), aads[i])

            writes = ops_per_second(write, ops)
            hot = ops_per_second(read, ops)
            envelopes.cache.clear()
            cold = ops_per_second(read, ops)
            ledger.close()
            return {"write_per_s": writes, "read_hot_cache_per_s": hot, "read_cold_cache_per_s": cold}

        def plain() -> dict[str, float]:
            aead = AESGCM(AESGCM.generate_key(bit_length=256))
            nonce = os.urandom(12)
            sealed_values: list[bytes] = [b""] * ops

            def encrypt(i: int) -> None:
                sealed_values[i] = aead.encrypt(nonce, values[i], aads[i])

            def decrypt(i: int) -> None:
                aead.decrypt(nonce, sealed_values[i], aads[i])

            return {
                "encrypt_per_s": ops_per_second(encrypt, ops),
                "decrypt_per_s": ops_per_second(decrypt, ops),
            }

        figures = interleaved({"sealed_storage_pkcs11": sealed, "plain_aes_gcm": plain})
        backend.close()
    s, p = figures["sealed_storage_pkcs11"], figures["plain_aes_gcm"]
    return {
        "benchmark": "barrier",
        "machine": machine(),
        "ops_per_run": ops,
        "value_bytes": value_bytes,
        **figures,
        "ratio_to_plain": {
            "write": round(s["write_per_s"] / p["encrypt_per_s"], 4),
            "read_hot": round(s["read_hot_cache_per_s"] / p["decrypt_per_s"], 4),
            "read_cold": round(s["read_cold_cache_per_s"] / p["decrypt_per_s"], 4),
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="barrier throughput")
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--value-bytes", type=int, default=256)
    args = parser.parse_args(argv)
    report = run(args.ops, args.value_bytes)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

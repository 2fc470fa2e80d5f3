"""Key custody throughput: wrap+unwrap and sign operations per second for every
backend, and for pkcs11 the ratio to raw python-pkcs11 doing the same token work in
the same run (target >= 0.9: the adapter adds almost nothing).

    python -m bench.keys [--ops N] [--pkcs11-ops N]

Each backend runs against its real local stand-in (keycell.testing.key_backends):
SoftHSM2 for pkcs11 and cloudhsm, a moto server for aws_kms, the Managed HSM HTTPS
server and the Cloud KMS gRPC server for azure_mhsm and gcp_kms. The cloud figures
therefore measure the adapter, the real SDK and a loopback emulator, not the cloud:
they rank the adapters' overheads, not the services' latencies.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from bench.common import machine, ops_per_second
from bench.keys_pkcs11 import pkcs11_vs_raw
from keycell.control_plane.keys import KeyBackend, KeySpec
from keycell.testing.key_backends import BACKENDS, every_backend

DATA_KEY = os.urandom(32)
AAD = b"ledger:secret-version:secret/bench/db#1"
MESSAGE = b"spiffe://example.org/bench jwt-svid header.payload"
MAX_SECONDS = 5.0


def backend_rates(backend: KeyBackend, ops: int) -> dict[str, float]:
    # pkcs11 and cloudhsm share one token: names per backend keep them apart.
    kek, signer = f"bench-kek-{backend.provider}", f"bench-signer-{backend.provider}"
    backend.create_key(kek, KeySpec.AES_256)
    backend.create_key(signer, KeySpec.EC_P256)

    def wrap_unwrap(_: int) -> None:
        backend.unwrap(kek, backend.wrap(kek, DATA_KEY, AAD), AAD)

    def sign(_: int) -> None:
        backend.sign(signer, MESSAGE)

    return {
        "wrap_unwrap_per_s": round(ops_per_second(wrap_unwrap, ops, max_seconds=MAX_SECONDS), 1),
        "ecdsa_sign_per_s": round(ops_per_second(sign, ops, max_seconds=MAX_SECONDS), 1),
    }


def run(ops: int, pkcs11_ops: int, names: tuple[str, ...] = BACKENDS) -> dict[str, Any]:
    with every_backend(names) as backends:
        per_backend = {name: backend_rates(backend, ops) for name, backend in backends.items()}
    pkcs11 = pkcs11_vs_raw(pkcs11_ops)
    return {
        "benchmark": "keys",
        "machine": machine(),
        "ops_per_backend": ops,
        "backends": per_backend,
        "pkcs11_adapter_to_raw": {
            "ratio": pkcs11["adapter_to_raw_ratio"],
            "target_ratio": pkcs11["target_ratio"],
            "meets_target": pkcs11["meets_target"],
            "adapter": pkcs11["adapter"],
            "raw_python_pkcs11": pkcs11["raw_python_pkcs11"],
        },
        "note": "cloud backends run against loopback stand-ins; figures rank adapter overhead, not cloud latency",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="key backend throughput")
    parser.add_argument("--ops", type=int, default=500, help="operations per backend and figure")
    parser.add_argument(
        "--pkcs11-ops", type=int, default=20000, help="operations per round of the pkcs11 ratio"
    )
    args = parser.parse_args(argv)
    report = run(args.ops, args.pkcs11_ops)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

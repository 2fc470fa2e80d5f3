"""A whole hvac session against `keycell server --dev` (two workers, auditing to its
data folder by default): canary values written, tokens created, a canary encrypted.
Afterwards no canary value, token or key appears in plaintext in the audit file, the
server's log output, exception texts or sys/metrics; the audit file's chain (both
workers appending) verifies; sys/audit-hash finds the canary's digest in the trail."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from keycell.adapters.ledgers.sqlite import SqliteLedger
from keycell.control_plane.audit import heads_and_tails, verify_files
from keycell.testing.processes import keycell_server

ROOT = "kc.audit-canary-root-token"
CANARIES = ["canary-password-4f1e9a", "canary-api-key-77c2d0", "canary-transit-plain-a91b3c"]


def test_no_secret_in_plaintext_anywhere(tmp_path: Path) -> None:
    server = keycell_server(
        tmp_path, dev_root_token=ROOT, workers=2, env={"KEYCELL_AUDIT_FILE": str(tmp_path / "audit.log")}
    )
    url = f"http://127.0.0.1:{server.start()}"
    secrets: list[str] = list(CANARIES)
    exceptions: list[str] = []
    try:
        root = hvac.Client(url=url, token=ROOT)
        root.secrets.kv.v2.create_or_update_secret("canary/db", secret={"password": CANARIES[0]})
        root.secrets.kv.v2.create_or_update_secret("canary/api", secret={"key": CANARIES[1]})
        read = root.secrets.kv.v2.read_secret_version("canary/db", raise_on_deleted_version=True)
        assert read["data"]["data"]["password"] == CANARIES[0]
        created = root.auth.token.create(policies=["default"], ttl="1h")["auth"]
        secrets.append(created["client_token"])
        child = hvac.Client(url=url, token=created["client_token"])
        with pytest.raises(hvac.exceptions.Forbidden) as denied:
            child.secrets.kv.v2.read_secret_version("canary/db", raise_on_deleted_version=True)
        exceptions.append(str(denied.value))
        wrong = hvac.Client(url=url, token="kc." + CANARIES[1])
        with pytest.raises(hvac.exceptions.Forbidden) as bad_token:
            wrong.secrets.kv.v2.read_secret_version("canary/db", raise_on_deleted_version=True)
        exceptions.append(str(bad_token.value))
        with pytest.raises(hvac.exceptions.InvalidRequest) as bad_input:
            root.write_data("secret/data/canary/bad", data={"data": "not-an-object-" + CANARIES[0]})
        exceptions.append(str(bad_input.value))
        root.secrets.transit.create_key("canary-key")
        plain = base64.b64encode(CANARIES[2].encode()).decode()
        secrets.append(plain)
        cipher = root.secrets.transit.encrypt_data("canary-key", plaintext=plain)["data"]["ciphertext"]
        assert (
            root.secrets.transit.decrypt_data("canary-key", ciphertext=cipher)["data"]["plaintext"] == plain
        )
        digest = root.sys.calculate_hash("file", CANARIES[0])["data"]["hash"]
        assert digest.startswith("hmac-sha256:")
        metrics = root.adapter.get("/v1/sys/metrics", raise_exception=True).text
    finally:
        log = server.log_tail(chars=1_000_000)
        server.stop()
    audit = (tmp_path / "audit.log").read_text()
    assert digest in audit  # the operator's check finds the write
    for secret in secrets:
        for where, text in [
            ("audit", audit),
            ("log", log),
            ("metrics", metrics),
            *[("exc", e) for e in exceptions],
        ]:
            assert secret not in text, f"{secret[:12]}... in {where}"
    assert ROOT not in audit and ROOT not in metrics  # dev mode prints it once at startup, as Vault's does
    entries, problems = verify_files([str(tmp_path / "audit.log")])
    assert problems == []
    ledger = SqliteLedger(tmp_path / "cell.db")
    try:  # every worker's chain ends where its head in the ledger says: the workers
        # anchor their heads after their sinks, and once more as they stop
        assert heads_and_tails(entries, ledger) == ([], [])
    finally:
        ledger.close()
    paths = {json.dumps(e.entry["request"]["path"]) for e in entries}
    assert '"secret/data/canary/db"' in paths and '"transit/encrypt/canary-key"' in paths

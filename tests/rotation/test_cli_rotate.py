"""`keycell rotate --prefix` against a real `keycell server`: bulk rotation with a JSON
report; running it again resumes (nothing done twice)."""

from __future__ import annotations

import json
from pathlib import Path

import hvac
from typer.testing import CliRunner

from keycell.cli import app
from keycell.testing.processes import keycell_server

ROOT = "kc.cli-rotate-root"


def test_bulk_rotation_reports_and_resumes_without_rotating_twice(tmp_path: Path) -> None:
    (tmp_path / "cell").mkdir()
    server = keycell_server(tmp_path / "cell", dev_root_token=ROOT, workers=2)
    port = server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        client = hvac.Client(url=url, token=ROOT)
        names = [f"fleet/svc-{i:02d}" for i in range(12)]
        for name in names:
            client.write(f"rotation/secrets/{name}", target="generic", params={"length": 16})
        client.write("rotation/secrets/other/x", target="generic")
        state = tmp_path / "state.json"
        args = [
            "rotate",
            "--prefix",
            "fleet/",
            "--concurrency",
            "4",
            "--json",
            "--address",
            url,
            "--token",
            ROOT,
            "--state-file",
            str(state),
        ]
        first = CliRunner().invoke(app, args)
        assert first.exit_code == 0, first.output
        report = json.loads(first.stdout.strip().splitlines()[-1])
        assert report["secrets"] == 12 and report["rotated_now"] == 12 and report["failed"] == {}
        again = CliRunner().invoke(app, args)
        report = json.loads(again.stdout.strip().splitlines()[-1])
        assert report["rotated_now"] == 0 and report["skipped_done_before"] == 12
        for name in names:
            assert client.read(f"rotation/secrets/{name}")["data"]["rotations"] == 1
        assert client.read("rotation/secrets/other/x")["data"]["rotations"] == 0
        creds = client.read("rotation/creds/fleet/svc-00")["data"]
        assert len(creds["password"]) == 16 and creds["_stage"] == "CURRENT"
        bad = CliRunner().invoke(
            app,
            [
                "rotate",
                "--prefix",
                "fleet/",
                "--address",
                url,
                "--token",
                "wrong",
                "--state-file",
                str(tmp_path / "s2.json"),
            ],
        )
        assert bad.exit_code != 0
    finally:
        server.stop()

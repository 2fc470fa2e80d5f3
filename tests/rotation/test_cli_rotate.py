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


def test_a_bulk_run_killed_part_way_resumes_and_rotates_each_secret_once(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    (tmp_path / "cell").mkdir()
    server = keycell_server(tmp_path / "cell", dev_root_token=ROOT, workers=2)
    port = server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        client = hvac.Client(url=url, token=ROOT)
        names = [f"batch/{i:02d}" for i in range(30)]
        for name in names:
            client.write(f"rotation/secrets/{name}", target="generic")
        state = tmp_path / "state.json"
        command = [sys.executable, "-m", "keycell", "rotate", "--prefix", "batch/", "--concurrency", "2", "--json",
                   "--address", url, "--token", ROOT, "--state-file", str(state)]  # fmt: skip
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = len(json.loads(state.read_text())["done"]) if state.exists() else 0
            if done >= 5:
                break
            time.sleep(0.02)
        first.kill()
        first.communicate()
        done_before = len(json.loads(state.read_text())["done"])
        assert 5 <= done_before < 30, "the run must be cut off part-way"
        second = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode == 0, second.stderr[-2000:]
        report = json.loads(second.stdout.strip().splitlines()[-1])
        assert report["skipped_done_before"] == done_before
        assert report["rotated_now"] == 30 - done_before
        assert [client.read(f"rotation/secrets/{n}")["data"]["rotations"] for n in names] == [1] * 30
    finally:
        server.stop()

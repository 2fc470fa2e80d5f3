"""The API listener over TLS (issue 20 item 4): `keycell server --tls-cert-file
--tls-key-file [--tls-client-ca-file]` with a CA made by the test
(keycell.testing.relay_tls.TestCA), driven by hvac (`verify=`, `VAULT_CACERT`) and
keycell.client over real TLS on 127.0.0.1; and the refusal to listen off loopback in
cleartext."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests

from keycell.client import Client
from keycell.client.errors import ConnectionFailed
from keycell.testing.processes import keycell_server
from keycell.testing.relay_tls import TestCA

ROOT = "kc.dev-root-token-for-tls-tests"


class Files:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    def __init__(self, folder: Path) -> None:
        self.ca = TestCA(name="keycell API test CA")
        server = self.ca.write(folder, "server", None)
        client = self.ca.write(folder, "client", None)
        self.ca_file = server["KEYCELL_RELAY_TLS_CA"]
        self.cert, self.key = server["KEYCELL_RELAY_TLS_CERT"], server["KEYCELL_RELAY_TLS_KEY"]
        self.client = (client["KEYCELL_RELAY_TLS_CERT"], client["KEYCELL_RELAY_TLS_KEY"])
        other = TestCA(name="someone else's CA")
        self.other_ca_file = str(folder / "other-ca.pem")
        Path(self.other_ca_file).write_bytes(other.pem)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("tls-files"))


@pytest.fixture(scope="module")
def tls_url(files: Files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = ["--tls-cert-file", files.cert, "--tls-key-file", files.key]
    server = keycell_server(tmp_path_factory.mktemp("tls-dev"), dev_root_token=ROOT, workers=2, args=args)
    port = server.start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.stop()


def test_hvac_with_verify_reads_and_writes_over_tls(tls_url: str, files: Files) -> None:
    client = hvac.Client(url=tls_url, token=ROOT, verify=files.ca_file)
    client.secrets.kv.v2.create_or_update_secret("tls/app", secret={"pw": "over-tls"})
    read = client.secrets.kv.v2.read_secret_version("tls/app", raise_on_deleted_version=True)
    assert read["data"]["data"] == {"pw": "over-tls"}


def test_hvac_with_vault_cacert_from_the_environment(tls_url: str, files: Files) -> None:
    # hvac reads VAULT_CACERT when it is imported: a fresh interpreter with Vault's variables.
    env = {**os.environ, "VAULT_ADDR": tls_url, "VAULT_TOKEN": ROOT, "VAULT_CACERT": files.ca_file}
    code = "import hvac; print(hvac.Client().is_authenticated())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr


def test_a_client_without_the_ca_refuses_the_server(tls_url: str, files: Files) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        hvac.Client(url=tls_url, token=ROOT, verify=files.other_ca_file).is_authenticated()


def test_cleartext_http_to_the_tls_listener_gets_no_answer(tls_url: str) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(tls_url.replace("https://", "http://") + "/v1/sys/health", timeout=10)


def test_keycell_client_honours_vault_cacert(
    tls_url: str, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_CACERT", files.ca_file)
    client = Client(tls_url, token=ROOT)
    assert client.request("GET", "auth/token/lookup-self")["data"]["policies"] == ["root"]
    client.transport.close()
    monkeypatch.setenv("VAULT_CACERT", files.other_ca_file)
    stranger = Client(tls_url, token=ROOT)
    with pytest.raises(ConnectionFailed):
        stranger.run(Client.call_lookup_self(), retry=False)


def test_client_ca_requires_a_client_certificate(files: Files, tmp_path: Path) -> None:
    args = ["--tls-cert-file", files.cert, "--tls-key-file", files.key, "--tls-client-ca-file", files.ca_file]
    server = keycell_server(tmp_path, dev_root_token=ROOT, workers=1, args=args)
    url = f"https://127.0.0.1:{server.start()}"
    try:
        with pytest.raises(requests.exceptions.ConnectionError):
            hvac.Client(url=url, token=ROOT, verify=files.ca_file).is_authenticated()
        client = hvac.Client(url=url, token=ROOT, verify=files.ca_file, cert=files.client)
        assert client.is_authenticated() is True
    finally:
        server.stop()


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keycell", "server", "--workers", "1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_listening_off_loopback_without_tls_is_refused(tmp_path: Path) -> None:
    # Refused before any socket is opened: nothing listens on 0.0.0.0.
    done = run_server("--dev", "--dev-root-token", ROOT, "--data-dir", str(tmp_path), "--listen", "0.0.0.0:0")
    assert done.returncode == 2 and "READY" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tls-cert-file" in lines[0] and "--tls-disable" in lines[0]


def test_an_unreadable_key_file_is_a_one_line_error(files: Files, tmp_path: Path) -> None:
    args = ["--tls-cert-file", files.cert, "--tls-key-file", str(tmp_path / "missing.key")]
    done = run_server("--dev", "--dev-root-token", ROOT, "--data-dir", str(tmp_path), *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--tls-key-file" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_tls_disable_contradicts_certificate_files(files: Files, tmp_path: Path) -> None:
    args = ["--tls-cert-file", files.cert, "--tls-key-file", files.key, "--tls-disable"]
    done = run_server("--dev", "--dev-root-token", ROOT, "--data-dir", str(tmp_path), *args)
    assert done.returncode == 2 and "--tls-disable" in done.stderr

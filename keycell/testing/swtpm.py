"""A software TPM 2.0 (swtpm) on 127.0.0.1, for TPM node attestation tests.

`swtpm socket` serves the TPM command port and its control port on two free ports,
with its state in a temporary folder; `tcti` is the TCTI string tpm2-pytss opens.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Self

from keycell.testing.processes import free_port


def _port_pair() -> tuple[int, int]:
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port, port + 1
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


class SoftwareTpm:
    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="keycell-swtpm-")
        self.port, self.ctrl_port = _port_pair()  # the swtpm TCTI expects the control port at port + 1
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> Self:
        binary = shutil.which("swtpm")
        if binary is None:
            raise RuntimeError("swtpm is not installed: apt-get install swtpm (see .ci/system-deps.sh)")
        self._process = subprocess.Popen(  # noqa: S603 - fixed arguments
            [
                binary,
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.folder}",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.stop()
                    raise RuntimeError("swtpm did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

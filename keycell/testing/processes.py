"""A local server run as a child process, the one way every stand-in starts.

The child is `python -m MODULE ARGS`; once it listens on 127.0.0.1 it prints
`READY <port>` as its first line of standard output (`announce_ready`). Its logs go
to a temporary file, never to an unread pipe (a full pipe would stall the server
mid-request), and are shown when it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import TracebackType
from typing import IO, Any, Self

READY = "READY"


def free_port() -> int:
    """A port nothing listens on right now (for tests of an unreachable endpoint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Terminate `process`, and kill it if it has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def announce_ready(port: int) -> None:
    """Called by the child once it listens."""
    print(f"{READY} {port}", flush=True)


class ServerProcess:
    def __init__(
        self,
        module: str,
        args: list[str] | None = None,
        *,
        what: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 30.0,
        prefix: list[str] | None = None,
    ) -> None:
        """`prefix`: a command the child runs under, such as `ip netns exec NS`
        (keycell/testing/netns.py); it must exec the child, so `pid` stays the child's."""
        self.module = module
        self.prefix = prefix or []
        self.args = args or []
        self.what = what
        self.env = env
        self.startup_timeout = startup_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> int:
        """Start the child and return the port it listens on."""
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self._process = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [*self.prefix, sys.executable, "-m", self.module, *self.args],
            env={**os.environ, **(self.env or {})},
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self._process.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            ready, _, _ = select.select([self._process.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(self._process.stdout.fileno(), 64)
                if not chunk:
                    break
                line += chunk
        words = line.split()
        if len(words) != 2 or words[0] != READY.encode() or not words[1].isdigit():
            log = self.log_tail()
            self.stop()
            raise RuntimeError(f"{self.what} did not start:\n{log}")
        self.port = int(words[1])
        return self.port

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def exited(self) -> int | None:
        """The child's exit code if it has exited, else None."""
        return None if self._process is None else self._process.poll()

    def log_tail(self, chars: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


class ManagedServer:
    """Base of the stand-ins' handles: `with Stand_in() as s:` starts and stops it."""

    process: ServerProcess

    def start(self) -> Self:
        self.process.start()
        return self

    @property
    def port(self) -> int:
        return self.process.port

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def keycell_server(
    data_dir: str | os.PathLike[str],
    *,
    dev_root_token: str | None = None,
    workers: int = 2,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> ServerProcess:
    """`keycell server` on 127.0.0.1 (any free port) over `data_dir`: a development
    cell (initialized, unsealed, with this root token) or, without a token, a cell that
    starts sealed; `args` are more options (`--tls-cert-file F`, ...). Call `.start()`
    for its port."""
    args = [
        "server",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        str(workers),
        "--data-dir",
        str(data_dir),
        *(args or []),
    ]
    if dev_root_token is not None:
        args += ["--dev", "--dev-root-token", dev_root_token]
    what = "keycell server --dev" if dev_root_token is not None else "keycell server"
    return ServerProcess("keycell", args, what=what, env=env)


@contextlib.contextmanager
def dev_server(data_dir: str | os.PathLike[str], root_token: str, *, workers: int = 2) -> Iterator[str]:
    """`keycell server --dev` with this root token for the length of a `with` block (a
    module fixture's usual body): its base URL, http://127.0.0.1:PORT."""
    server = keycell_server(data_dir, dev_root_token=root_token, workers=workers)
    port = server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()

"""A moto server in its own process, on 127.0.0.1, over real HTTP.

Run by hand with `python -m keycell.testing.moto_server --port 5000`.

By default the server handles one request at a time (connections are served by
threads, so an idle keep-alive connection never blocks the others, but each request
runs under one lock). moto's backends keep their state without locks, so moto's
usual threaded server can interleave the condition check of one conditional write
with the write of another; real DynamoDB serializes writes to an item. A serial
emulator is linearizable itself, so what a concurrency test finds is ours.
`--threaded` gives moto's usual behaviour.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import IO, Any

# Credentials moto accepts; never real ones.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """Start with `with MotoServer() as moto:`; `moto.endpoint_url` is its address."""

    def __init__(self, *, threaded: bool = False, startup_timeout: float = 30.0) -> None:
        self.threaded = threaded
        self.startup_timeout = startup_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self.port = free_port()
        args = [sys.executable, "-m", "keycell.testing.moto_server", "--port", str(self.port)]
        if self.threaded:
            args.append("--threaded")
        env = {**os.environ, **FAKE_AWS_ENV}
        # The server logs every request: send that to a file, never to an unread pipe
        # (a full pipe would stall the server mid-request).
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self._process = subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            args, env=env, stdout=subprocess.DEVNULL, stderr=self._log
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")[-4000:]
                raise RuntimeError(f"moto server exited at start (is moto[server] installed?):\n{err}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=1):  # noqa: S310
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url} in {self.startup_timeout}s")

    def reset(self) -> None:
        """Forget every resource, as a fresh server would."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()
        self._process = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _count_binary_as_dynamodb_does() -> None:
    """moto sizes a binary attribute by its base64 text, a third more than DynamoDB,
    which counts the raw bytes (Developer Guide, "Item sizes"). Correct that, so a
    400 KB item the service accepts is accepted here too."""
    import base64

    from moto.dynamodb.models.dynamo_type import DynamoType

    moto_size = DynamoType.size

    def size(self: DynamoType) -> int:
        if self.type == "B":
            raw = self.value
            return len(raw) if isinstance(raw, bytes) else len(base64.b64decode(raw))
        return moto_size(self)

    DynamoType.size = size  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threaded", action="store_true")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    _count_binary_as_dynamodb_does()
    os.environ.setdefault("MOTO_PORT", str(args.port))
    moto_app = DomainDispatcherApplication(create_backend_app)
    one_at_a_time = threading.Lock()

    def serial_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with one_at_a_time:
            return list(moto_app(environ, start_response))

    run_simple(
        "127.0.0.1",
        args.port,
        moto_app if args.threaded else serial_app,
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()

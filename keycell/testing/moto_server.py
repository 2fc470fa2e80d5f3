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
import threading
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from keycell.testing.processes import ManagedServer, ServerProcess, announce_ready

# Credentials moto accepts; never real ones.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer(ManagedServer):
    """Start with `with MotoServer() as moto:`; `moto.endpoint_url` is its address."""

    def __init__(self, *, threaded: bool = False, startup_timeout: float = 30.0) -> None:
        self.threaded = threaded
        self.process = ServerProcess(
            "keycell.testing.moto_server",
            ["--threaded"] if threaded else [],
            what="the moto server (is moto[server] installed?)",
            env=FAKE_AWS_ENV,
            startup_timeout=startup_timeout,
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        """Forget every resource, as a fresh server would."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed when ready)")
    parser.add_argument("--threaded", action="store_true")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    from keycell.testing.moto_fidelity import apply_all

    apply_all()  # where moto differs from the documented services Keycell relies on
    moto_app = DomainDispatcherApplication(create_backend_app)
    one_at_a_time = threading.Lock()

    def serial_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with one_at_a_time:
            return list(moto_app(environ, start_response))

    server = make_server(
        "127.0.0.1",
        args.port,
        moto_app if args.threaded else serial_app,
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    os.environ["MOTO_PORT"] = str(server.port)
    announce_ready(server.port)
    server.serve_forever()


if __name__ == "__main__":
    main()

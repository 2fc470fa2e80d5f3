"""A real PostgreSQL server for tests and benchmarks, started in a temporary folder.

`initdb` and `pg_ctl` refuse to run as root, so when we are root they run as the
`postgres` user (`runuser -u postgres --`) on a folder that user owns. The server
listens on 127.0.0.1 only, on a free port, with password (SCRAM) authentication for
TCP clients: credential tests must be able to fail to log in. The superuser's
password is random and known only to this handle.

    with PostgresServer() as pg:
        psycopg.connect(pg.dsn())            # as the superuser
        psycopg.connect(pg.dsn("app", "pw"))  # as anyone else

Run by hand with `python -m keycell.testing.postgres` (prints READY <port> and the
superuser's DSN, then serves until interrupted).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

from keycell.testing.processes import free_port

SUPERUSER = "postgres"


def find_bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries (Debian keeps them off PATH)."""
    explicit = os.environ.get("KEYCELL_PG_BIN")
    if explicit:
        return Path(explicit)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError(
        "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin); "
        "run `bash .ci/system-deps.sh` as root, or `apt-get install postgresql`"
    )


class PostgresServer:
    def __init__(self, *, max_connections: int = 300) -> None:
        self.bin_dir = find_bin_dir()
        self.max_connections = max_connections
        self.superuser_password = secrets.token_urlsafe(18)
        self.port = 0
        self.folder: Path | None = None
        self._as_postgres = os.geteuid() == 0

    # --- lifecycle -------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}{self._log()}")

    def _log(self) -> str:
        if self.folder is None or not (self.folder / "server.log").exists():
            return ""
        return "\nserver log:\n" + (self.folder / "server.log").read_text(errors="replace")[-2000:]

    def start(self) -> Self:
        self.folder = Path(tempfile.mkdtemp(prefix="keycell-pg-"))
        data = self.folder / "data"
        pwfile = self.folder / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        if self._as_postgres:
            shutil.chown(self.folder, SUPERUSER, SUPERUSER)
            shutil.chown(pwfile, SUPERUSER, SUPERUSER)
        pwfile.chmod(0o600)
        self._run(
            "initdb",
            "-D",
            str(data),
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--no-locale",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
        )
        pwfile.unlink()
        # A port can be taken between free_port() and the server binding it: retry.
        for attempt in range(3):
            self.port = free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-p {self.port}",
                    f"-c unix_socket_directories={self.folder}",
                    f"-c max_connections={self.max_connections}",
                    # A throwaway server: durability buys nothing, speed helps.
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c shared_buffers=32MB",
                ]
            )
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "-D",
                    str(data),
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(self.folder / "server.log"),
                    "-o",
                    options,
                )
                break
            except RuntimeError:
                if attempt == 2:
                    self.stop()
                    raise
        return self

    def stop(self) -> None:
        if self.folder is None:
            return
        data = self.folder / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # nothing else to do
                self._run("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- addresses -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, user: str = SUPERUSER, password: str | None = None, dbname: str = "postgres") -> str:
        """A libpq URL for `user` over TCP (password authentication)."""
        if user == SUPERUSER and password is None:
            password = self.superuser_password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}?connect_timeout=10"


def main() -> None:
    with PostgresServer() as pg:
        print(f"READY {pg.port}", flush=True)
        print(pg.dsn(), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

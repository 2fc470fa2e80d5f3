"""Throwaway SoftHSM2 tokens for the tests, the benchmarks and the demo.

    with softhsm_token(label="keycell") as token:
        backend = Pkcs11KeyBackend(token.module, token.label, token.pin)

Each token lives in its own temporary token directory, named by its own
softhsm2.conf; SOFTHSM2_CONF points at it while the token exists and is restored
afterwards. The token is initialised with the real `softhsm2-util`, and removed with
its directory at the end.

SoftHSM2 reads SOFTHSM2_CONF and lists its tokens once, when the module is
initialised (C_Initialize). A process that already loaded the module through
python-pkcs11 would not see a token created later, so creating one then re-initialises
the module, which ends every PKCS#11 session the process still holds on it: create
the tokens a process needs before opening backends on them.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DEBIAN_PACKAGE = "softhsm2"
# Where Debian and Ubuntu put the module; other layouts are searched below.
DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
_MODULE_GLOBS = (
    "/usr/lib/*/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
# One environment change at a time: SOFTHSM2_CONF is process-wide.
_env_lock = threading.Lock()


class SoftHsmMissingError(RuntimeError):
    """SoftHSM2 is not installed."""


def find_module() -> str:
    """The path of libsofthsm2.so, or SoftHsmMissingError naming the package to install."""
    candidates = [DEFAULT_MODULE, *sorted(p for pattern in _MODULE_GLOBS for p in glob.glob(pattern))]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise SoftHsmMissingError(
        f"SoftHSM2 is not installed (no libsofthsm2.so at {DEFAULT_MODULE}); install the Debian "
        f"package `{DEBIAN_PACKAGE}` (apt-get install -y {DEBIAN_PACKAGE}), or run `make test`, "
        "which installs it"
    )


def find_util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHsmMissingError(
            f"softhsm2-util is not on PATH; install the Debian package `{DEBIAN_PACKAGE}` "
            f"(apt-get install -y {DEBIAN_PACKAGE}), or run `make test`, which installs it"
        )
    return util


@dataclass
class SoftHsmToken:
    """One initialised token. `pin` is the user PIN a backend logs in with."""

    module: str
    label: str
    pin: str
    so_pin: str = field(repr=False)
    directory: Path
    conf: Path
    _previous_conf: str | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Remove the token's files and restore SOFTHSM2_CONF. Close backends first."""
        with _env_lock:
            if self._closed:
                return
            self._closed = True
            if os.environ.get("SOFTHSM2_CONF") == str(self.conf):
                if self._previous_conf is None:
                    os.environ.pop("SOFTHSM2_CONF", None)
                else:
                    os.environ["SOFTHSM2_CONF"] = self._previous_conf
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SoftHsmToken:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_token(label: str = "keycell", pin: str | None = None, so_pin: str | None = None) -> SoftHsmToken:
    """Initialise a fresh token in a new temporary directory; close() removes it."""
    module = find_module()
    util = find_util()
    pin = pin or secrets.token_hex(8)
    so_pin = so_pin or secrets.token_hex(8)
    directory = Path(tempfile.mkdtemp(prefix="keycell-softhsm-"))
    tokens = directory / "tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    with _env_lock:
        previous = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        result = subprocess.run(  # noqa: S603 - fixed binary, arguments we built
            [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
            env={**os.environ, "SOFTHSM2_CONF": str(conf)},
            capture_output=True,
            text=True,
            check=False,
        )
    token = SoftHsmToken(module, label, pin, so_pin, directory, conf, previous)
    if result.returncode != 0:
        token.close()
        # softhsm2-util does not echo PINs; its own words say what went wrong.
        raise RuntimeError(f"softhsm2-util could not initialise token {label!r}: {result.stderr.strip()}")
    _reinitialize_if_loaded(module)
    return token


@contextmanager
def softhsm_token(
    label: str = "keycell", pin: str | None = None, so_pin: str | None = None
) -> Iterator[SoftHsmToken]:
    token = create_token(label, pin, so_pin)
    try:
        yield token
    finally:
        token.close()


def _reinitialize_if_loaded(module: str) -> None:
    """Make a module this process already initialised read the new configuration."""
    import pkcs11

    # python-pkcs11 keeps one handle per module path, initialised once.
    loaded = getattr(pkcs11, "_loaded", {}).get(module)
    if loaded is not None and loaded.initialized:
        loaded.reinitialize()

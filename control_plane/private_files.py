"""Owner-only files and folders: the one way Keycell creates a file that holds keys,
ledger items, audit entries or state (a ledger, the dev key store, an audit file, a
token cache, a runbook's progress), and the folder it sits in.

Files are 0600 and folders 0700 whatever the process's umask: a mode given to
`os.open`/`mkdir` is only a ceiling the umask lowers, and a file made by an older
Keycell (or by a library such as SQLite, which gives its -wal and -shm files the
mode of the database file) may be looser, so each helper sets the mode itself.
A folder that already exists is left as it is: it may be shared (a data folder given
as /srv, a token cache in a home folder), and tightening it is the operator's call.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700

StrPath = str | os.PathLike[str]


def private_dir(path: StrPath) -> Path:
    """`path` as a folder, made (with any missing parents) 0700 when absent."""
    folder = Path(path)
    missing: list[Path] = []
    here = folder
    while not here.exists():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for made in missing:
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: mkdir said why
            os.chmod(made, DIR_MODE)
    return folder


def open_private(path: StrPath, flags: int = os.O_RDWR) -> int:
    """A descriptor on `path`, made 0600 if absent and set 0600 if it was looser."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_file(path: StrPath) -> Path:
    """Make sure `path` exists and is 0600 (before a library such as SQLite opens it)."""
    os.close(open_private(path, os.O_RDONLY))
    return Path(path)


def write_private(path: StrPath, data: bytes) -> None:
    """Replace `path` with `data` at once (a reader sees the old or the new file, never
    half), durable on return, 0600."""
    target = Path(path)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")  # made 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise

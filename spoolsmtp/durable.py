"""Durable files: write a temp file, fsync it, rename it into place, fsync the directory.

These are the blocking primitives; ``iobatch`` runs them in groups so that one directory fsync
covers many files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path, *, fsync: bool = True, sync_dir: bool = True) -> Iterator[BinaryIO]:
    """Write a file that replaces ``path`` atomically: a dot-named temp file, fsynced (unless
    ``fsync`` is off, for files that can be rebuilt), renamed into place, the folder fsynced.

    The temp name starts with a dot so that a reader of the folder (the incoming watcher, an
    operator's ls) never takes a half-written file for a finished one. On any failure the temp
    file is removed: a full disk leaves nothing behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_file(path: Path, data: bytes, *, fsync: bool = True, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (and durably unless told otherwise); blocking."""
    with replacing(path, fsync=fsync, sync_dir=sync_dir) as fh:
        fh.write(data)

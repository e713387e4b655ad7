"""Durable files: write a temp file, fsync it, rename it into place, fsync the directory.

These are the blocking primitives; ``iobatch`` runs them in groups so that one directory fsync
covers many files.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Atomically and durably replace ``path`` with ``data`` (blocking).

    The temp name starts with a dot so that a reader of the folder (the incoming watcher, an
    operator's ls) never takes a half-written file for a finished one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)

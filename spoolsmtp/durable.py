"""Durable files: write a temp file, fsync it, rename it into place, fsync the directory.

``Coalescer`` lets many callers share one blocking fsync (group commit): whoever asks while a
sync runs is served by the next one, so a burst of N renames in a directory costs two directory
fsyncs, not N.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
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


class Coalescer:
    """Runs a blocking action in a thread for many waiters at once (see module docstring)."""

    def __init__(self, action: Callable[[], None]) -> None:
        self._action = action
        self._next: asyncio.Future[None] | None = None
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self.runs = 0

    async def __call__(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiter = self._next
        if not self._running:
            self._running = True
            self._task = asyncio.create_task(self._drive())
        await asyncio.shield(waiter)

    async def _drive(self) -> None:
        try:
            while self._next is not None:
                waiter, self._next = self._next, None
                try:
                    await asyncio.to_thread(self._action)
                except Exception as exc:
                    waiter.set_exception(exc)
                else:
                    waiter.set_result(None)
                self.runs += 1
        finally:
            self._running = False


class DirSync:
    """One coalescing fsync per directory."""

    def __init__(self) -> None:
        self._by_dir: dict[Path, Coalescer] = {}

    async def __call__(self, directory: Path) -> None:
        coalescer = self._by_dir.get(directory)
        if coalescer is None:
            coalescer = self._by_dir[directory] = Coalescer(lambda: fsync_dir(directory))
        await coalescer()

"""What the operator channel reads of the spool's files, always off the event loop: how many
files wait in a few folders (QUERY), and one envelope's result record (QUERY ID).

Counting a folder is a scan that grows with the folder, so it runs in a thread, and one scan at
a time: queries that arrive while a scan runs share the next one (started when the running one
ends), so a flood of QUERYs costs one thread, and every answer counts what was there when its
query came in.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# files in a folder that are not envelopes of its own: a rejected file's reason beside it
NOT_COUNTED = {"rejected": ".reason"}


def count(folder: Path, skip_suffix: str | None = None) -> int:
    """Files in ``folder`` (hidden ones and those ending in ``skip_suffix`` not counted); a
    folder that is not there holds none. Blocking."""
    try:
        with os.scandir(folder) as entries:
            return sum(
                1
                for e in entries
                if not e.name.startswith(".") and not (skip_suffix and e.name.endswith(skip_suffix))
            )
    except FileNotFoundError:
        return 0


class FolderCounts:
    """The file counts of some spool folders, by name; see the module's docstring."""

    def __init__(self, folders: Mapping[str, Path]) -> None:
        self.folders = dict(folders)
        self._running: asyncio.Future[dict[str, int]] | None = None
        self._next: asyncio.Future[dict[str, int]] | None = None

    async def counts(self) -> dict[str, int]:
        if self._next is None:
            self._next = asyncio.ensure_future(self._scan(self._running))
        # shielded: a client that goes away does not cancel the scan the others wait for
        return await asyncio.shield(self._next)

    async def _scan(self, previous: asyncio.Future[dict[str, int]] | None) -> dict[str, int]:
        if previous is not None:
            await asyncio.wait([previous])
        self._running, self._next = self._next, None
        try:
            return await asyncio.to_thread(self._count_all)
        finally:
            if self._running is asyncio.current_task():
                self._running = None

    def _count_all(self) -> dict[str, int]:
        return {name: count(path, NOT_COUNTED.get(name)) for name, path in self.folders.items()}


async def result(path: Path) -> dict[str, Any] | None:
    """A result record as JSON data, read in a thread; None if there is none."""
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        return None
    record: dict[str, Any] = json.loads(data)
    return record

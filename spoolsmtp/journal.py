"""The write-ahead journal: each recipient's final reply is on disk before the worker moves on.

One append-only file of JSON lines per segment in ``journal/``, shared by all envelopes, so
that one fsync commits the records of every envelope that wrote since the last one (group
commit). Records:

* ``{"t": "rcpt", "id", "tx", "rcpt", "result": {...}}``: a recipient's final result.
* ``{"t": "dot", "id", "tx", "rcpts": [...]}``: the final dot is about to be sent; a restart
  that finds it without the recipients' results counts them as possible duplicates.
* ``{"t": "report", "id", "kind"}``: a report was durably written.
* ``{"t": "claim", "id", "name"}``: committed just before ``incoming/name`` is renamed to
  ``active/ID.bsmtp``, so that a restart knows the source name of every active envelope.

The journal matters only while an envelope is in ``active/``; once its result record is durable
and it has left ``active/``, its records are dead. A segment whose envelopes have all left is
deleted; a new segment is started when the current one grows past ``SEGMENT_BYTES``.
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spoolsmtp.durable import fsync_dir
from spoolsmtp.iobatch import IoBatch

SEGMENT_BYTES = 8 * 1024 * 1024


@dataclass
class Replayed:
    """What the journal says of one envelope."""

    results: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    dots: set[tuple[int, str]] = field(default_factory=set)
    reports: set[str] = field(default_factory=set)
    source: str | None = None


def replay(folder: Path) -> dict[str, Replayed]:
    """Read every segment (oldest first); a torn last line is ignored."""
    out: dict[str, Replayed] = defaultdict(Replayed)
    for path in sorted(folder.glob("*.log")):
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                entry = out[rec["id"]]
                if rec["t"] == "rcpt":
                    entry.results[(rec["tx"], rec["rcpt"])] = rec["result"]
                elif rec["t"] == "dot":
                    entry.dots.update((rec["tx"], r) for r in rec["rcpts"])
                elif rec["t"] == "report":
                    entry.reports.add(rec["kind"])
                elif rec["t"] == "claim":
                    entry.source = rec["name"]
    return dict(out)


class Journal:
    """Appends records and commits them in groups; tracks which segments are still needed.

    ``append`` buffers the record and runs a batch operation that names the journal as a sync
    target, so one write and one fdatasync per batch commit the records of every envelope.
    """

    def __init__(self, folder: Path, batch: IoBatch) -> None:
        self.folder = folder
        self.batch = batch
        folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(folder.glob("*.log"))
        self._old = existing
        self._old_ids: set[str] = set()
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._fd = -1
        self._size = 0
        self._segment = 0
        self._live: dict[int, set[str]] = {}
        self._open_segment(int(existing[-1].stem) + 1 if existing else 1)
        self.records = 0
        self.commits = 0

    def _open_segment(self, number: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.folder / f"{number:08d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size
        self._segment = number
        self._live.setdefault(number, set())
        fsync_dir(self.folder)

    def adopt(self, ids: set[str]) -> None:
        """Envelopes resumed at start whose records live in the old segments."""
        self._old_ids = set(ids)
        self._drop_old_if_unused()

    async def append(self, record: dict[str, Any]) -> None:
        """Write a record and return once it is on disk (shared fdatasync)."""
        data = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            self._buffer.append(data)
            self._live.setdefault(self._segment, set()).add(record["id"])
        self.records += 1
        await self.batch.run(self._target)

    def _target(self) -> tuple[Journal]:
        return (self,)

    def sync(self) -> None:
        """Write what is buffered and fdatasync it (in the I/O thread, once per batch)."""
        with self._lock:
            data = b"".join(self._buffer)
            self._buffer = []
            fd = self._fd
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
        self.commits += 1
        with self._lock:
            self._size += len(data)
            if self._size > SEGMENT_BYTES:
                self._open_segment(self._segment + 1)

    def finished(self, envelope_id: str) -> None:
        """The envelope has left active/ with a durable record: its records are dead."""
        with self._lock:
            for number, ids in list(self._live.items()):
                ids.discard(envelope_id)
                if not ids and number != self._segment:
                    (self.folder / f"{number:08d}.log").unlink(missing_ok=True)
                    del self._live[number]
        if envelope_id in self._old_ids:
            self._old_ids.discard(envelope_id)
            self._drop_old_if_unused()

    def _drop_old_if_unused(self) -> None:
        if not self._old_ids and self._old:
            for path in self._old:
                path.unlink(missing_ok=True)
            self._old = []

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

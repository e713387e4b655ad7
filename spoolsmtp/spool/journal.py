"""The write-ahead journal: each recipient's final reply is on disk before the worker moves on.

One append-only file of JSON lines per segment in ``journal/``, shared by all envelopes, so
that one fsync commits the records of every envelope that wrote since the last one (group
commit). Records:

* ``{"t": "rcpt", "id", "tx", "rcpt", "result": {...}}``: a recipient's final result.
* ``{"t": "dot", "id", "tx", "rcpts": [...], "m"}``: the final dot may be sent from here on; a
  restart that finds it without the recipients' results counts them as possible duplicates.
  Its commit is begun while the delivery waits on deck for a connection (and at the latest
  with MAIL, RCPT and DATA), and the dot waits for it (journalmark.py).
  Each mark has its own random ``m``.
* ``{"t": "undot", "id", "tx", "rcpts": [...], "m"}`` takes back mark ``m`` of these
  recipients: the transaction ended without the dot for them (refused, or lost before it).
  One for a transaction that ended without its dot (or a mark no transaction took) asks
  for a commit soon; one for recipients refused at RCPT rides with the next. Lost in a
  crash, the restart counts a duplicate that cannot be one, which is the safe side.
* ``{"t": "report", "id", "kind"}``: a report was durably written.
* ``{"t": "requeue", "id", "kind", "as"}``: the report ``kind`` is to be queued for delivery
  as envelope ``as`` (committed before that envelope is written: see app/requeue.py).
* ``{"t": "claim", "id", "name", "uid"?, "gid"?}``: committed just before ``incoming/name`` is
  renamed to ``active/ID.bsmtp``, so that a restart knows the source name of every active
  envelope, and who owned the file (its copy in active/ is the worker's).
* ``{"t": "record", "id", "record": {...}}``: the result record, committed before
  ``results/ID.json`` is replaced with it. The file itself is written atomically but not
  fsynced: the journal is what makes it durable, until a checkpoint.
* ``{"t": "phase", "id", "phase", "crashes"?, "alone"?}``: ``reading`` is committed before the
  envelope file is read, ``read`` after it was read, ``stopped`` when a clean stop (SIGTERM,
  SHUTDOWN) leaves it in ``active/``. A restart that finds ``reading`` last knows the worker died
  while the envelope was being read (quarantine.py decides whom to blame).

A checkpoint (every second or so, in the background) makes everything written to the spool
durable with one syncfs(2), then deletes the segments whose records are all dead: a record is
dead once its envelope has left ``active/`` and its result file was written, and a checkpoint
has synced that file. So one fdatasync of the journal stands in for the fsync of every result
file and every directory a finished envelope touched, and a restart first restores from the
journal any result record the file system lost. A new segment is started when the current one
grows past ``SEGMENT_BYTES``, or at a checkpoint when none of its envelopes is active; the
records of envelopes still active are copied into the new segment, so no old one waits on them.

A commit reports success only for records that are on disk: lines leave the buffer once written
and fdatasynced, and a failed write (a full disk, EIO) cuts the segment back to its last good
offset, so the lines stay pending and nothing is ever appended to a torn line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spoolsmtp.spool import crashpoint
from spoolsmtp.spool.durable import fsync_dir, sync_filesystems
from spoolsmtp.spool.iobatch import IoBatch

SEGMENT_BYTES = 8 * 1024 * 1024


@dataclass
class Replayed:
    """What the journal says of one envelope."""

    results: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    # (tx, recipient): the ``m`` of each ``dot`` of it not taken back by an ``undot``
    # (None: a line written before marks had one; it is never taken back)
    marks: dict[tuple[int, str], set[str | None]] = field(default_factory=dict)
    reports: set[str] = field(default_factory=set)
    requeued: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    record: dict[str, Any] | None = None
    phase: str | None = None
    crashes: int = 0
    alone: bool = False
    owner: tuple[int, int] | None = None  # uid, gid of incoming/name when it was claimed
    hold: bool = False  # an operator's HOLD while it was being delivered: held after it

    @property
    def dots(self) -> set[tuple[int, str]]:
        """The recipients a final dot may have been sent to (a mark not taken back)."""
        return set(self.marks)


def replay(folder: Path) -> dict[str, Replayed]:
    """Read every segment (oldest first); a torn last line is ignored."""
    out: dict[str, Replayed] = defaultdict(Replayed)
    for path in sorted(folder.glob("*.log")):
        with open(path, "rb") as fh:
            _read_lines(out, fh)
    return dict(out)


def _read_lines(out: dict[str, Replayed], lines: Iterable[bytes]) -> None:
    for raw in lines:
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        entry = out[rec["id"]]
        if rec["t"] == "rcpt":
            entry.results[(rec["tx"], rec["rcpt"])] = rec["result"]
        elif rec["t"] == "dot":
            for r in rec["rcpts"]:
                entry.marks.setdefault((rec["tx"], r), set()).add(rec.get("m"))
        elif rec["t"] == "undot":
            for r in rec["rcpts"]:
                key = (rec["tx"], r)
                marks = entry.marks.get(key)
                if marks is not None:
                    marks.discard(rec["m"])
                    if not marks:
                        del entry.marks[key]
        elif rec["t"] == "report":
            entry.reports.add(rec["kind"])
        elif rec["t"] == "requeue":
            entry.requeued[rec["kind"]] = rec["as"]
        elif rec["t"] == "claim":
            entry.source = rec["name"]
            if "uid" in rec:
                entry.owner = (rec["uid"], rec["gid"])
        elif rec["t"] == "record":
            entry.record = rec["record"]
        elif rec["t"] == "hold":
            entry.hold = bool(rec.get("on", True))
        elif rec["t"] == "phase":
            entry.phase = rec["phase"]
            entry.crashes = 0 if rec["phase"] == "read" else rec.get("crashes", 0)
            entry.alone = rec.get("alone", False)


def _adopted(paths: Iterable[Path]) -> dict[str, _Lines]:
    """The lines of every envelope in ``paths`` (oldest first; its newest record only)."""
    out: dict[str, _Lines] = {}
    for path in paths:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue  # a torn last line
                lines = out.setdefault(rec["id"], _Lines())
                line = raw if raw.endswith(b"\n") else raw + b"\n"
                if rec["t"] == "record":
                    lines.record = line
                else:
                    lines.other.append(line)
    return out


def carried(folder: Path, ids: Iterable[str]) -> dict[str, list[bytes]]:
    """The journal lines in ``folder`` (a dead node's) of each of ``ids`` (its newest result
    record last), for ``Journal.take`` to carry into another node's journal."""
    found = _adopted(sorted(folder.glob("*.log")))
    return {i: found[i].lines() for i in ids if i in found}


def drop_segments(folder: Path) -> int:
    """Delete every segment in ``folder`` (a dead node's, whose records were carried or
    restored and synced), durably; how many."""
    segments = sorted(folder.glob("*.log"))
    for path in segments:
        path.unlink(missing_ok=True)
    if segments:
        fsync_dir(folder)
    return len(segments)


@dataclass
class _Lines:
    """What an active envelope has journaled, to copy forward when a segment is closed."""

    other: list[bytes] = field(default_factory=list)
    record: bytes | None = None

    def lines(self) -> list[bytes]:
        return self.other if self.record is None else [*self.other, self.record]


class Journal:
    """Appends records and commits them in groups; checkpoints and drops dead segments.

    Appends are buffered; the I/O batch commits the buffer (one write, one fdatasync) before it
    runs its operations, so the records of every envelope that wrote since the last batch share
    one fdatasync.
    """

    def __init__(self, folder: Path, batch: IoBatch) -> None:
        self.folder = folder
        self.batch = batch
        folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(folder.glob("*.log"))
        self._old = [int(p.stem) for p in existing]
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._buffer_ids: list[str] = []  # whose line each one in _buffer is
        self._fd = -1
        self._size = 0
        self._torn = False
        self._segment = 0
        self._live: dict[int, set[str]] = {}
        self._retired: list[int] = []
        self._carry: dict[str, _Lines] = {}
        self._carried = 0
        self._open_segment(self._old[-1] + 1 if self._old else 1)
        batch.log = self
        self.records = 0
        self.commits = 0
        self.checkpoints = 0

    def _open_segment(self, number: int) -> None:
        """Open (or create) segment ``number`` and make it the current one. The new one is
        opened before the old is closed: when that fails (no inode left) the old stays."""
        path = self._path(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._segment = number
        self._torn = False
        self._live.setdefault(number, set())
        fsync_dir(self.folder)

    def _path(self, number: int) -> Path:
        return self.folder / f"{number:08d}.log"

    def _rotate(self) -> None:
        """Start a new segment (I/O lock held) and copy into it, committed, the records of
        every envelope still active (their newest result record only): then no older segment
        is needed for them, and one envelope stuck on a slow server for an hour pins one
        segment's worth of its own records, not every segment written since it began."""
        self._open_segment(self._segment + 1)
        with self._lock:
            carried = {i: c.lines() for i, c in self._carry.items()}
        data = b"".join(line for lines in carried.values() for line in lines)
        if data:
            try:
                self._write(data)
            except OSError:
                # the older segments still hold these records: they stay until it works
                self._carried = 0
                return
        self._carried = len(data)
        with self._lock:
            self._live[self._segment].update(carried)
            for number in [n for n in self._live if n != self._segment]:
                self._live[number].difference_update(carried)
                if not self._live[number]:
                    del self._live[number]
                    self._retired.append(number)

    def _write(self, data: bytes) -> None:
        """Append to the current segment and fdatasync (I/O lock held).

        On failure (ENOSPC, EIO, a short write then an error) the segment is cut back to
        its last good offset, so that no torn line is left for the next record to be
        appended to; if even that fails, the next write starts a new segment."""
        if self._torn:
            self._mend()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._torn = True
            raise OSError(exc.errno, exc.strerror, str(self._path(self._segment))) from exc
        self.commits += 1
        self._size += len(data)

    def _mend(self) -> None:
        """The current segment may end in a torn line: cut it back, or begin a new one."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            old = self._segment
            self._open_segment(old + 1)
            with self._lock:
                if not self._live.get(old):
                    self._live.pop(old, None)
                    self._retired.append(old)
        else:
            self._torn = False

    def adopt(self, ids: set[str]) -> None:
        """The segments found at start stay until the envelopes resumed from them finish.

        What those envelopes wrote before the restart (claim, dots, results, their newest
        record) is taken into memory as if written since: ``known`` then tells a put-back
        retry of it, and a new segment copies it forward before the old ones may go."""
        carry = _adopted(self._path(n) for n in self._old) if ids else {}
        with self._lock:
            for envelope_id in ids:
                old = carry.get(envelope_id)
                if old is not None:
                    new = self._carry.get(envelope_id, _Lines())
                    old.other.extend(new.other)
                    old.record = new.record or old.record
                    self._carry[envelope_id] = old
            for number in self._old:
                if ids:
                    self._live[number] = set(ids)
                else:
                    self._retired.append(number)
            self._old = []

    def take(self, carried: dict[str, list[bytes]]) -> None:
        """Buffer lines another node's journal holds (``carried``), as if written here: each
        envelope is then known, and live, as one of ours. ``commit`` makes them durable."""
        for envelope_id, lines in carried.items():
            for line in lines:
                self._add(envelope_id, line, record=json.loads(line)["t"] == "record")

    def append(self, record: dict[str, Any]) -> None:
        """Buffer a record; the next I/O batch commits it before running its operations."""
        self._add(record["id"], _COMPACT(record).encode() + b"\n")

    def append_record(self, envelope_id: str, record_json: bytes) -> None:
        """Buffer a result record (already JSON; embedded as it is, not encoded again)."""
        head = _COMPACT({"t": "record", "id": envelope_id})[:-1]
        line = b"".join((head.encode(), b',"record":', record_json.rstrip(), b"}\n"))
        self._add(envelope_id, line, record=True)

    def _add(self, envelope_id: str, line: bytes, record: bool = False) -> None:
        with self._lock:
            self._buffer.append(line)
            self._buffer_ids.append(envelope_id)
            # get, then build only what is missing: ``setdefault`` would build a set and a
            # ``_Lines`` for every line, and this runs several times per envelope
            live = self._live.get(self._segment)
            if live is None:
                live = self._live[self._segment] = set()
            live.add(envelope_id)
            carry = self._carry.get(envelope_id)
            if carry is None:
                carry = self._carry[envelope_id] = _Lines()
            if record:
                carry.record = line
            else:
                carry.other.append(line)
        self.records += 1

    async def commit(self) -> None:
        """Return once everything appended so far is on disk (shared fdatasync)."""
        await self.batch.run(quick=True)

    def commit_soon(self) -> asyncio.Future[None]:
        """``commit`` begun now, awaited later: the future is done once everything appended
        so far is on disk (or holds the error that kept it off). A caller that stops caring
        must still take that error (``IoBatch.request``)."""
        return self.batch.request(quick=True)

    def sync(self) -> None:
        """Write what is buffered and fdatasync it (in an I/O thread, first in every batch).

        The I/O lock is held until the fdatasync returns, so a batch that finds the buffer
        empty still waits for a commit another lane has in flight before running its ops.
        """
        with self._io_lock:
            with self._lock:
                taken = len(self._buffer)
                data = b"".join(self._buffer)
            if not data:
                return
            # the lines leave the buffer only once they are on disk: after a failed write
            # they stay, and every later commit fails until they are written (or succeeds
            # once they are), so no caller hears "durable" of a record that is not
            self._write(data)
            with self._lock:
                # the segment they went into holds them, whichever was current when they
                # were appended (a new one may have been begun since): it stays while their
                # envelopes are active
                written = set(self._buffer_ids[:taken]).intersection(self._carry)
                self._live.setdefault(self._segment, set()).update(written)
                del self._buffer[:taken]
                del self._buffer_ids[:taken]
            if self._size - self._carried > SEGMENT_BYTES:
                # the records are durable whatever happens here; a new segment that cannot
                # be begun (no inode left) is tried again after the next commit
                with contextlib.suppress(OSError):
                    self._rotate()

    def known(self, envelope_id: str) -> Replayed | None:
        """What the journal holds of an active envelope (written, or pending and written
        before any later commit succeeds), from memory; None if nothing since start."""
        with self._lock:
            carry = self._carry.get(envelope_id)
            lines = list(carry.lines()) if carry is not None else None
        if lines is None:
            return None
        out: dict[str, Replayed] = defaultdict(Replayed)
        _read_lines(out, lines)
        return out.get(envelope_id, Replayed())

    def finished(self, envelope_id: str) -> None:
        """The envelope is out of active/ and its result file is written: its records are
        dead once a checkpoint has synced that file."""
        with self._lock:
            self._carry.pop(envelope_id, None)
            for number, ids in list(self._live.items()):
                ids.discard(envelope_id)
                if not ids and number != self._segment:
                    del self._live[number]
                    self._retired.append(number)

    def checkpoint(self, folders: list[Path]) -> int:
        """Sync the spool's file systems, then delete the segments whose records are dead;
        return how many were deleted. Blocking: run it in a thread."""
        with self._io_lock:
            with self._lock:
                idle = not self._buffer and not self._live.get(self._segment)
            if idle and self._size > 0:
                self._rotate()
            with self._lock:
                victims, self._retired = self._retired, []
        if not victims:
            return 0
        crashpoint.reach("before_checkpoint")
        try:
            sync_filesystems(folders)
        except OSError:
            with self._lock:
                self._retired.extend(victims)
            raise
        for number in victims:
            self._path(number).unlink(missing_ok=True)
        fsync_dir(self.folder)
        self.checkpoints += 1
        return len(victims)

    def close(self) -> None:
        with self._io_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# one encoder for every line (json.dumps with options would build one per call)
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode

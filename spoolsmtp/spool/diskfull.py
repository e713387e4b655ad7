"""Disk full is a state: the reserve of free space and inodes, the pause and the resume, and I/O
errors logged once per episode instead of once per failed write.

The worker asks ``DiskWatch.ok`` before it takes a file or starts a retry. The watch leaves that
state set while the spool's file systems have more free space and inodes than the configured
reserve (``spool.min_free_space``, ``spool.min_free_inodes``) and writes succeed. When either
falls under the reserve, or a write fails with ENOSPC or EDQUOT, the watch clears it: one log
line, ``disk_full_pauses`` counted, QUERY and STATS say since when. It then looks again with
backoff, and once the reserve is back and a probe write (and the journal's pending records)
get to disk, it says so in one more line and sets the state again. Envelopes in flight go on;
those whose work failed are put back by the worker and wait for the same state.

Other write errors (EIO, EROFS, ...) are logged once per kind per episode: a kind is logged
again only after ``QUIET_AFTER`` seconds without an error of that kind.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from spoolsmtp.model.stats import Stats
from spoolsmtp.spool import durable

log = logging.getLogger("spoolsmtp")

CHECK_INTERVAL = 1.0
MAX_BACKOFF = 8.0
QUIET_AFTER = 60.0
PROBE_BYTES = 1024 * 1024
FULL = (errno.ENOSPC, errno.EDQUOT)
# faults of the machine, not of an envelope: work that meets one is put back and tried again,
# never blamed on the file (rejected) it happened to be reading or copying
NOT_THE_ENVELOPES = (*FULL, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def machine_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the disk or the machine rather than of the file."""
    return isinstance(exc, OSError) and exc.errno in NOT_THE_ENVELOPES


class SpoolNotWritable(OSError):
    """A spool folder cannot be created or written (a read-only file system, another owner)."""


def check_writable(folders: Iterable[Path]) -> None:
    """Create every folder, and insist that this process may write in each: at start, one
    clear error naming the folder instead of a traceback at the first write."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolNotWritable(exc.errno, exc.strerror, str(folder)) from exc
        if not os.access(folder, os.W_OK | os.X_OK):
            code = errno.EROFS if _read_only(folder) else errno.EACCES
            raise SpoolNotWritable(code, os.strerror(code), str(folder))


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class DiskWatch:
    """Whether the spool has room to work; see the module's docstring."""

    def __init__(
        self,
        folders: Iterable[Path],
        min_free_space: int,
        min_free_inodes: int,
        stats: Stats,
        on_resume: Callable[[], None] | None = None,
    ) -> None:
        self.folders = list(folders)
        self.min_free_space = min_free_space
        self.min_free_inodes = min_free_inodes
        self.stats = stats
        self.on_resume = on_resume
        self.ok = asyncio.Event()
        self.ok.set()
        self.since: float | None = None
        self.reason = ""
        self._errors: dict[int, float] = {}

    @property
    def full(self) -> bool:
        return self.since is not None

    def shortage(self) -> str | None:
        """What is under the reserve on the spool's file systems, or None. Blocking."""
        seen: set[int] = set()
        for folder in self.folders:
            try:
                vfs = os.statvfs(folder)
            except OSError:
                continue
            if vfs.f_fsid in seen:
                continue
            seen.add(vfs.f_fsid)
            space = vfs.f_bavail * vfs.f_frsize
            if space < self.min_free_space:
                return f"{folder}: {space // 1024} KiB free, under spool.min_free_space"
            # a file system with no inode count (f_files 0) has no inode limit
            if vfs.f_files and vfs.f_favail < self.min_free_inodes:
                return f"{folder}: {vfs.f_favail} inodes free, under spool.min_free_inodes"
        return None

    def failed(self, exc: BaseException, what: str) -> None:
        """A write (or the work of an envelope) failed: a full disk begins the disk-full
        state; another I/O error is logged once per episode; anything else is a bug and
        keeps its traceback."""
        if isinstance(exc, OSError) and exc.filename:
            what = f"{what}: {exc.filename}"
        if isinstance(exc, OSError) and exc.errno in FULL:
            self.enter(f"{what}: {exc.strerror}")
        elif isinstance(exc, OSError):
            now = time.monotonic()
            last = self._errors.get(exc.errno or 0)
            self._errors[exc.errno or 0] = now
            if last is None or now - last > QUIET_AFTER:
                log.error(
                    "%s: %s (the work is tried again; further errors like this are not logged"
                    " while they go on)",
                    what,
                    exc.strerror or exc,
                )
        else:
            log.error("%s failed", what, exc_info=exc)

    def enter(self, reason: str) -> None:
        """Begin the disk-full state (once per episode)."""
        if self.since is not None:
            return
        self.since = time.time()
        self.reason = reason
        self.stats.disk_full_pauses += 1
        self.ok.clear()
        log.error("disk full (%s): taking no new files until there is room again", reason)

    def _leave(self) -> None:
        assert self.since is not None
        took = time.time() - self.since
        self.since = None
        self.reason = ""
        self._errors.clear()
        self.ok.set()
        log.warning("disk space available again after %.0fs: taking files again", took)
        if self.on_resume is not None:
            self.on_resume()

    async def run(self, flush: Callable[[], Awaitable[None]]) -> None:
        """Look at the reserve every second; when full, with backoff until there is room
        and a probe write and ``flush`` (the journal's pending records) succeed."""
        backoff = CHECK_INTERVAL
        while True:
            shortage = await asyncio.to_thread(self.shortage)
            if shortage is not None:
                self.enter(shortage)
            elif self.full:
                try:
                    await asyncio.to_thread(self._probe)
                    await flush()
                except OSError as exc:
                    self.reason = f"{exc.filename or 'spool'}: {exc.strerror}"
                else:
                    self._leave()
            if self.full:
                delay, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            else:
                delay, backoff = CHECK_INTERVAL, CHECK_INTERVAL
            await asyncio.sleep(delay)

    def _probe(self) -> None:
        """Write (and sync, and remove) a file of ``PROBE_BYTES`` in the first folder (the
        journal's): a disk that takes it has room for the next records, and a little room
        freed does not end the state only to begin it again at the next write."""
        folder = self.folders[0]
        path = folder / ".spoolsmtp-space-probe"
        try:
            durable.write_file(path, b"\0" * PROBE_BYTES, sync_dir=False)
        finally:
            path.unlink(missing_ok=True)

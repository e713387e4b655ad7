"""One worker per spool: an exclusive flock(2) on each folder that holds mail in flight.

The folders themselves are locked (``active/`` and ``journal/``), not a file beside them: a
second worker whose config names another ``spool.path`` but shares these folders is refused
too, and there is no lock file whose owner could stand in the way when the spool changes hands
(root to a dedicated ``user``). The locks are taken before anything in the spool is touched
(journal replay included) and held for the life of the process. The kernel drops them when the
process dies, however it dies, so kill -9 never blocks a restart: only a live holder does,
and it is named by its pid (from /proc/locks).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path


class SpoolBusy(Exception):
    """Another live process holds the lock of one of the spool's folders."""

    def __init__(self, path: Path, pid: str) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path}: spool already in use by {holder}; not starting a second worker")


class SpoolLock:
    """The held locks; ``release`` (or the process's death) lets the next worker in."""

    def __init__(self, folders: Iterable[Path]) -> None:
        self.folders = list(folders)
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Lock every folder (made if missing); SpoolBusy naming the holder if one is taken."""
        try:
            for folder in self.folders:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self._fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise SpoolBusy(folder, holder(fd)) from None
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def holder(fd: int, locks: Path = Path("/proc/locks")) -> str:
    """The pid holding a flock on the file open as ``fd``, or "" if it cannot be told."""
    info = os.fstat(fd)
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = locks.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
            return fields[4]
    return ""

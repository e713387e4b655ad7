"""One worker per spool: an exclusive flock(2) on ``worker.lock`` in the spool, holding the pid.

The lock is taken before anything else in the spool is touched (journal replay included) and
held for the life of the process. The kernel drops it when the process dies, however it dies,
so a stale lock file left by kill -9 never blocks a restart: only a live holder does.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "worker.lock"


class SpoolBusy(Exception):
    """Another live process holds the spool's lock."""

    def __init__(self, path: Path, pid: str) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process (pid not yet written)"
        super().__init__(f"{path}: spool already in use by {holder}; not starting a second worker")


class SpoolLock:
    """The held lock; ``release`` (or the process's death) lets the next worker in."""

    def __init__(self, spool: Path) -> None:
        self.path = spool / LOCK_NAME
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock and write our pid into the file; SpoolBusy if a live worker has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise SpoolBusy(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

"""One worker per node: an exclusive flock(2) on each folder that holds mail in flight, and an
fcntl(2) lock on the node's lock file that says, across hosts, that the node is alive.

The folders themselves are locked (``active/`` and ``journal/``), not a file beside them: a
second worker whose config names another ``spool.path`` but shares these folders is refused
too, and there is no lock file whose owner could stand in the way when the spool changes hands
(root to a dedicated ``user``). The locks are taken before anything in the spool is touched
(journal replay included) and held for the life of the process. The kernel drops them when the
process dies, however it dies, so kill -9 never blocks a restart: only a live holder does,
and it is named by its pid (from /proc/locks).

The folder flocks are enough on one host. Across hosts sharing the spool on a network or cluster
file system they are not: Linux's NFS client has no flock for directories (the lock stays on
the client), and it emulates flock on files with POSIX byte-range locks anyway. So each node
also holds an exclusive POSIX (``lockf``, ``F_SETLK``) lock on ``LOCK_FILE`` in its journal
folder: the one lock NFSv4, CephFS and GPFS keep on the server and release when the holder dies
(on NFSv4 when its lease runs out). A POSIX lock belongs to the process, not to a descriptor:
it is not inherited across fork, and closing any descriptor of that file in the process drops
it; so the lock file is opened exactly once per node per process (``SpoolLock``), and
``alive`` only tests it (``F_GETLK``), never opens and closes it where it is held.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterable
from pathlib import Path

LOCK_FILE = "node.lock"
# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid (+ padding)
_FLOCK = "hhqqi4x"


class SpoolBusy(Exception):
    """Another live process holds the lock of one of the spool's folders."""

    def __init__(self, path: Path, pid: str) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path}: spool already in use by {holder}; not starting a second worker")


class SpoolLock:
    """The held locks; ``release`` (or the process's death) lets the next worker in.
    ``lock_file``: also hold a POSIX lock on it (made if missing), after the folders' flocks."""

    def __init__(self, folders: Iterable[Path], lock_file: Path | None = None) -> None:
        self.folders = list(folders)
        self.lock_file = lock_file
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Lock every folder (made if missing), then the lock file; SpoolBusy naming the
        holder if one is taken. Never blocks."""
        try:
            for folder in self.folders:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self._fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise SpoolBusy(folder, holder(fd)) from None
            if self.lock_file is not None:
                self._lock_file(self.lock_file)
        except BaseException:
            self.release()
            raise

    def _lock_file(self, path: Path) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        self._fds.append(fd)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise SpoolBusy(path, holder(fd)) from None

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def alive(lock_file: Path) -> bool:
    """Does some process (on any host sharing the file system) hold ``lock_file``'s POSIX
    lock? Tested with ``F_GETLK``, which takes nothing and so can never drop or block the
    holder's lock. A missing file is no holder; a test that cannot be made says True (a node
    that may be alive is never taken for dead). The caller's own locks are invisible to it."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError:
        return True
    finally:
        os.close(fd)
    return bool(struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK)


def holder(fd: int, locks: Path = Path("/proc/locks")) -> str:
    """The pid holding a flock or POSIX lock on the file open as ``fd`` (on this host), or ""
    if it cannot be told."""
    info = os.fstat(fd)
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = locks.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] in ("FLOCK", "POSIX") and fields[5] == key:
            return fields[4]
    return ""

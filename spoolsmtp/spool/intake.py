"""Taking a file from a submitter safely: its name, whether a writer still has it open, and
reading it only through one descriptor that cannot be a link, a FIFO or a device.

* Names are kept as the file system gives them (``os.fsdecode``: bytes that are not UTF-8 become
  lone surrogates, and ``os.fsencode`` gives the same bytes back). Limits are in bytes.
* A file some process still has open for writing is never taken: on Linux a read lease
  (``F_SETLEASE``, ``F_RDLCK``) cannot be had while any writer has it open. The lease is held
  while the file is renamed into ``active/``, so a writer opening it then waits until it is ours.
  Where leases cannot be had (another file system, no ``CAP_LEASE`` for another user's file) the
  settle rule alone applies, and the before/after check below still catches a change.
* Every read of a claimed file goes through one descriptor opened ``O_NOFOLLOW|O_NONBLOCK`` and
  checked with ``fstat``; what is read is checked again afterwards (size, mtime, ctime), and a
  change is an error, never a silent cut.
* A file the worker does not own, or that has another link, is copied (through that descriptor)
  into a worker-owned 0600 file before it is read: after the claim the submitter cannot change
  what is checked and sent. The worker's own files need no copy.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import stat
import threading
from collections.abc import Callable
from typing import BinaryIO, TypeVar

from spoolsmtp.model.errors import EnvelopeFault
from spoolsmtp.spool.durable import replacing

NAME_MAX = 255
REASON = ".reason"
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
COPY_CHUNK = 1 << 20
T = TypeVar("T")


class NotRegular(Exception):
    """The claimed file is not a regular file (a symlink, FIFO or device slipped in)."""


class Busy(Exception):
    """Some process still has the file open for writing."""


class Changed(OSError):
    """The file changed while it was being read."""


# -- names ---------------------------------------------------------------------------------


def size(name: str) -> int:
    """A name's length in bytes, as the file system counts it."""
    return len(os.fsencode(name))


def refusal(name: str) -> str | None:
    """Why ``incoming/name`` is never taken (None for a takeable name and for the temp names
    writers use, which are skipped without a word)."""
    if not name or name.startswith(".") or name.endswith(".tmp"):
        return None
    if _UNSAFE.search(name):
        return "its name holds control characters or a backslash"
    if size(name) > NAME_MAX:
        return f"its name is longer than {NAME_MAX} bytes"
    return None


def shown(name: str) -> str:
    """A name for a log line: bytes that are not UTF-8 as ``\\xNN``, control characters
    escaped, so one name is one readable line."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def rejected_name(envelope_id: str, source: str) -> str:
    """``ID.NAME`` for ``rejected/``, shortened (at a character boundary, marked with ``~``)
    when ``ID.NAME.reason`` would not fit in a file name; the full name is in the reason."""
    name = f"{envelope_id}.{source}"
    if size(name) + len(REASON) <= NAME_MAX:
        return name
    room = NAME_MAX - len(REASON) - len(envelope_id) - 2
    raw = os.fsencode(source)[:room]
    for cut in range(4):
        try:
            text = raw[: len(raw) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return f"{envelope_id}.{text}~"
    return f"{envelope_id}.{os.fsdecode(raw)}~"


# -- writers that still have the file open ---------------------------------------------------


def quiet_lease_breaks() -> None:
    """A writer opening a file while we hold its lease makes the kernel signal us (SIGIO,
    which would end the process): we give the lease back within the claim anyway."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, signal.SIG_IGN)


def hold_still(path: str) -> int | None:
    """A read lease on ``path``: held, the descriptor to give back with ``let_go``; None
    where no lease can be had (not a regular file, or leases not possible here: the claim
    goes on, and reading the file decides). Raises ``Busy`` while a writer has it open, and
    ``FileNotFoundError`` if it is gone."""
    try:
        fd = os.open(path, _OPEN)
    except FileNotFoundError:
        raise
    except OSError:
        return None  # a symlink (ELOOP) or worse: claimed as it is, rejected when read
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            raise Busy(path) from None
        return None
    return fd


def let_go(fd: int | None) -> None:
    if fd is not None:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        finally:
            os.close(fd)


# -- reading through one descriptor ------------------------------------------------------------


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open without following links or blocking on a FIFO; insist on a regular file."""
    fd = os.open(path, _OPEN)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegular(path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def check_unchanged(fd: int, before: os.stat_result) -> None:
    """Raise ``Changed`` if the file behind ``fd`` is not as ``before`` says."""
    after = os.fstat(fd)
    if not same(before, after):
        raise Changed(
            errno.EBUSY,
            f"changed while being read ({before.st_size} bytes, then {after.st_size}):"
            " is it still being written?",
        )


def checked(read: Callable[..., T], fh: BinaryIO, *args: object) -> T:
    """``read(fh, *args)``, then insist that the file did not change meanwhile."""
    before = os.fstat(fh.fileno())
    result = read(fh, *args)
    check_unchanged(fh.fileno(), before)
    return result


def why_not_read(source: str, exc: Exception) -> str:
    """The reason a claimed file is rejected, for the record and ``.reason``."""
    if isinstance(exc, EnvelopeFault):
        return str(exc)
    if isinstance(exc, Changed):
        return f"{source}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
        return f"{source}: cannot read: {exc.strerror}"
    return f"{source}: not a regular file"


def foreign(info: os.stat_result) -> bool:
    """Whether someone else could still change the file: not ours, or linked elsewhere."""
    return info.st_uid != os.geteuid() or info.st_nlink > 1


def copy_own(fd: int, info: os.stat_result, path: str) -> None:
    """Replace ``path`` with a worker-owned 0600 copy of what ``fd`` reads, and close ``fd``.
    Blocking; the copy is fsynced, the folder is not (a lost rename only means copying the
    same bytes again). Raises ``Changed`` or ``OSError``."""
    try:
        with replacing(path, sync_dir=False, mode=0o600) as out:
            while chunk := os.read(fd, COPY_CHUNK):
                out.write(chunk)
            check_unchanged(fd, info)
    finally:
        os.close(fd)

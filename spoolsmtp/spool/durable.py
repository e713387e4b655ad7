"""Durable files: write a temp file, fsync it, rename it into place, fsync the directory.

These are the blocking primitives; ``iobatch`` runs them in groups so that one directory fsync
covers many files, and ``sync_filesystems`` makes everything written to the spool's file systems
durable at once (the journal's checkpoint).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

_syncfs: Any
try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs
except (AttributeError, OSError):  # not Linux: sync(2) does the same for every file system
    _syncfs = None


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystems(folders: Iterable[Path]) -> None:
    """Make every write to the file systems holding ``folders`` durable: one syncfs(2) per
    file system (so one call covers thousands of files), or sync(2) where there is none."""
    if _syncfs is None:
        os.sync()
        return
    seen: set[int] = set()
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            device = os.fstat(fd).st_dev
            if device not in seen:
                seen.add(device)
                if _syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"syncfs {folder}: {os.strerror(err)}")
        finally:
            os.close(fd)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def _temp(path: str, temp_dir: str | None = None) -> str:
    """The temp name starts with a dot so that a reader of the folder (the incoming watcher,
    an operator's ls) never takes a half-written file for a finished one. Its random part
    makes it unpredictable, and it is created with O_EXCL: in a folder others may write
    (incoming/), nobody can plant a file or a link for us to write into. ``temp_dir``, on the
    same file system, holds it instead of ``path``'s own folder."""
    folder, _, name = path.rpartition("/")
    if temp_dir is not None:
        folder = temp_dir
    if len(name) > 60:  # the temp name must fit in a file name too (255 bytes)
        name = os.fsdecode(os.fsencode(name)[:180])
    tail = f".{name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    return f"{folder}/{tail}" if folder else tail


@contextmanager
def _placing(tmp: str, path: str, sync_dir: bool) -> Iterator[None]:
    """Rename ``tmp`` over ``path`` once the body is done; on any failure remove ``tmp`` (a
    full disk leaves nothing behind)."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(path) or ".")


@contextmanager
def replacing(
    path: str | Path, *, fsync: bool = True, sync_dir: bool = True, mode: int = 0o640
) -> Iterator[BinaryIO]:
    """Write a file that replaces ``path`` atomically: a dot-named temp file, fsynced (unless
    ``fsync`` is off, for files that can be rebuilt), renamed into place, the folder fsynced."""
    path = os.fspath(path)
    tmp = _temp(path)
    with _placing(tmp, path, sync_dir), os.fdopen(os.open(tmp, _CREATE, mode), "wb") as fh:
        yield fh
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


def write_file(
    path: str | Path,
    data: bytes,
    *,
    fsync: bool = True,
    sync_dir: bool = True,
    mode: int = 0o640,
    temp_dir: str | None = None,
) -> None:
    """Replace ``path`` with ``data`` as ``replacing`` does; blocking. Plain system calls and
    strings, no file object or Path: the spool writes thousands of these a second. With
    ``temp_dir`` the temp file is written there (a folder only we may write, on the same file
    system) and renamed into ``path``'s folder."""
    path = os.fspath(path)
    tmp = _temp(path, temp_dir)
    with _placing(tmp, path, sync_dir):
        fd = os.open(tmp, _CREATE, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


class NotDurable(Exception):
    """The file is in place (renamed), but making the rename durable failed: ``cause``. Not an
    OSError on purpose: a caller that reports OSError as "not written" must not catch it."""

    def __init__(self, cause: OSError) -> None:
        self.cause = cause
        super().__init__(cause.strerror or str(cause))


def open_folder(path: str | Path) -> int:
    """A descriptor of the folder at ``path`` itself, never of what a symlink there points to
    (ENOTDIR then). O_PATH: it needs no read permission, so it works for a 1733 drop box."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def syncfs_fd(fd: int) -> None:
    """syncfs(2) of the file system holding the open file ``fd`` (sync(2) where there is none)."""
    if _syncfs is None:
        os.sync()
    elif _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def sync_folder_at(dir_fd: int, file_fd: int) -> None:
    """Make a rename in the folder ``dir_fd`` (an O_PATH descriptor) durable: fsync the folder
    when we may open it, else, for a folder we may write but not read, syncfs through the
    renamed file's own descriptor (the same file system)."""
    try:
        folder = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    except PermissionError:
        syncfs_fd(file_fd)
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_new_at(dir_fd: int, name: str, data: bytes, *, mode: int = 0o640) -> None:
    """Write ``name`` in the folder ``dir_fd`` (from ``open_folder``) atomically and durably,
    reading nothing of the folder: an unpredictable dot-named temp file made with O_EXCL and
    O_NOFOLLOW, fsynced and closed for writing, renamed into place, the rename made durable.
    OSError: nothing was placed (the temp file is gone). NotDurable: the file IS in place, only
    its sync failed."""
    tmp = _temp(name)
    fd = os.open(tmp, _CREATE | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            # ``mode`` whatever the caller's umask: a worker that is not root reads a
            # submitter's file through its group (submit.group)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            # closed for writing before it is renamed into place: a worker that sees it
            # arrive takes it at once only if no writer has it open (its read lease); a
            # descriptor that only reads is kept for the sync of a folder we cannot open
            reading = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            os.close(fd)
            fd = reading
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        try:
            sync_folder_at(dir_fd, fd)
        except OSError as exc:
            raise NotDurable(exc) from exc
    finally:
        with contextlib.suppress(OSError):  # written and synced; a late close error means nothing
            os.close(fd)

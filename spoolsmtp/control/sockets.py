"""Creating and removing a control socket without trusting its path.

The socket's folder is opened once and checked through that descriptor: owned by us or root and
writable by nobody else, so no other user can put, swap or remove a name in it. The socket is
bound relative to that descriptor (``/proc/self/fd/N/NAME``, which also lifts the 108-octet limit
of socket paths), with its mode set on the socket before ``bind`` (the file is created with it,
less the umask). Anything still to change afterwards (a mode the umask cut, a group) is changed
through an ``O_PATH|O_NOFOLLOW`` descriptor checked to be the socket we bound: never by a path
that could be a symlink. A name already there is removed only when it is a socket of ours that
no process answers on; anything else stops start-up naming it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from spoolsmtp.model.errors import ConfigError

OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


@dataclass
class Bound:
    """A listening control socket and the folder descriptor it was bound in."""

    sock: socket.socket
    folder_fd: int
    name: str
    path: Path
    inode: tuple[int, int]

    def remove(self) -> None:
        """Unlink the socket's name if it is still the socket we bound; close the folder."""
        with contextlib.suppress(OSError):
            info = os.stat(self.name, dir_fd=self.folder_fd, follow_symlinks=False)
            if (info.st_dev, info.st_ino) == self.inode:
                os.unlink(self.name, dir_fd=self.folder_fd)
        with contextlib.suppress(OSError):
            os.close(self.folder_fd)


def folder_problem(info: os.stat_result, uid: int) -> str | None:
    """Why a socket folder is unsafe (None if it is safe): others may write in it, or it
    belongs to another user."""
    if info.st_uid not in (uid, 0):
        return f"belongs to uid {info.st_uid}, not to the worker (uid {uid}) or root"
    if info.st_mode & OTHERS_WRITE:
        return f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def open_folder(path: Path, key: str, source: str, create_mode: int, gid: int | None = None) -> int:
    """Open and check the socket's folder; one that is missing is made with ``create_mode``
    (and group ``gid``)."""
    folder = path.parent
    created = False
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            created = True
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(source, key, f"{folder}: cannot open: {exc.strerror}") from exc
    if created:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, create_mode)
    problem = folder_problem(os.fstat(fd), os.geteuid())
    if problem:
        os.close(fd)
        raise ConfigError(
            source,
            key,
            f"refusing the socket folder {folder}: it {problem}; make it 0755 or"
            " tighter and owned by the worker's user",
        )
    return fd


def _via_fd(fd: int, name: str = "") -> str:
    return f"/proc/self/fd/{fd}/{name}" if name else f"/proc/self/fd/{fd}"


class SocketInUse(Exception):
    """Another live process answers on the control socket: a worker already runs there (exit
    75, as for a spool in use, not a configuration error)."""

    def __init__(self, path: Path, key: str, pid: int | None) -> None:
        self.path = path
        holder = f"another process (pid {pid})" if pid else "another process"
        super().__init__(f"{path} ({key}): {holder} is answering on this socket; not starting")


def _answering(fd: int, name: str) -> int | bool:
    """The pid of the process that accepts connections on the socket (SO_PEERCRED), True if
    it is alive but not known, False if none does."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(_via_fd(fd, name))
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)  # a full backlog is alive
    finally:
        probe.close()
    pid: int = struct.unpack("3i", creds)[0]
    return pid or True


def clear_stale(fd: int, name: str, path: Path, key: str, source: str) -> None:
    """Remove ``name`` if it is our own dead socket; refuse anything else that is there."""
    try:
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(source, key, f"{path} exists and is not a socket; not touching it")
    alive = _answering(fd, name)
    if alive is not False:
        pid = None if alive is True else alive
        if info.st_uid == os.geteuid():  # ours: a worker already runs there
            raise SocketInUse(path, key, pid)
        shown = f"pid {pid}, " if pid else ""
        raise ConfigError(
            source,
            key,
            f"{path}: another process is answering on this socket ({shown}uid {info.st_uid}),"
            " not a worker of ours",
        )
    if info.st_uid != os.geteuid():
        raise ConfigError(
            source, key, f"{path} is a dead socket of uid {info.st_uid}, not ours; remove it"
        )
    os.unlink(name, dir_fd=fd)


def bind(path: Path, mode: int, gid: int | None, key: str, source: str, folder_mode: int) -> Bound:
    """Create the listening socket at ``path`` with ``mode`` (and group ``gid``)."""
    fd = open_folder(path, key, source, folder_mode, gid)
    try:
        name = path.name
        clear_stale(fd, name, path, key, source)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), mode)
            try:
                sock.bind(_via_fd(fd, name))
            except OSError as exc:
                raise ConfigError(source, key, f"{path}: cannot create: {exc.strerror}") from exc
            inode = _settle(fd, name, mode, gid, path, key, source)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        os.close(fd)
        raise
    sock.setblocking(False)
    return Bound(sock, fd, name, path, inode)


def _settle(
    fd: int, name: str, mode: int, gid: int | None, path: Path, key: str, source: str
) -> tuple[int, int]:
    """Give the new socket its group and any mode bits the umask took, through a descriptor
    of the socket itself (never by a path that could be swapped for a symlink)."""
    handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        info = os.fstat(handle)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
            raise ConfigError(source, key, f"{path} changed under us while it was created")
        try:
            if gid is not None and info.st_gid != gid:
                os.chown(_via_fd(handle), -1, gid)
            if stat.S_IMODE(info.st_mode) != mode:
                os.chmod(_via_fd(handle), mode)
        except OSError as exc:
            problem = f"{path}: cannot set group/mode: {exc.strerror}"
            raise ConfigError(source, key, problem) from exc
        return info.st_dev, info.st_ino
    finally:
        os.close(handle)

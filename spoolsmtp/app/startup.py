"""Start-up checks of the spool's folders: who owns them and who else may write in them.

Like Postfix's queue: every folder belongs to the worker's user and only it may write there;
only ``incoming/`` (the drop box, as Postfix's maildrop) may be writable by group or others,
and then it must be sticky, so one submitter cannot remove or rename another's file. The spool
root must be owned by the worker's user or root and writable by no one else. Anything else
stops start-up with one line naming the folder and what is wrong (exit 78). The control
sockets' folders are held to the rule ``ctlsocket`` applies when it binds, before any mail is
touched.

When root starts a worker that is to run as another user, ``prepare`` first makes the folders
that are missing, owned by that user, and hands over folders still owned by root (with the
files in them, so the worker can read what an earlier root-run worker wrote).
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from pathlib import Path

from spoolsmtp.control.sockets import folder_problem
from spoolsmtp.model.config import Config
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.spool import nodes
from spoolsmtp.spool.diskfull import SpoolNotWritable
from spoolsmtp.spool.folders import FOLDERS

OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
DROP_BOX = "incoming"
NODE = "worker.host_id"


def folders(cfg: Config, node: str | None = None) -> list[tuple[str, Path]]:
    """Each spool folder with its config key; the spool root first. With a node name
    (default ``worker.host_id``), its area instead of active/ and journal/: nodes/,
    nodes/NAME/ (public: the control sockets are there), its active/ and journal/."""
    node = cfg.worker.host_id if node is None else node
    root = nodes.area(cfg.spool, node)
    out = [("spool.path", cfg.spool.path)] + [
        (f"spool.{name}", cfg.spool.folder(name))
        for name in FOLDERS
        if root is None or name not in nodes.OWN
    ]
    if root is not None:
        out += [(NODE, root.parent), (NODE, root)]
        out += [(NODE, nodes.folder(cfg.spool, node, name)) for name in nodes.OWN]
    return out


def problem(name: str, info: os.stat_result, uid: int) -> str | None:
    """What is unsafe about a folder (None: nothing)."""
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    owners = (uid, 0) if name == "spool.path" else (uid,)
    if info.st_uid not in owners:
        return f"belongs to uid {info.st_uid}, not to the worker's uid {uid}"
    if mode & OTHERS_WRITE:
        if name != f"spool.{DROP_BOX}":
            return f"is writable by group or others (mode {mode:04o}); only incoming/ may be"
        if not mode & stat.S_ISVTX:
            return (
                f"is writable by group or others (mode {mode:04o}) but not sticky:"
                " make it 1733 (or 1730 for a group) so no one can remove another's file"
            )
    return None


def check(cfg: Config, uid: int | None = None) -> None:
    """Refuse (ConfigError) the first folder with an unsafe owner or mode."""
    uid = os.geteuid() if uid is None else uid
    for key, path in folders(cfg):
        try:
            info = os.stat(path)
        except FileNotFoundError:
            continue  # made by the worker, with umask 077
        except OSError as exc:
            raise ConfigError(cfg.source, key, f"{path}: {exc.strerror}") from exc
        why = problem(key, info, uid)
        if why:
            raise ConfigError(cfg.source, key, f"refusing {path}: it {why}")
    sockets = (
        ("control.socket", cfg.control_socket),
        ("control.operator_socket", cfg.operator_socket),
    )
    for key, sock in sockets:
        with contextlib.suppress(FileNotFoundError):
            why = folder_problem(os.stat(sock.parent), uid)
            if why:
                raise ConfigError(
                    cfg.source, key, f"refusing the socket folder {sock.parent}: it {why}"
                )


def prepare(cfg: Config, owner: tuple[int, int] | None = None) -> None:
    """Make the folders that are missing: the spool root and incoming/ 0755, the rest 0700
    (whatever the umask). With ``owner`` (root starting a worker that will run as that uid
    and gid) they are made its own, and folders root still owns (and the files in them) are
    handed over to it. Never follows a symlink."""
    for key, path in folders(cfg):
        node_root = key == NODE and path.name not in nodes.OWN
        public = node_root or key in ("spool.path", f"spool.{DROP_BOX}")
        try:
            created = _make(path, 0o755 if public else 0o700)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:  # a read-only or foreign spool: 73, one line, as run promises
            raise SpoolNotWritable(exc.errno, exc.strerror, str(path)) from exc
        try:
            if owner is None or owner[0] == 0 or os.fstat(fd).st_uid != 0:
                continue
            os.fchown(fd, *owner)
            if not created and not public:
                _hand_over(fd, *owner)
        except OSError as exc:
            raise ConfigError(cfg.source, key, f"{path}: cannot hand over: {exc.strerror}") from exc
        finally:
            os.close(fd)
    if owner is not None and owner[0] != 0:
        if _make(cfg.control_socket.parent, 0o755):  # a socket folder root makes is the worker's
            os.chown(cfg.control_socket.parent, *owner, follow_symlinks=False)
        for sock in (cfg.control_socket, cfg.operator_socket):
            _drop_dead_root_socket(sock)
    _operators_folder(cfg, owner)


def _operators_folder(cfg: Config, owner: tuple[int, int] | None) -> None:
    """The operators' socket folder as the config asks for it, made or not: 0700, or 0710 to
    ``control.operator_group``, owned by the worker's user (root hands over one it owns)."""
    folder = cfg.operator_socket.parent
    gid = _group(cfg)
    mode = 0o700 if gid is None else 0o710
    _make(folder, mode)
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            cfg.source, "control.operator_socket", f"{folder}: {exc.strerror}"
        ) from exc
    try:
        info = os.fstat(fd)
        uid = owner[0] if owner is not None and info.st_uid == 0 else info.st_uid
        if uid != os.geteuid() and not (owner is not None and uid == owner[0]):
            return  # someone else's: the start-up check refuses it, naming it
        want_gid = gid if gid is not None else (owner[1] if owner is not None else info.st_gid)
        if (info.st_uid, info.st_gid) != (uid, want_gid):
            os.fchown(fd, uid, want_gid)
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError as exc:
        raise ConfigError(
            cfg.source, "control.operator_group", f"{folder}: cannot set group/mode: {exc.strerror}"
        ) from exc
    finally:
        os.close(fd)


def _group(cfg: Config) -> int | None:
    group = cfg.control.operator_group
    if not group:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ConfigError(cfg.source, "control.operator_group", f"no group {group!r}") from exc


def _drop_dead_root_socket(path: Path) -> None:
    """Root, handing the spool over, removes a socket root's own worker left behind (dead,
    owned by root): the worker, no longer root, could not, and would refuse to start."""
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and info.st_uid == 0:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(2.0)
                try:
                    probe.connect(str(path))
                except ConnectionRefusedError:
                    os.unlink(path)


def _make(path: Path, mode: int) -> bool:
    """Create ``path`` (and missing parents, 0755) with exactly ``mode``; False if it exists."""
    if path.exists() or path.is_symlink():
        return False
    if not path.parent.exists():
        _make(path.parent, 0o755)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def _hand_over(fd: int, uid: int, gid: int) -> None:
    """The files root left in a folder, to the worker's user (symlinks themselves only)."""
    for name in os.listdir(fd):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name, dir_fd=fd, follow_symlinks=False).st_uid == 0:
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

"""Submitting as an ordinary user (``submit.group``): the drop box and the result records
opened to one group, as Postfix's maildrop is to ``postdrop``.

With ``submit.group`` set, the worker makes at every start (before its folders are checked):

- ``incoming/`` mode 3730, group ``submit.group``: members may create files there (``wx``),
  may not list it (no ``r``: one submitter does not learn another's file names), and may not
  remove or rename another's file (sticky). The set-group-id bit gives every file dropped
  there the group too, so a worker that is not root, itself a member, can read a submitter's
  0640 file (root reads anything).
- ``results/`` mode 2710, group ``submit.group``: members may open a record whose name they
  know, never list the folder; the set-group-id bit gives each new record the group, and the
  worker's umask becomes 027 so records are 0640. A submitter knows its own envelope id
  (``submit`` prints it and follows it with ``--wait``); anyone else would have to guess an
  id, and an id is already all it takes to ask the public control socket ``QUERY ID`` for the
  same record, so nothing is disclosed that was not before. (Owner-only copies would need the
  worker to chown to each submitter, which only root may.)

Every other folder stays the worker's alone (0700). Without ``submit.group`` nothing changes.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
from pathlib import Path

from spoolsmtp.model.config import Config
from spoolsmtp.model.errors import ConfigError

DROP_BOX_MODE = stat.S_ISVTX | stat.S_ISGID | 0o730
RESULTS_MODE = stat.S_ISGID | 0o710
UMASK = 0o027  # records 0640 to the group; the folders keep everything else private
KEY = "submit.group"
log = logging.getLogger("spoolsmtp")


def group(cfg: Config) -> int | None:
    """The submitters' gid, or None when ``submit.group`` is not set."""
    name = cfg.submit.group
    if not name:
        return None
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(cfg.source, KEY, f"no group {name!r}") from None


def umask(cfg: Config, default: int) -> int:
    """The worker's umask: ``default``, or 027 when records are to be read by the group."""
    return UMASK if cfg.submit.group else default


def open_up(cfg: Config) -> None:
    """Give ``incoming/`` and ``results/`` to the submitters' group with their modes; a
    ConfigError naming ``submit.group`` if the worker may not (it must be root or a member)."""
    gid = group(cfg)
    if gid is None:
        return
    for name, mode in (("incoming", DROP_BOX_MODE), ("results", RESULTS_MODE)):
        _set(cfg, cfg.spool.folder(name), gid, mode)
        _reachable(cfg.spool.folder(name), gid)


def _reachable(path: Path, gid: int) -> None:
    """Warn (the worker runs on) when a folder above ``path`` keeps the group out: not
    searchable by others, nor by a group that is ``gid``."""
    for parent in path.absolute().parents:
        try:
            info = os.stat(parent)
        except OSError:
            return
        if not (
            info.st_mode & stat.S_IXOTH or (info.st_gid == gid and info.st_mode & stat.S_IXGRP)
        ):
            mode = stat.S_IMODE(info.st_mode)
            log.warning(
                "%s: members of the group cannot reach %s: %s is mode %04o (chmod o+x %s)",
                KEY,
                path,
                parent,
                mode,
                parent,
            )
            return


def _set(cfg: Config, path: Path, gid: int, mode: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(cfg.source, KEY, f"{path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if info.st_gid != gid:
            os.fchown(fd, -1, gid)
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    except OSError as exc:
        raise ConfigError(
            cfg.source,
            KEY,
            f"cannot give {path} to group {cfg.submit.group} with mode {mode:04o}: "
            f"{exc.strerror} (the worker's user must be root or a member of the group)",
        ) from exc
    finally:
        os.close(fd)

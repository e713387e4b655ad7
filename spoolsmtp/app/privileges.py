"""Who the worker runs as: root hands the spool to the configured user and becomes it.

``become`` runs once in ``spoolsmtp run`` before any mail is touched: umask 077 for
everything the worker creates; then, when root started it and ``user`` is set, the spool
folders are prepared for that user (``startup.prepare``) and the process takes the user's
groups, gid and uid, for good (it cannot get root back). Started as anyone else, it runs as
itself. Last, the folders' owners and modes are checked (``startup.check``).
"""

from __future__ import annotations

import logging
import os
import pwd
from dataclasses import dataclass

from spoolsmtp.app import capability, dropbox, startup
from spoolsmtp.model.config import Config
from spoolsmtp.model.errors import ConfigError

log = logging.getLogger("spoolsmtp")
UMASK = 0o077


@dataclass(frozen=True)
class Account:
    """A user to run as: its name, uid, primary gid and every group it is in."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def account(cfg: Config) -> Account | None:
    """The configured ``user`` (a name or a uid) from the user database; None if not set."""
    if not cfg.user:
        return None
    try:
        entry = pwd.getpwuid(int(cfg.user)) if cfg.user.isdigit() else pwd.getpwnam(cfg.user)
    except KeyError:
        raise ConfigError(cfg.source, "user", f"no user {cfg.user!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)


def become(cfg: Config) -> None:
    """Set the umask, prepare the spool, drop root for the configured user, check folders."""
    os.umask(dropbox.umask(cfg, UMASK))  # 027 with submit.group: records 0640 to the group
    user = account(cfg)
    if user is not None and os.geteuid() == 0 and user.uid != 0:
        startup.prepare(cfg, (user.uid, user.gid))
        os.setgroups(list(user.groups))
        os.setgid(user.gid)
        lease = _keep_lease()
        os.setuid(user.uid)
        if os.geteuid() != user.uid or os.getuid() != user.uid:
            raise ConfigError(cfg.source, "user", f"could not become {user.name}")
        if lease:
            lease = _only_lease()
        log.info(
            "running as %s (uid %d, gid %d)%s",
            user.name,
            user.uid,
            user.gid,
            ", keeping CAP_LEASE" if lease else "",
        )
    else:
        if user is not None and user.uid != os.geteuid():
            log.warning(
                "user: %s is only taken when root starts the worker; running as uid %d",
                user.name,
                os.geteuid(),
            )
        startup.prepare(cfg)
    startup.check(cfg)


def _keep_lease() -> bool:
    try:
        capability.keep_across_setuid()
    except OSError as exc:
        log.warning("%s", exc)
        return False
    return True


def _only_lease() -> bool:
    """Keep CAP_LEASE alone; without it, files of other users that are still open for
    writing are taken by the settle rule alone, and the log says so once. Whatever happens,
    no other capability of root's survives the switch."""
    try:
        capability.only_lease()
    except OSError as exc:
        log.warning(
            "%s: a file of another user still open for writing can be taken once it has settled",
            exc,
        )
        capability.none()  # raises, and start-up stops, if even that cannot be done
        return False
    return True

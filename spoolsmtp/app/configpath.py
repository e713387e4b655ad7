"""Which config file an entry point reads when its command line names none.

``submit``, ``spoolsmtp-sendmail`` and ``ctl`` are called by other programs from any folder
(cron, PHP, a job run by root in a folder some user controls), so they never look in the current
folder: ``--config``, else ``$SPOOLSMTP_CONFIG`` (ignored when the caller is set-id: real and
effective uid or gid differ), else ``/etc/spoolsmtp/spoolsmtp.yaml``. Unless ``--config`` named
it, the config must place the spool (and the control socket) at absolute paths: a relative one,
like the built-in ``spool``, would again be the current folder.

``run``, ``check`` and ``deliver`` are the operator's own deliberate commands: ``--config``,
else ``$SPOOLSMTP_CONFIG`` (same set-id rule), else ``conf/spoolsmtp.yaml`` (SPEC's default for
``run``), else ``/etc/spoolsmtp/spoolsmtp.yaml``, else the built-in defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from spoolsmtp.model import config
from spoolsmtp.model.errors import ConfigError

SYSTEM_CONFIG = config.SYSTEM_CONFIG
OPERATOR_CONFIG = config.DEFAULT_CONFIG
ENV = "SPOOLSMTP_CONFIG"


def set_id() -> bool:
    """True when this process runs with another user's or group's rights than its caller's."""
    return os.getuid() != os.geteuid() or os.getgid() != os.getegid()


def _from_env() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value and not set_id() else None


def for_callers(explicit: Path | None) -> Path | None:
    """The config of submit, sendmail and ctl; None: no file (built-in defaults)."""
    if explicit is not None:
        return explicit
    found = _from_env()
    if found is not None:
        return found
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def for_operators(explicit: Path | None) -> Path | None:
    """The config of run, check and deliver; None: no file (built-in defaults)."""
    if explicit is not None:
        return explicit
    found = _from_env()
    if found is not None:
        return found
    for path in (OPERATOR_CONFIG, SYSTEM_CONFIG):
        if path.exists():
            return path
    return None


def load_for_operators(explicit: Path | None) -> config.Config:
    path = for_operators(explicit)
    return config.load(path) if path is not None else config.Config()


def load_for_callers(
    explicit: Path | None, *, spool: bool = True, control: bool = False
) -> config.Config:
    """Load the callers' config; unless ``--config`` named it, refuse relative places for the
    spool folders this command writes and reads (``spool``) or the control socket
    (``control``)."""
    path = for_callers(explicit)
    cfg = config.load(path) if path is not None else config.Config()
    if explicit is not None:
        return cfg
    places: list[tuple[str, Path]] = []
    if spool:
        for name in ("incoming", "results"):
            override: Path | None = getattr(cfg.spool, name)
            places.append(
                (f"spool.{name}", override) if override else ("spool.path", cfg.spool.path)
            )
    if control:
        sock = cfg.control.socket
        places.append(("control.socket", sock) if sock else ("spool.path", cfg.spool.path))
    for key, place in places:
        if place.is_absolute():
            continue
        if path is None:
            raise ConfigError(
                "no config",
                "",
                f"give --config FILE, set ${ENV} or install {SYSTEM_CONFIG}; the built-in "
                f"{key} '{place}' would be relative to the current folder",
            )
        raise ConfigError(
            str(path),
            key,
            f"must be an absolute path here, not '{place}' (relative to the current folder)",
        )
    return cfg

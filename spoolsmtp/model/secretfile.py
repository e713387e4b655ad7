"""Secrets the worker reads from files: the logins for SMTP AUTH (``delivery.auth_file``) and
DKIM private keys (``dkim.<domain>.key_file``).

A secret file must be readable by nobody but its owner: one that group or others may read or
write stops start-up (and RELOAD), naming the file and the key that names it, as OpenSSH does
with a private key. Read once per start or RELOAD, kept in memory.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from spoolsmtp.model.config import Config, Route
from spoolsmtp.model.errors import ConfigError

OPEN_TO_OTHERS = 0o066
MAX_SECRET_BYTES = 1 << 20


@dataclass(frozen=True)
class Login:
    """One SMTP AUTH login: the entry's name (for the pool and the trace), user and password."""

    name: str
    username: str
    password: str = ""

    def __repr__(self) -> str:  # never the password in a log or a traceback
        return f"Login({self.name!r}, username={self.username!r})"


def read_private(path: Path, source: str, key: str) -> bytes:
    """The bytes of a secret file, after checking that only its owner may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(source, key, f"{path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(source, key, f"{path}: not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & OPEN_TO_OTHERS:
            raise ConfigError(
                source,
                key,
                f"{path}: refusing a secret file that group or others may read or write "
                f"(mode {mode:04o}); make it 0600",
            )
        data = fh.read(MAX_SECRET_BYTES + 1)
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(source, key, f"{path}: larger than {MAX_SECRET_BYTES} bytes")
    return data


def _routes(cfg: Config) -> list[tuple[str, Route]]:
    named = [(f"routes.{domain}", r) for domain, r in cfg.routes.items()]
    if cfg.smarthost is not None:
        named.append(("smarthost", cfg.smarthost))
    return named


def load_logins(cfg: Config) -> dict[str, Login]:
    """The logins the routes name, by entry name; ConfigError naming the file and key when
    the file is unsafe or unreadable, or a route names an entry it does not have."""
    wanted = [(key, r.auth) for key, r in _routes(cfg) if r.auth is not None]
    if not wanted:
        return {}
    path = cfg.delivery.auth_file
    if path is None:
        key, _ = wanted[0]
        raise ConfigError(cfg.source, f"{key}.auth", "needs delivery.auth_file (the logins)")
    data = read_private(path, cfg.source, "delivery.auth_file")
    try:
        entries = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), "", f"not a YAML file of logins ({exc})") from None
    if not isinstance(entries, dict):
        raise ConfigError(str(path), "", "expected a mapping of names to {username, password}")
    logins: dict[str, Login] = {}
    for key, name in wanted:
        entry = entries.get(name)
        if entry is None:
            raise ConfigError(cfg.source, f"{key}.auth", f"no login {name!r} in {path}")
        logins[name] = _login(str(path), name, entry)
    return logins


def _login(source: str, name: str, entry: object) -> Login:
    if not isinstance(entry, dict):
        raise ConfigError(source, name, "expected a mapping with username and password")
    fields = {"username", "password"}
    unknown = sorted(str(k) for k in entry if k not in fields)
    if unknown:
        raise ConfigError(source, f"{name}.{unknown[0]}", "unknown key; known: password, username")
    values: dict[str, str] = {}
    for field in sorted(fields):
        value = entry.get(field)
        if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
            raise ConfigError(source, f"{name}.{field}", "expected a non-empty string")
        values[field] = str(value)
    return Login(name, values["username"], values["password"])

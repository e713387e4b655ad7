"""What the deliverer needs from secret files, read once per start or RELOAD: the SMTP AUTH
logins the routes name (``delivery.auth_file``) and the DKIM signer (``dkim``).

A secret file must be readable by nobody but its owner (the worker's user): one that group or
others may read or write stops start-up, naming the file and the key that names it, as OpenSSH
does with a private key. ``load`` raises ConfigError naming the file and key when a file is
unsafe, unreadable or wrong, or when ``dkim`` keys are configured and dkimpy is not installed,
so that ``--check-config``, start-up and RELOAD all stop on it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from spoolsmtp.model.config import Config, Route
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.login import Login
from spoolsmtp.smtp import dkimsign

OPEN_TO_OTHERS = 0o066
MAX_SECRET_BYTES = 1 << 20


@dataclass(frozen=True)
class Secrets:
    logins: dict[str, Login] = field(default_factory=dict)
    signer: dkimsign.Signer | None = None


def load(cfg: Config) -> Secrets:
    return Secrets(load_logins(cfg), _signer(cfg))


def _signer(cfg: Config) -> dkimsign.Signer | None:
    if not cfg.dkim:
        return None
    keys: dict[str, dkimsign.Key] = {}
    for domain, entry in cfg.dkim.items():
        where = f"dkim.{domain}"
        try:
            dkimsign.require()
        except dkimsign.MissingDkimpy as exc:
            raise ConfigError(cfg.source, where, str(exc)) from None
        private = read_private(entry.key_file, cfg.source, f"{where}.key_file")
        try:
            key = dkimsign.load_key(domain, entry.selector, private)
        except dkimsign.BadKey as exc:
            raise ConfigError(cfg.source, f"{where}.key_file", f"{entry.key_file}: {exc}") from None
        keys[key.domain] = key
    return dkimsign.Signer(keys)


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
    known = {"username", "password"}
    unknown = sorted(str(k) for k in entry if k not in known)
    if unknown:
        raise ConfigError(source, f"{name}.{unknown[0]}", "unknown key; known: password, username")
    values: dict[str, str] = {}
    for key in sorted(known):
        value = entry.get(key)
        if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
            raise ConfigError(source, f"{name}.{key}", "expected a non-empty string")
        values[key] = str(value)
    return Login(name, values["username"], values["password"])

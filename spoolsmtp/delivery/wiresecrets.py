"""What the deliverer needs from secret files, read once per start or RELOAD: the SMTP AUTH
logins the routes name (``delivery.auth_file``) and the DKIM signer (``dkim``).

``load`` raises ConfigError naming the file and key when a file is unsafe (group or others may
read it), unreadable or wrong, or when ``dkim`` keys are configured and dkimpy is not
installed, so that ``--check-config``, start-up and RELOAD all stop on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spoolsmtp.model.config import Config
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.secretfile import Login, load_logins, read_private
from spoolsmtp.smtp import dkimsign


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

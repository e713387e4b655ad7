"""What the deliverer needs from secret files, read once per start or RELOAD: the SMTP AUTH
logins the routes name (``delivery.auth_file``) and the DKIM signers (``dkim``).

``load`` raises ConfigError naming the file and key when a file is unsafe (group or others may
read it), unreadable or wrong, so that ``--check-config``, start-up and RELOAD all stop on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spoolsmtp.model.config import Config
from spoolsmtp.model.secretfile import Login, load_logins


@dataclass(frozen=True)
class Secrets:
    logins: dict[str, Login] = field(default_factory=dict)


def load(cfg: Config) -> Secrets:
    return Secrets(load_logins(cfg))

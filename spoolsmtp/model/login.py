"""An SMTP AUTH login (a named entry of ``delivery.auth_file``), as the session uses it; read
from its file by ``delivery.wiresecrets``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Login:
    """One SMTP AUTH login: the entry's name (for the pool and the trace), user and password."""

    name: str
    username: str
    password: str = ""

    def __repr__(self) -> str:  # never the password in a log or a traceback
        return f"Login({self.name!r}, username={self.username!r})"

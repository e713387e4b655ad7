"""How a session tells its caller it cannot go on: ``SessionBroken`` (the connection is lost,
timed out or closed by the server), ``StaleSession`` (a reused connection had gone before it
answered anything: open a new one and send again)."""

from __future__ import annotations

from spoolsmtp.model.reply import Reply


class SessionBroken(Exception):
    """The session cannot go on; ``reply`` says why (a 421, a synthetic 451 for loss/timeout)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class StaleSession(Exception):
    """A reused connection was found closed before it answered anything: open a new one."""

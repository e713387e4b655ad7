"""What a session asks of its caller around a final dot (RFC 5321 section 6.1: from the dot on,
a loss may leave a duplicate): a mark, begun before the transaction (on deck, ``MarkAhead``) or
as it starts, that the dot waits for and that is taken back when no dot is sent. The journal's
``JournalMark`` is the one in use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from spoolsmtp.model.envelope import Recipient


class DotMark(Protocol):
    """The caller's record that a final dot may be sent (the journal's ``dot``), begun before
    the transaction or as it starts, so that it is durable by the time the dot is due: its
    commit runs while the delivery waits and MAIL, RCPT and DATA are in flight."""

    async def ready(self, accepted: list[Recipient]) -> None:
        """Return once the mark is durable, or raise why it is not (then it is taken back).
        Recipients it names that were not ``accepted`` are taken back: no dot goes to them."""

    def withdraw(self) -> None:
        """The transaction ended without its dot (or the connection failed between
        ``ready`` and the dot): what is still marked is taken back. Idempotent."""


DotHook = Callable[[list[Recipient]], DotMark]


class MarkAhead:
    """A ``DotHook`` whose first mark is begun before the connection is had: while the
    delivery waits on deck for one of its destination's places, so that the mark's commit
    runs while the transaction before it on that connection is still under way. The first
    transaction sent takes it; a later one (a 452 split, another host) begins its own. A
    mark nobody took is withdrawn by ``unused``."""

    def __init__(self, hook: DotHook, recipients: list[Recipient]) -> None:
        self._hook = hook
        self._marked = set(recipients)
        self._mark: DotMark | None = hook(recipients)

    def __call__(self, recipients: list[Recipient]) -> DotMark:
        mark, self._mark = self._mark, None
        if mark is not None:
            if self._marked.issuperset(recipients):
                return mark  # its ``ready`` takes back the marked ones not accepted
            mark.withdraw()
        return self._hook(recipients)

    def unused(self) -> None:
        """The delivery is over: a mark begun ahead and never taken is taken back."""
        mark, self._mark = self._mark, None
        if mark is not None:
            mark.withdraw()

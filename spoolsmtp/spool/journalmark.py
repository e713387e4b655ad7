"""The journal's ``dot`` record of one transaction (``smtp.dotmark.DotMark``): begun on deck
(``MarkAhead``) or as the transaction starts, awaited before its final dot, taken back by
``undot`` lines (spool/journal.py has the records; README, Retries, reports and crash safety)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

from spoolsmtp.model.envelope import Recipient
from spoolsmtp.spool.journal import Journal


class JournalMark:
    """The ``dot`` record of one transaction (``smtp.dotmark.DotMark``), begun on deck or as
    the transaction starts: appended and its commit queued at once, so the fdatasync runs
    while the delivery waits for its connection and MAIL, RCPT and DATA are in flight; the
    final dot waits in ``ready``. What is taken back (recipients refused at RCPT, then
    everything still marked if no dot is sent) goes in ``undot`` lines naming this mark's own
    ``m`` (``withdraw`` asks for their commit soon): a line the journal happens to hold twice
    takes back nothing more, and no other mark of the recipient."""

    def __init__(
        self, journal: Journal, envelope_id: str, tx: int, recipients: Iterable[Recipient]
    ) -> None:
        self._journal = journal
        self._id = envelope_id
        self._tx = tx
        self._mark = os.urandom(6).hex()  # 48 random bits; an envelope has a handful of marks
        self._marked = list(dict.fromkeys(r.address for r in recipients))
        journal.append(
            {"t": "dot", "id": envelope_id, "tx": tx, "rcpts": self._marked, "m": self._mark}
        )
        self._commit = journal.commit_soon()

    async def ready(self, accepted: list[Recipient]) -> None:
        """Return once the mark is on disk. Its commit may have failed (a full disk) while
        MAIL, RCPT and DATA were answered; the line is then still pending, and one more
        commit, now, decides (as when the mark was written at the dot)."""
        try:
            try:
                await self._commit
            except Exception:
                await self._journal.commit()
        except BaseException:
            self.withdraw()
            raise
        taken = {r.address for r in accepted}
        back = [a for a in self._marked if a not in taken]
        self._marked = [a for a in self._marked if a in taken]
        self._undot(back)

    def withdraw(self) -> None:
        back, self._marked = self._marked, []
        self._undot(back)
        if back:
            # committed soon, not only with the attempt's results: those wait for every
            # destination of the transaction, and a crash meanwhile would flag these
            _taken_later(self._journal.commit_soon())
        # nobody awaits the mark's own commit now
        _taken_later(self._commit)

    def _undot(self, addresses: list[str]) -> None:
        if addresses:
            self._journal.append(
                {"t": "undot", "id": self._id, "tx": self._tx, "rcpts": addresses, "m": self._mark}
            )


def _taken_later(future: asyncio.Future[None]) -> None:
    """Nobody awaits ``future``: its error (a full disk) is taken, not left for asyncio to
    report as never retrieved (the lines stay pending for the next commit)."""
    if future.done():
        _taken(future)
    else:
        future.add_done_callback(_taken)


def _taken(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()

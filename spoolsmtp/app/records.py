"""Writing result records: journaled and concluded with a move, or announced quickly; the
journal's commits and checkpoints that make them durable.

A record is committed to the journal, then ``results/ID.json`` is replaced with it and the
envelope moved out of active/ in one I/O batch (``Spool.conclude``); the file is synced later,
by a checkpoint, and until then the journal restores it after a crash. An envelope still being
delivered after ``ANNOUNCE_AFTER`` gets a record saying so, written at once and not journaled.
"""

from __future__ import annotations

import asyncio
from typing import Any

from spoolsmtp.model.record import Record, State
from spoolsmtp.spool.diskfull import DiskWatch
from spoolsmtp.spool.folders import Spool
from spoolsmtp.spool.journal import Journal

ANNOUNCE_AFTER = 0.5
CHECKPOINT_INTERVAL = 1.0


class Records:
    """The worker's record writer; ``journal`` is set once the worker has opened it."""

    def __init__(self, spool: Spool, disk: DiskWatch, putbacks: dict[str, int]) -> None:
        self.spool = spool
        self.disk = disk
        self.journal: Journal | None = None
        self._putbacks = putbacks
        self._announcing: dict[str, tuple[float, Record]] = {}
        self._announce_timer: asyncio.TimerHandle | None = None

    async def write(
        self, record: Record, move_to: str | None = None, *, durable: bool = False
    ) -> None:
        """Commit the record to the journal, then replace the file with it and move the
        envelope out of active/ to ``move_to``, in one batch. The file is synced later, by a
        checkpoint: until then the journal restores it after a crash."""
        assert self.journal is not None
        self.announced(record.id)
        data = record.to_json()
        self.journal.append_record(record.id, data)
        await self.spool.conclude(record.id, data, move_to, durable=durable)

    def announce(self, record: Record) -> None:
        """The record that says an envelope is being delivered, written once it has been
        active for ``ANNOUNCE_AFTER`` (most are finished sooner, and their first record is the
        final one: writing one that is replaced a few milliseconds later costs a file created
        and a file freed per envelope, which is what slows a busy spool down the most).

        Pending announcements wait in taking order (so the oldest is first) under one timer
        set for the oldest, not a timer each."""
        loop = asyncio.get_running_loop()
        self._announcing[record.id] = (loop.time() + ANNOUNCE_AFTER, record)
        if self._announce_timer is None:
            self._announce_timer = loop.call_later(ANNOUNCE_AFTER, self._announce_due)

    def _announce_due(self) -> None:
        """Write the records of envelopes active for ``ANNOUNCE_AFTER`` by now; wait for the
        next."""
        self._announce_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._announcing:
            envelope_id, (due, record) = next(iter(self._announcing.items()))
            if due > now:
                self._announce_timer = loop.call_at(due, self._announce_due)
                return
            del self._announcing[envelope_id]
            self.write_quick(record)

    def announced(self, envelope_id: str) -> None:
        """A newer record is about to be written: the pending announcement is void."""
        self._announcing.pop(envelope_id, None)

    def write_quick(self, record: Record) -> None:
        """Atomic, not journaled (the envelope rebuilds it); at once, in the loop's thread: a
        write queued to the I/O lanes could land after the final record."""
        if record.state is State.ACTIVE:
            try:
                self.spool.write_quick("results", f"{record.id}.json", record.to_json())
            except OSError as exc:  # a timer callback: it must not die of a full disk
                self.disk.failed(exc, f"results/{record.id}.json")

    async def journal_commit(self, rec: dict[str, Any]) -> None:
        """Append one journal record and commit it."""
        assert self.journal is not None
        self.journal.append(rec)
        await self.journal.commit()

    def finished(self, envelope_id: str) -> None:
        self._putbacks.pop(envelope_id, None)
        if self.journal is not None:
            self.journal.finished(envelope_id)

    async def checkpoints(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            try:
                await self.checkpoint()
            except OSError as exc:
                self.disk.failed(exc, "checkpoint")

    async def checkpoint(self) -> None:
        """Sync what finished envelopes wrote, then drop their journal segments."""
        assert self.journal is not None
        await asyncio.to_thread(self.journal.checkpoint, self.spool.unsynced())

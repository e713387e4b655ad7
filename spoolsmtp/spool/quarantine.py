"""Whom a crash is blamed on: the envelope being read, alone, when the worker died.

Before an envelope file in ``active/`` is read, a ``reading`` phase record is committed to the
journal (for a new envelope, in the batch that commits its claim); once it was read, ``read`` is
appended and rides with the next commit of the journal (a flush is asked for at once, shared by
every read that ends meanwhile; delivery does not wait for it: until it is on disk a crash finds
``reading``, as it did while the commit was awaited); a read alone commits ``read`` before the
next read may begin. A clean stop commits ``stopped`` for every envelope it leaves in
``active/``. So at start, an envelope whose last phase is ``reading`` was being read when the
worker died, and nothing else is held against an envelope: not a stop we asked for (SIGTERM,
SHUTDOWN, ``shutdown_timeout`` expired), not a kill while a server was thinking.

If exactly one envelope was being read, or one was being read alone, the crash is counted
against it. If several were, none is blamed yet: each is read alone (no other read at the same
time) at the next start, and so is every envelope with a crash counted, so that a second crash
names its envelope. A successful read clears the count. At ``QUARANTINE_AFTER`` crashes in a row
the envelope is read once more, alone, to learn its senders, and quarantined: recipients not yet
final fail with ``QUARANTINE_CODE`` and the senders get non-delivery reports. If even that read
kills the worker, it is quarantined unread, and no report can be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from spoolsmtp.model.record import RcptRecord, RcptStatus, Record
from spoolsmtp.model.reply import Reply, make
from spoolsmtp.spool.journal import Journal, Replayed

log = logging.getLogger("spoolsmtp")
QUARANTINE_AFTER = 3


@dataclass
class Verdict:
    """What the last crashes say of one envelope found in ``active/`` at start."""

    crashes: int = 0
    alone: bool = False


def assess(replayed: dict[str, Replayed], active: list[str]) -> dict[str, Verdict]:
    """The verdict on every envelope in ``active/`` with something held against it."""
    reading = [i for i in active if i in replayed and replayed[i].phase == "reading"]
    out: dict[str, Verdict] = {}
    for envelope_id in active:
        entry = replayed.get(envelope_id)
        if entry is None:
            continue
        crashes = entry.crashes
        if entry.phase == "reading" and (len(reading) == 1 or entry.alone):
            crashes += 1
        if crashes or entry.phase == "reading":
            out[envelope_id] = Verdict(crashes, alone=True)
    return out


def reply(crashes: int) -> Reply:
    """The reply recipients fail with when their envelope is quarantined."""
    return make(
        554,
        "5.3.0",
        f"quarantined: the worker died {crashes} times in a row while reading this envelope",
    )


def reason(source: str, crashes: int, *, read: bool) -> str:
    """The reason written beside a quarantined envelope in ``rejected/``."""
    tail = "" if read else "; it could not be read again, so no report was sent"
    return f"{source}: quarantined: the worker died {crashes} times in a row while reading it{tail}"


def fail_unfinished(record: Record, crashes: int) -> list[tuple[int, RcptRecord]]:
    """Fail every recipient not yet final (those delivered stay delivered); which, with the
    number of their transaction."""
    failure = reply(crashes)
    failed = []
    for tx, rec in record.recipients():
        if not rec.final:
            rec.status, rec.reply, rec.next_attempt_at = RcptStatus.FAILED, failure, None
            failed.append((tx.number, rec))
    return failed


def _phase(envelope_id: str, phase: str, **extra: Any) -> dict[str, Any]:
    return {"t": "phase", "id": envelope_id, "phase": phase, **extra}


class _Gate:
    """Reads share the gate; a read ``alone`` has it to itself."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._alone = False

    async def enter(self, alone: bool) -> None:
        async with self._cond:
            if alone:
                await self._cond.wait_for(lambda: not self._alone and self._shared == 0)
                self._alone = True
            else:
                await self._cond.wait_for(lambda: not self._alone)
                self._shared += 1

    async def leave(self, alone: bool) -> None:
        async with self._cond:
            if alone:
                self._alone = False
            else:
                self._shared -= 1
            self._cond.notify_all()


class Reads:
    """Wraps every read of an envelope in ``active/`` in its durable phase records."""

    def __init__(self, journal: Journal, verdicts: dict[str, Verdict]) -> None:
        self.journal = journal
        self.verdicts = verdicts
        self._marked: set[str] = set()
        self._gate = _Gate()
        self._flushing: asyncio.Task[None] | None = None
        self._again = False

    def crashes(self, envelope_id: str) -> int:
        verdict = self.verdicts.get(envelope_id)
        return verdict.crashes if verdict is not None else 0

    def mark(self, envelope_id: str) -> None:
        """Append ``reading`` for a new envelope: the batch that commits its claim (before the
        rename) commits this too."""
        self.journal.append(_phase(envelope_id, "reading", crashes=0))
        self._marked.add(envelope_id)

    def forget(self, envelope_id: str) -> None:
        """Its claim was not made (the file went, or another node renamed it first): the
        ``reading`` that ``mark`` appended is closed with ``lost``, so this node's journal
        never blames a crash on an envelope it did not have (say it claims it later, from
        deferred/, and dies before reading it)."""
        if envelope_id in self._marked:
            self._marked.discard(envelope_id)
            self.journal.append(_phase(envelope_id, "lost"))

    def reading(self, envelope_id: str) -> _Reading:
        return _Reading(self, envelope_id)

    def flush_soon(self) -> None:
        """Commit what was appended (``read`` marks) soon: one commit at a time, and one more
        if a mark came after that commit began, however many reads ended."""
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())
        else:
            self._again = True

    async def _flush(self) -> None:
        try:
            again = True
            while again:
                self._again = False
                # a failed commit (a full disk) leaves the marks pending: the next commit
                # that works writes them, as it writes everything appended before it
                await self.journal.commit()
                again = self._again
        except OSError:
            pass
        finally:
            self._flushing = None

    async def stopped(self, active: list[str]) -> None:
        """A clean stop: nothing left in ``active/`` is to blame for it."""
        if self._flushing is not None:
            with contextlib.suppress(OSError):
                await self._flushing
        for envelope_id in active:
            self.journal.append(_phase(envelope_id, "stopped", crashes=self.crashes(envelope_id)))
        if active:
            try:
                await self.journal.commit()
            except OSError as exc:
                log.error(
                    "journal %s: cannot record the clean stop (%s); an envelope cut while it"
                    " was being read may be blamed for it at the next start",
                    self.journal.folder,
                    exc,
                )


class _Reading:
    """``async with reads.reading(id):`` around one read of the envelope file."""

    def __init__(self, reads: Reads, envelope_id: str) -> None:
        self.reads = reads
        self.id = envelope_id
        verdict = reads.verdicts.get(envelope_id)
        self.alone = verdict is not None and verdict.alone
        self.crashes = verdict.crashes if verdict is not None else 0

    async def __aenter__(self) -> None:
        await self.reads._gate.enter(self.alone)
        try:
            marked = self.id in self.reads._marked
            self.reads._marked.discard(self.id)
            if self.alone or not marked:
                extra = {"alone": True} if self.alone else {}
                self.reads.journal.append(_phase(self.id, "reading", crashes=self.crashes, **extra))
                await self.reads.journal.commit()
        except BaseException:
            await self.reads._gate.leave(self.alone)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            # read, or found not to be an envelope: either way reading did not kill us. A
            # cancellation (shutdown) leaves the phase open: the stop journals ``stopped``.
            if exc_type is None or issubclass(exc_type, Exception):
                self.reads.verdicts.pop(self.id, None)
                self.reads.journal.append(_phase(self.id, "read"))
                if self.alone:
                    # on disk before the gate opens: a crash in the next read is not this one's
                    await self.reads.journal.commit()
                else:
                    self.reads.flush_soon()
        finally:
            await self.reads._gate.leave(self.alone)

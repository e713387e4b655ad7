"""The retry scheduler: one heap of due times, the retries it starts, and envelopes put back.

``schedule`` sets (or replaces) an envelope's due time; the loop takes due envelopes from
deferred/ back into active/ and picks them up again (``Recovery.open``). Work that failed for
a reason not the envelope's (a full disk, EIO, a bug) is put back with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from spoolsmtp.app.duetimes import DueTimes
from spoolsmtp.model.record import State
from spoolsmtp.spool import journal
from spoolsmtp.spool.folders import SUFFIX
from spoolsmtp.spool.journal import Replayed

if TYPE_CHECKING:
    from spoolsmtp.app.host import WorkerHost
    from spoolsmtp.app.pickup import Pickup
    from spoolsmtp.app.records import Records
    from spoolsmtp.app.recovery import Recovery

PUT_BACK_MAX = 300.0


class Scheduler:
    """Due retries and put-back envelopes. ``putbacks``: envelope id -> tries so far (the
    record writer forgets an envelope's when it is finished)."""

    def __init__(
        self,
        worker: WorkerHost,
        records: Records,
        recovery: Recovery,
        pickup: Pickup,
        putbacks: dict[str, int],
    ) -> None:
        self._w = worker
        self._records = records
        self._recovery = recovery
        self._pickup = pickup
        self.putbacks = putbacks
        self._due = DueTimes()
        # due and out of the schedule, not yet taken out of deferred/ (waiting for a slot)
        self._taking: set[str] = set()
        self._wake = asyncio.Event()

    def schedule(self, envelope_id: str, when: float) -> None:
        summary = self._w.index.get(envelope_id)
        if summary is not None:
            summary.next_attempt = when
        self._due.set(envelope_id, when)
        self._wake.set()

    def knows(self, envelope_id: str) -> bool:
        """Is a retry (or put-back) of it scheduled here, or due and about to be taken?"""
        return envelope_id in self._due or envelope_id in self._taking

    def unschedule(self, envelope_id: str) -> None:
        self._due.discard(envelope_id)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        w = self._w
        while True:
            self._wake.clear()
            now = time.time()
            halted = w.suspended or w.disk.full
            while not halted and (envelope_id := self._due.pop_due(now)) is not None:
                self._taking.add(envelope_id)
                await w._slots.acquire()
                w._spawn(self._retry(envelope_id))
            # suspended, due retries wait for RESUME (which wakes us), not for a timer: with a
            # past due time that would be a busy loop
            upcoming = self._due.next_time()
            delay = upcoming - now if upcoming is not None and not halted else 3600.0
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
            # arrives as the event is set, and the scheduler then outlived SIGTERM
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(delay, 3600.0))):
                    await self._wake.wait()

    async def _retry(self, envelope_id: str) -> None:
        w = self._w
        put_back = envelope_id in self.putbacks
        try:
            if not (put_back and w.spool.envelope("active", envelope_id).exists()):
                put_back = False
                await w.spool.move(envelope_id, "deferred", "active")
        except FileNotFoundError:
            summary = w.index.get(envelope_id)
            held = summary is not None and summary.state is State.HELD  # while it waited
            if not held and not w.spool.envelope("active", envelope_id).exists():
                w.index.pop(envelope_id, None)  # gone: on a shared spool, another node took it
            return
        except OSError as exc:
            self.put_back(envelope_id, exc)
            return
        finally:
            self._taking.discard(envelope_id)
        summary = w.index.get(envelope_id)
        if summary is not None:
            summary.state = State.ACTIVE
        try:
            known = await self._known_of(envelope_id) if put_back else None
            journaled = self._recovery.journaled(known)
            source = known.source if known and known.source else f"{envelope_id}{SUFFIX}"
            owner = known.owner if known else None
            opened = await self._recovery.open(envelope_id, source, journaled, owner)
            if opened is None:
                return
            env, record, data = opened
            if known is not None:
                self._recovery.apply_journal(record, known)
                await self._records.write(record)
                await self._pickup.batch_outputs(envelope_id, env, record, known)
            self._records.announce(record)
            await w._attempt(envelope_id, env, record, data)
        except Exception as exc:
            self.put_back(envelope_id, exc)
        finally:
            w._active.pop(envelope_id, None)

    def put_back(self, envelope_id: str, exc: BaseException) -> None:
        """The work on an envelope failed (a full disk, EIO, a bug): it is logged once per
        episode and tried again with backoff, and only once there is room, from what the
        journal knows of it (so a recipient a server accepted is not sent again)."""
        self._w.disk.failed(exc, f"envelope {envelope_id}")
        tries = self.putbacks.get(envelope_id, 0) + 1
        self.putbacks[envelope_id] = tries
        self.schedule(envelope_id, time.time() + min(2.0**tries, PUT_BACK_MAX))

    async def _known_of(self, envelope_id: str) -> Replayed:
        """What the journal knows of an envelope put back; its pending records are written
        first (the commit fails while they cannot be)."""
        w = self._w
        assert w.journal is not None
        await w.journal.commit()
        known = w.journal.known(envelope_id)
        if known is None:
            everything = await asyncio.to_thread(journal.replay, w.spool.dirs["journal"])
            known = everything.get(envelope_id, Replayed())
        return known

    def resume_work(self) -> None:
        """There is room again: due retries (and put-back envelopes) start at once."""
        self._wake.set()

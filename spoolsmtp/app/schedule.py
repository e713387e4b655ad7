"""The supervisor's retry schedule and its view of the queue (``worker.processes`` > 1).

What the supervisor knows of deferred/ and hold/: each envelope's ``Summary`` (the operator's
view: QUERY, HOLD, DELETE), the due time of each deferred one on a heap, and which delivery
process a due retry was handed to until that process reports on it. It is filled from the
folders at start, from what the processes report, and from the folders again when something
may be there that no process reported (an adopted node's queue, a process that died before it
told). Not thread-safe: the supervisor's loop owns it; the folder reads run in threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from spoolsmtp.app.children import Child
from spoolsmtp.app.duetimes import DueTimes
from spoolsmtp.app.host import Summary
from spoolsmtp.model.record import Record, State
from spoolsmtp.spool.folders import Spool

QUEUED = (("deferred", State.DEFERRED), ("hold", State.HELD))
# an envelope of deferred/ or hold/: its id, where it is, its result record (if readable)
Found = tuple[str, State, Record | None]
Summarise = Callable[[Record, State, float | None], Summary]


class Schedule:
    """Deferred and held envelopes, due times, and retries handed out."""

    def __init__(self, spool: Spool, summarise: Summarise) -> None:
        self.spool = spool
        self.summarise = summarise
        self.index: dict[str, Summary] = {}  # deferred and held, and retries handed out
        self.handed: dict[str, Child] = {}  # retries handed out, until the child reports
        self._due = DueTimes()

    def __len__(self) -> int:
        """How many retries are scheduled."""
        return len(self._due)

    # -- the folders (in a thread) ---------------------------------------------------------

    def listed(self) -> list[tuple[str, State]]:
        """The envelopes in deferred/ and hold/."""
        return [(i, state) for folder, state in QUEUED for i in self.spool.ids(folder)]

    def read(self, listed: Iterable[tuple[str, State]]) -> list[Found]:
        """With their result records."""
        return [(i, state, self.spool.load_record(i)) for i, state in listed]

    # -- in the loop -----------------------------------------------------------------------

    def enter(self, found: Iterable[Found]) -> int:
        """Into the index, and the deferred ones onto the schedule, due when their records
        say; how many were scheduled."""
        scheduled: list[tuple[str, float]] = []
        for envelope_id, state, rec in found:
            due = time.time()
            if rec is not None:
                due = rec.next_due(due)
                self.index[envelope_id] = self.summarise(rec, state, due)
            if state is State.DEFERRED:
                scheduled.append((envelope_id, due))
        if scheduled:
            self._due.set_all(scheduled)
        return len(scheduled)

    def known(self, waiting: Iterable[str]) -> Callable[[str], bool]:
        """Whether an envelope is known: scheduled, due and ``waiting`` for a process,
        handed to one, or in the index (held; or being held or removed by an operator's
        command that has taken it off the schedule for a moment)."""
        due = set(waiting)

        def known(envelope_id: str) -> bool:
            return (
                envelope_id in self._due
                or envelope_id in self.handed
                or envelope_id in self.index
                or envelope_id in due
            )

        return known

    def schedule(self, envelope_id: str, when: float) -> None:
        self._due.set(envelope_id, when)
        summary = self.index.get(envelope_id)
        if summary is not None:
            summary.state, summary.next_attempt = State.DEFERRED, when

    def unschedule(self, envelope_id: str) -> None:
        self._due.discard(envelope_id)

    def due(self, now: float) -> list[str]:
        """Take off the schedule every retry due by ``now``."""
        out: list[str] = []
        while (envelope_id := self._due.pop_due(now)) is not None:
            out.append(envelope_id)
        return out

    def next_due(self) -> float | None:
        return self._due.next_time()

    def hand(self, envelope_id: str, child: Child) -> None:
        """A due retry is handed to ``child``: active in the operator's view until it
        reports."""
        self.handed[envelope_id] = child
        summary = self.index.get(envelope_id)
        if summary is not None:
            summary.state, summary.next_attempt = State.ACTIVE, None

    def gone(self, envelope_id: str) -> None:
        """A retry is over and the child said nothing of it: it left the queue (done, or
        rejected), unless it is back in deferred/ (a report lost with a dead child)."""
        summary = self.index.get(envelope_id)
        if summary is not None and summary.state is State.ACTIVE:
            del self.index[envelope_id]

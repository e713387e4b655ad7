"""Due times of envelopes, earliest first: the retry schedule of a worker (scheduler.py) and of
a supervisor (schedule.py). A heap with lazy deletion: scheduling again or unscheduling leaves
the old entry on the heap, skipped when it surfaces."""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class DueTimes:
    """Envelope ids by the time they fall due; each id once, at its latest time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, envelope_id: object) -> bool:
        return envelope_id in self._due

    def set(self, envelope_id: str, when: float) -> None:
        self._due[envelope_id] = when
        heapq.heappush(self._heap, (when, envelope_id))

    def set_all(self, items: Iterable[tuple[str, float]]) -> None:
        """Many at once (a queue read from the folders): one heapify, not a push each."""
        for envelope_id, when in items:
            self._due[envelope_id] = when
            self._heap.append((when, envelope_id))
        heapq.heapify(self._heap)

    def discard(self, envelope_id: str) -> None:
        self._due.pop(envelope_id, None)

    def pop_due(self, now: float) -> str | None:
        """Take off the schedule the next id due by ``now``; None if none is."""
        while self._heap and self._heap[0][0] <= now:
            when, envelope_id = heapq.heappop(self._heap)
            if self._due.get(envelope_id) == when:  # else rescheduled or unscheduled since
                del self._due[envelope_id]
                return envelope_id
        return None

    def next_time(self) -> float | None:
        """When the earliest entry falls due (it may be a stale one: waking for it is harmless)."""
        return self._heap[0][0] if self._heap else None

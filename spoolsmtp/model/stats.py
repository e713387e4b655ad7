"""Counters and gauges since start, kept by the worker and read (never waited on) by operators."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

LATENCY_SAMPLES = 10_000


@dataclass
class Stats:
    """What the worker has done since it started."""

    started: float = field(default_factory=time.time)
    files_taken: int = 0
    files_rejected: int = 0
    files_refused: int = 0  # names in incoming/ never taken (bad name, not a regular file)
    delivered: int = 0
    failed: int = 0
    deferred: int = 0
    reports: int = 0
    deadletters: int = 0
    possible_duplicates: int = 0
    quarantined: int = 0
    disk_full_pauses: int = 0
    _latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    _finished: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def envelope_finished(self, latency: float | None, now: float | None = None) -> None:
        """An envelope left active/; ``latency`` is seconds from taken to its last delivery."""
        self._finished.append(time.time() if now is None else now)
        if latency is not None:
            self._latencies.append(latency)

    def rate(self, window: float = 60.0, now: float | None = None) -> float:
        """Envelopes finished per second over the last ``window`` seconds."""
        now = time.time() if now is None else now
        recent = sum(1 for t in self._finished if now - t <= window)
        span = min(window, max(now - self.started, 1e-9))
        return recent / span

    def latency(self, quantile: float) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        index = min(len(ordered) - 1, int(quantile * len(ordered)))
        return ordered[index]

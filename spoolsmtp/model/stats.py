"""Counters and gauges since start, kept by the worker and read (never waited on) by operators.

Every counter is summable: ``added(a, b)`` is what two workers did together (counters and the
histogram's buckets add, counters by key add per key), which is how a supervisor answers
STATS and METRICS for its children.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

LATENCY_SAMPLES = 10_000
# the delivery latency histogram's upper bounds, in seconds (arrival to final outcome)
LATENCY_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    86400.0,
    3 * 86400.0,
)


@dataclass
class Histogram:
    """Observations counted per bucket (``counts[i]``: those <= ``bounds[i]`` and above the
    bound before; the last count: above every bound), with their sum."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)  # none given: all 0
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError("a histogram has one count per bound and one above them all")

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, the last bound ``inf``: Prometheus's."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class SessionStats:
    """Counters the SMTP sessions add to; shared by all sessions of a deliverer."""

    connections: int = 0
    reused: int = 0
    tls: int = 0
    bytes_sent: int = 0
    verbatim: int = 0  # messages sent as the file holds them (no per-line work)


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
    # recipient outcomes by (status, DSN class): status sent|bounced|deferred|expired (the
    # mail log's words), class "2", "4" or "5"
    recipients: dict[tuple[str, str], int] = field(default_factory=dict)
    latency_histogram: Histogram = field(default_factory=Histogram)  # per final recipient
    _latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    _finished: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))

    def envelope_finished(self, latency: float | None, now: float | None = None) -> None:
        """An envelope left active/; ``latency`` is seconds from taken to its last delivery."""
        self._finished.append(time.time() if now is None else now)
        if latency is not None:
            self._latencies.append(latency)

    def recipient(self, status: str, dsn: str, latency: float | None = None) -> None:
        """One recipient outcome; ``latency``: seconds from arrival, for a final one."""
        key = (status, dsn[:1])
        self.recipients[key] = self.recipients.get(key, 0) + 1
        if latency is not None:
            self.latency_histogram.observe(max(0.0, latency))

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


def added(a: Stats, b: Stats) -> Stats:
    """What two workers did together, pure: counters add, counters by key add per key, the
    histograms' buckets and sums add, the start is the earlier one, the latency samples and
    finishing times are both kept (within their bounds)."""
    out = Stats(started=min(a.started, b.started))
    for f in fields(Stats):
        name = f.name
        x, y = getattr(a, name), getattr(b, name)
        if name == "started":
            continue
        if isinstance(x, int):
            setattr(out, name, x + y)
        elif isinstance(x, dict):
            setattr(out, name, {k: x.get(k, 0) + y.get(k, 0) for k in {**x, **y}})
        elif isinstance(x, Histogram):
            if x.bounds != y.bounds:
                raise ValueError("histograms with different buckets do not add")
            counts = [m + n for m, n in zip(x.counts, y.counts, strict=True)]
            setattr(out, name, Histogram(x.bounds, counts, x.total + y.total))
        elif isinstance(x, deque):
            merged = sorted([*x, *y]) if name == "_finished" else [*x, *y]
            setattr(out, name, deque(merged, maxlen=x.maxlen))
        else:
            raise TypeError(f"Stats.{name}: no rule to add {type(x).__name__}")
    return out


def to_dict(stats: Stats) -> dict[str, Any]:
    """A snapshot as JSON data (a child's answer to its supervisor); ``from_dict`` reads it."""
    out: dict[str, Any] = {}
    for f in fields(stats):  # a subclass's fields too
        value = getattr(stats, f.name)
        if isinstance(value, Histogram):
            value = {"bounds": list(value.bounds), "counts": value.counts, "total": value.total}
        elif isinstance(value, dict):
            value = {"/".join(k) if isinstance(k, tuple) else k: n for k, n in value.items()}
        elif isinstance(value, deque):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(data: Mapping[str, Any]) -> Stats:
    """The snapshot ``to_dict`` wrote (keys it does not know are ignored: an older child)."""
    stats = Stats()
    for f in fields(Stats):
        if f.name not in data:
            continue
        value, current = data[f.name], getattr(stats, f.name)
        if isinstance(current, Histogram):
            value = Histogram(tuple(value["bounds"]), list(value["counts"]), value["total"])
        elif isinstance(current, dict):
            value = {tuple(k.split("/", 1)): int(n) for k, n in value.items()}
        elif isinstance(current, deque):
            value = deque(value, maxlen=current.maxlen)
        setattr(stats, f.name, value)
    return stats

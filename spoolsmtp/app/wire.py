"""The supervisor's line protocol with its delivery processes, and the pure choices around it.

Over one socketpair per delivery process (the "child"), each side writes *batches*: one JSON
object per line, holding everything it had to say during one turn of its event loop. On the
hot path a burst costs one line per turn, not one per envelope:

supervisor -> child
    ``c``: names in incoming/ to claim; ``r``: deferred ids to retry;
    ``o``: operator requests ``[seq, op, args]`` (snap, hold, release, flush, trace, stop...).
child -> supervisor
    ``n``: names whose claim is over (whatever became of them); ``i``: retried ids likewise;
    ``s``: envelopes that left the child deferred or held (a ``Summary`` as a list);
    ``d``: ``[node, envelopes]``: the child adopted a dead node and resumed that many of its
    envelopes; deferred/ may now hold retries the supervisor does not know of;
    ``c``: its counters (``stats``, ``traffic``), every second when they moved;
    ``h``: the child holds its node (started, what it had in flight resumed): what the node's
    previous process queued is on disk;
    ``a``: answers ``[seq, value]``; ``t``: trace lines.

``Batch`` collects one side's lines, ``decode`` splits what was read, and ``choose`` and
``share`` are the supervisor's two decisions: which child gets the next envelope (the least
loaded one with room), and the part of a connection limit each child keeps (a static split:
see ``share``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from spoolsmtp.model.record import State
from spoolsmtp.model.stats import Stats, added, from_dict, to_dict

# what a Summary travels as: id, source, state, received, next attempt, destinations
SummaryRow = list[Any]


def encode(batch: dict[str, list[Any]]) -> bytes:
    """One batch as one line (JSON never holds a raw newline)."""
    return json.dumps(batch, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class Decoder:
    """Splits bytes read from the socket into batches; a torn last line waits for the rest."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[dict[str, list[Any]]]:
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        out: list[dict[str, list[Any]]] = []
        for line in lines:
            if line:
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError(f"not a batch: {line[:80]!r}")
                out.append(value)
        return out


class Batch:
    """One side's pending messages, by kind; ``take`` empties it."""

    def __init__(self) -> None:
        self._kinds: dict[str, list[Any]] = {}

    def add(self, kind: str, item: Any) -> bool:
        """Add one item; True if the batch was empty (the caller schedules a flush)."""
        empty = not self._kinds
        self._kinds.setdefault(kind, []).append(item)
        return empty

    def __bool__(self) -> bool:
        return bool(self._kinds)

    def take(self) -> bytes:
        data = encode(self._kinds)
        self._kinds = {}
        return data


def summary_row(
    envelope_id: str,
    source: str,
    state: State,
    received: float,
    next_attempt: float | None,
    destinations: dict[str, int],
) -> SummaryRow:
    return [envelope_id, source, state.value, received, next_attempt, destinations]


def choose(loads: Sequence[int | None], room: int) -> int | None:
    """The child to give the next envelope to: the least loaded of those running (a load of
    None: not running) whose load is below ``room``; the lowest index on a tie. None if all
    are full or down: the envelope waits in the supervisor, where no dead child can hold it."""
    best: int | None = None
    for index, load in enumerate(loads):
        if load is None or load >= room:
            continue
        if best is None or load < (loads[best] or 0):
            best = index
    return best


def share(limit: int, children: int, index: int) -> int:
    """Child ``index``'s part of a limit split among ``children``: the parts differ by at most
    one and add up to ``limit`` exactly, so the whole never exceeds it.

    A static split, not tokens granted per connection: it costs no message per delivery (the
    point of several processes is throughput), and the supervisor hands each child the same
    share of the work (``choose``), so each share is used. ``too_small`` says when a limit
    cannot be split so."""
    base, extra = divmod(limit, children)
    return base + (1 if index < extra else 0)


def too_small(limits: dict[str, int], children: int) -> list[str]:
    """The limits (by key) that cannot give every child at least one connection."""
    return [key for key, value in limits.items() if value < children]


def add_up(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum snapshots of counters: numbers add, dicts add key by key (nested), anything else
    is taken from the first part that has it (what is not a count cannot be summed)."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in total:
                total[key] = _copy(value)
            else:
                total[key] = _plus(total[key], value)
    return total


def _copy(value: Any) -> Any:
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value


def _plus(a: Any, b: Any) -> Any:
    if isinstance(a, bool) or isinstance(b, bool):
        return a or b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        out = {k: _copy(v) for k, v in a.items()}
        for k, v in b.items():
            out[k] = _plus(out[k], v) if k in out else _copy(v)
        return out
    return a


def counters(stats: Stats) -> dict[str, Any]:
    """Every count a ``Stats`` keeps, as JSON data (``stats.to_dict``: counters by key and the
    latency histogram included, whatever fields it gains), without the samples behind the
    rate and the quantiles, which the snapshot carries thinned (``rate``, ``latencies``)."""
    return {k: v for k, v in to_dict(stats).items() if k != "started" and not k.startswith("_")}


def summed(parts: Iterable[Mapping[str, Any]], started: float) -> Stats:
    """The ``counters`` of several processes added up (``stats.added``)."""
    total = Stats(started=started)
    for part in parts:
        total = added(total, from_dict(part))
    total.started = started
    return total

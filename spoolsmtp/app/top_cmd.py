"""``spoolsmtp top``: a live view of a running worker, refreshed each second in the terminal:
the queue per state and per destination, rates (taken, delivered, deferred, failed per second,
from the differences of successive STATS counters), latency, dead destinations, disk-full.

It asks the worker's control socket, as ``ctl`` does (STATS and QUERY, their JSON forms), and
draws with plain ANSI (clear, then the frame). ``render`` is a pure function of two snapshots;
``fetch`` and ``run`` are the thin I/O around it. ``--once``: one frame, no ANSI, then exit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoolsmtp.control import client
from spoolsmtp.model import exitcodes
from spoolsmtp.model.units import parse_duration

CLEAR = "\x1b[H\x1b[2J"
# STATS counters shown as rates: (label, STATS key)
RATES = (
    ("taken", "files_taken"),
    ("delivered", "recipients_delivered"),
    ("deferred", "recipients_deferred"),
    ("failed", "recipients_failed"),
)
# latency fields, read when STATS has them ("-" when it has not, or has no sample yet)
LATENCY = (("p50", "delivery_latency_p50_ms"), ("p99", "delivery_latency_p99_ms"))
QUEUE = ("incoming", "active", "deferred", "held")
OTHER = ("rejected", "bounces", "deadletter")


def add_parser(sub: Any, caller_config: str) -> None:
    """Register ``top`` on the ``spoolsmtp`` subcommand parser."""
    top = sub.add_parser("top", help="a live view of the worker (queue, rates, destinations)")
    top.add_argument("--config", type=Path, help=caller_config)
    top.add_argument("--socket", type=Path, help="the control socket (default from config)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument(
        "--interval",
        default="1s",
        metavar="DURATION",
        help="between frames (default 1s); with --once, between the two samples rates are "
        "taken from (0: one sample, no rates)",
    )


@dataclass(frozen=True)
class Snapshot:
    """What the worker said at ``at`` (seconds, a monotonic clock): STATS and QUERY, as their
    JSON ``result`` objects."""

    at: float
    stats: dict[str, Any]
    query: dict[str, Any]


# -- the frame (pure) ---------------------------------------------------------------------------


def rates(before: Snapshot | None, now: Snapshot) -> dict[str, float | None]:
    """Per second, each of ``RATES`` between the two snapshots; None without an earlier one,
    or when a counter went down (the worker restarted in between)."""
    out: dict[str, float | None] = {}
    span = now.at - before.at if before is not None else 0.0
    for label, key in RATES:
        if before is None or span <= 0:
            out[label] = None
            continue
        old, new = before.stats.get(key), now.stats.get(key)
        if not isinstance(old, int | float) or not isinstance(new, int | float) or new < old:
            out[label] = None
        else:
            out[label] = (new - old) / span
    return out


def render(
    before: Snapshot | None, now: Snapshot, *, clock: str, width: int = 100, height: int = 40
) -> list[str]:
    """The frame for ``now`` (rates since ``before``), at most ``width`` x ``height``;
    ``clock``: the wall time to show."""
    stats, query = now.stats, now.query
    states: dict[str, Any] = query.get("states", {})
    lines = [_title(stats, query, clock), ""]
    lines.append("queue    " + "  ".join(f"{s} {_num(states.get(s))}" for s in QUEUE))
    lines.append("spool    " + "  ".join(f"{s} {_num(states.get(s))}" for s in OTHER))
    oldest = query.get("oldest_seconds", {})
    if oldest:
        shown = "  ".join(f"{k} {_age(v)}" for k, v in sorted(oldest.items()))
        lines.append(f"oldest   {shown}")
    per = rates(before, now)
    lines.append("rate/s   " + "  ".join(f"{k} {_rate(v)}" for k, v in per.items()))
    latency = "  ".join(f"{label} {_ms(stats.get(key))}" for label, key in LATENCY)
    lines.append(f"latency  {latency}  (taken to last delivery)")
    totals = (
        f"totals   taken {_num(stats.get('files_taken'))}"
        f"  delivered {_num(stats.get('recipients_delivered'))}"
        f"  deferred {_num(stats.get('recipients_deferred'))}"
        f"  failed {_num(stats.get('recipients_failed'))}"
        f"  reports {_num(stats.get('reports_written'))}"
        f"  deadletters {_num(stats.get('deadletters_written'))}"
    )
    lines += [totals, ""]
    lines += _destinations(query.get("destinations", {}), height - len(lines))
    return [client.shown(line)[:width] for line in lines[:height]]


def _title(stats: dict[str, Any], query: dict[str, Any], clock: str) -> str:
    taking = "SUSPENDED" if query.get("suspended") else "taking files"
    disk = query.get("disk_full") or (stats.get("disk_full") and "yes")
    disk_text = f"DISK FULL since {disk}" if disk else "disk ok"
    return f"spoolsmtp top - {clock}  up {_age(stats.get('uptime_seconds'))}  {taking}  {disk_text}"


def _destinations(dests: dict[str, dict[str, Any]], room: int) -> list[str]:
    if not dests or room < 2:
        return ["no destination waiting"] if room >= 1 else []
    width = max(12, *(len(k) for k in dests))
    lines = [f"{'destination':{width}} {'envelopes':>9} {'recipients':>10}  next retry"]
    ordered = sorted(dests, key=lambda k: (not dests[k].get("dead_until"), -_int(dests[k])))
    shown = ordered[: room - 1]
    for key in shown:
        entry = dests[key]
        nxt = _clock_of(entry.get("next_attempt"))
        dead = entry.get("dead_until")
        note = f"  DEAD until {_clock_of(dead)}" if dead else ""
        lines.append(
            f"{key:{width}} {_num(entry.get('envelopes')):>9} "
            f"{_num(entry.get('recipients')):>10}  {nxt}{note}"
        )
    if len(ordered) > len(shown) and shown:
        lines[-1] = f"... and {len(ordered) - len(shown) + 1} more destinations"
    return lines


def _int(entry: dict[str, Any]) -> int:
    value = entry.get("recipients")
    return value if isinstance(value, int) else 0


def _num(value: object) -> str:
    return "-" if value is None else str(value)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "-"


def _age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _clock_of(when: object) -> str:
    """The time of day of an ISO time the worker gave (``...T12:34:56.789Z``), or ``-``."""
    if not isinstance(when, str) or "T" not in when:
        return "-"
    return when.split("T", 1)[1][:8] + (" UTC" if when.endswith("Z") else "")


# -- the I/O -------------------------------------------------------------------------------------


class NoAnswer(Exception):
    """The worker did not answer as expected; the message says why."""


def fetch(paths: Sequence[Path], trusted: set[int], timeout: float = 10.0) -> Snapshot:
    """STATS and QUERY on one connection."""
    try:
        sock = client.connect(paths, timeout, trusted)
    except client.Unreachable as exc:
        raise NoAnswer(str(exc)) from None
    with sock, sock.makefile("rwb") as stream:
        try:
            stream.write(b"JSON STATS\nJSON QUERY\n")
            stream.flush()
            answers = [stream.readline(), stream.readline()]
        except OSError as exc:
            raise NoAnswer(f"the worker went away: {exc.strerror or exc}") from None
    at = time.monotonic()
    results = []
    for raw in answers:
        try:
            answer = json.loads(raw)
            if answer.get("status") != 200:
                raise NoAnswer(f"the worker answered {answer.get('status')}")
            results.append(answer["result"])
        except (ValueError, KeyError, AttributeError):
            raise NoAnswer("the worker's answer was not understood") from None
    return Snapshot(at, results[0], results[1])


def run(paths: Sequence[Path], trusted: set[int], args: argparse.Namespace) -> int:
    try:
        interval = parse_duration(args.interval)
    except ValueError as exc:
        print(f"spoolsmtp top: --interval: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    try:
        if args.once:
            return _once(paths, trusted, interval)
        return _live(paths, trusted, max(interval, 0.1))
    except NoAnswer as exc:
        print(f"spoolsmtp top: {client.shown(str(exc))}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    except KeyboardInterrupt:
        return exitcodes.OK


def _frame(before: Snapshot | None, now: Snapshot) -> list[str]:
    size = shutil.get_terminal_size((100, 40))
    clock = time.strftime("%H:%M:%S")
    return render(before, now, clock=clock, width=size.columns, height=size.lines - 1)


def _once(paths: Sequence[Path], trusted: set[int], interval: float) -> int:
    before = None
    if interval > 0:
        before = fetch(paths, trusted)
        time.sleep(interval)
    now = fetch(paths, trusted)
    sys.stdout.write("\n".join(_frame(before, now)) + "\n")
    sys.stdout.flush()
    return exitcodes.OK


def _live(paths: Sequence[Path], trusted: set[int], interval: float) -> int:
    before: Snapshot | None = None
    while True:
        now = fetch(paths, trusted)
        sys.stdout.write(CLEAR + "\n".join(_frame(before, now)) + "\n")
        sys.stdout.flush()
        before = now
        time.sleep(max(0.0, interval - (time.monotonic() - now.at)))

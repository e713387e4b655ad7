"""Benchmark of one round trip from the event loop to an I/O thread and back: CPU (both
threads) and wall microseconds per call of a function that does nothing.

The group commit (``spool/iobatch.py``) makes one or two such trips per batch. Compared:
``asyncio.to_thread`` (the default executor) and ``spool.iothread.IoThread`` (a thread of our
own fed by a ``SimpleQueue``), alternated round by round on the event loop the worker runs
(uvloop when installed). Usage:

    .venv/bin/python scripts/bench_iothread.py [--calls 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoolsmtp.app import eventloop
from spoolsmtp.model.config import Config
from spoolsmtp.spool.iothread import IoThread


def nothing() -> int:
    return 1


async def per_call(kind: str, calls: int) -> tuple[float, float]:
    thread = IoThread("bench-io")
    trip: Callable[[], Awaitable[int]] = (
        (lambda: asyncio.to_thread(nothing))
        if kind == "to_thread"
        else (lambda: thread.call(nothing))
    )
    for _ in range(200):  # threads started, caches warm
        await trip()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await trip()
    return (time.process_time() - cpu) / calls * 1e6, (time.perf_counter() - wall) / calls * 1e6


def run(kind: str, calls: int) -> tuple[float, float]:
    """On the loop the worker would choose by default (``eventloop.factory``)."""
    _, loop_factory = eventloop.factory(Config())
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(per_call(kind, calls))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kinds = ("to_thread", "IoThread")
    figures: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            figures[kind].append(run(kind, args.calls))
    print(f"{args.calls} round trips x {args.rounds} rounds, alternated; microseconds per call")
    print(f"{'':10} {'CPU median':>10} {'CPU min-max':>14} {'wall median':>11}")
    for kind in kinds:
        cpu = [c for c, _ in figures[kind]]
        wall = [w for _, w in figures[kind]]
        spread = f"{min(cpu):.1f}-{max(cpu):.1f}"
        print(
            f"{kind:10} {statistics.median(cpu):10.1f} {spread:>14} {statistics.median(wall):11.1f}"
        )


if __name__ == "__main__":
    main()

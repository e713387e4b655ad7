"""Group commit for the spool: blocking file-system work runs in batches in I/O threads.

Each operation is a blocking callable run in the I/O thread; it returns the directories to fsync
afterwards (after renames and creations). A batch first commits the write-ahead log (the
journal: whatever was appended before the batch's operations were queued), then runs every
operation queued so far, then fsyncs each distinct directory once, then wakes their waiters.
Under load one fsync of ``active/`` covers the claims of dozens of envelopes, and one
fdatasync of the journal their final replies. Because the log is committed before the
operations run, a caller may append a record and queue the operation it must precede, and pay
for one round trip instead of two. A waiter that asked only for the commit (``nothing``: the
mark journaled before a final dot, on which a connection waits) is woken as soon as the log is
durable, in one hop from the thread to the loop, not after the rest of its batch (README,
Benchmarks: the sixth session). So a commit is no barrier for operations queued beside it: a
caller that needs one done awaits it.

Quick operations (a rename, a small file written without fsync) run on the event loop instead,
once the thread has committed the log, when the batch is ``inline`` (the spool is on a local
disk: fskind.py); only the fsyncs of their folders go back to the thread. Run in the thread,
every such call hands the interpreter lock to and from the busy loop: measured, twice the
context switches per envelope and about a tenth more CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from spoolsmtp.spool.durable import fsync_dir
from spoolsmtp.spool.iothread import IoThread, done_soon, settle


class Log(Protocol):
    """Buffered appends made durable at the start of every batch (the journal)."""

    def sync(self) -> None: ...


Op = Callable[[], Iterable[str | Path]]


def nothing() -> tuple[()]:
    """An operation that only waits for the log to be committed."""
    return ()


class IoBatch:
    """Runs operations in I/O threads, in batches, after committing the log."""

    def __init__(self, lanes: int = 1, *, inline: bool = False) -> None:
        self.log: Log | None = None
        self.inline = inline
        self._ops: list[_Queued] = []
        self._lanes: set[asyncio.Task[None]] = set()
        self._max_lanes = lanes
        # one thread of our own per lane (iothread.py: a round trip costs a quarter of
        # asyncio.to_thread's); each lane has one call in flight at a time
        self._threads = [IoThread(f"spoolsmtp-io-{k}") for k in range(lanes)]
        self._free = list(self._threads)
        self.batches = 0
        self.operations = 0

    async def run(self, op: Op = nothing, *, quick: bool = False) -> None:
        """Run ``op`` in an I/O thread; return once the log, it and its directories are durable.
        ``quick``: a few fast system calls that never fsync, run on the loop when ``inline``.

        Up to ``lanes`` batches run at once (operations are independent: each caller awaits
        its own before issuing the next). One is the default: with the journal standing in
        for per-file fsyncs a batch is short, and a second lane mostly adds contention for the
        interpreter lock (measured: 1,290 against 930 to 1,180 envelopes/s).
        """
        await self.request(op, quick=quick)

    def request(self, op: Op = nothing, *, quick: bool = False) -> asyncio.Future[None]:
        """``run`` without waiting: queue ``op`` and return the future its batch settles. A
        caller that starts a commit early (the mark before a final dot, begun while MAIL,
        RCPT and DATA are in flight) awaits it when it must; one that never does must still
        take its exception."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops.append((op, waiter, quick))
        if len(self._lanes) < self._max_lanes:
            self._lanes.add(asyncio.create_task(self._drive()))
        return waiter

    async def _drive(self) -> None:
        """A lane: runs batches while there are operations queued. It leaves the set of
        lanes in the same step as it finds the queue empty, so an operation queued a moment
        later always starts a new lane (with a done-callback instead, one queued between the
        lane's last look and the callback would wait forever)."""
        thread = self._free.pop()
        try:
            while self._ops:
                ops, self._ops = self._ops, []
                try:
                    errors = await self._batch(ops, thread)
                except Exception as exc:  # no thread could be started: each waiter hears it
                    errors = [exc for _ in ops]
                self.batches += 1
                self.operations += len(ops)
                for (_, waiter, _), error in zip(ops, errors, strict=True):
                    settle(waiter, None, error)
        finally:
            self._free.append(thread)
            lane = asyncio.current_task()
            assert lane is not None
            self._lanes.discard(lane)

    async def _batch(self, ops: list[_Queued], thread: IoThread) -> list[BaseException | None]:
        loop = asyncio.get_running_loop()
        commits = [waiter for op, waiter, _ in ops if op is nothing]

        def commit() -> None:
            """In the thread: the log; then, at once, the waiters that asked for nothing else
            (a journal commit: the mark before a final dot). They need not wait for the
            batch's other operations and folder fsyncs, nor for this lane to run again."""
            if self.log is not None:
                self.log.sync()
            if commits:
                done_soon(loop, commits)

        if not self.inline or not any(quick for _, _, quick in ops):
            return await thread.call(lambda: self._execute(commit, [op for op, _, _ in ops]))
        if self.log is not None:  # none yet (start-up): no round trip to the thread for it
            try:
                await thread.call(commit)
            except OSError as exc:
                return [exc for _ in ops]
        errors: list[BaseException | None] = [None] * len(ops)
        targets: dict[str | Path, list[int]] = {}
        slow = [index for index, (_, _, quick) in enumerate(ops) if not quick]
        _run_ops([(i, op) for i, (op, _, quick) in enumerate(ops) if quick], errors, targets)
        if slow or targets:
            rest = [(i, ops[i][0]) for i in slow]
            await thread.call(lambda: self._finish(rest, errors, targets))
        return errors

    @staticmethod
    def _finish(
        slow: list[tuple[int, Op]],
        errors: list[BaseException | None],
        targets: dict[str | Path, list[int]],
    ) -> None:
        """In the thread: the batch's other operations, then every folder's fsync."""
        _run_ops(slow, errors, targets)
        _sync_folders(errors, targets)

    def _execute(self, commit: Callable[[], None], ops: list[Op]) -> list[BaseException | None]:
        try:
            commit()
        except OSError as exc:
            return [exc for _ in ops]
        errors: list[BaseException | None] = [None] * len(ops)
        self._finish(list(enumerate(ops)), errors, {})
        return errors


_Queued = tuple[Op, "asyncio.Future[None]", bool]


def _run_ops(
    ops: list[tuple[int, Op]],
    errors: list[BaseException | None],
    targets: dict[str | Path, list[int]],
) -> None:
    """Run each operation, noting its failure and the folders it asks to be synced."""
    for index, op in ops:
        try:
            for target in op():
                targets.setdefault(target, []).append(index)
        except Exception as exc:
            errors[index] = exc


def _sync_folders(errors: list[BaseException | None], targets: dict[str | Path, list[int]]) -> None:
    """fsync each folder once; a failure fails every operation that asked for it."""
    for target, users in targets.items():
        try:
            fsync_dir(target)
        except OSError as exc:
            for index in users:
                errors[index] = errors[index] or exc

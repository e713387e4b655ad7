"""Group commit for the spool: all blocking file-system work runs in batches in I/O threads.

Each operation is a blocking callable run in the I/O thread; it returns what must be made
durable afterwards: directories to fsync (after renames and creations), and syncable objects
such as the journal. A batch runs every operation queued so far, then syncs each distinct
target once, then wakes every waiter. Under load one fsync of ``active/`` covers the claims of
dozens of envelopes, and one fdatasync of the journal their final replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from spoolsmtp.durable import fsync_dir


class Syncable(Protocol):
    """Something with buffered writes to make durable once per batch (the journal)."""

    def sync(self) -> None: ...


Target = Path | Syncable
Op = Callable[[], Iterable[Target]]


class IoBatch:
    """Runs operations in the I/O thread, in batches, and syncs their targets once per batch."""

    def __init__(self, lanes: int = 2) -> None:
        self._ops: list[tuple[Op, asyncio.Future[None]]] = []
        self._lanes: set[asyncio.Task[None]] = set()
        self._max_lanes = lanes
        self.batches = 0
        self.operations = 0

    async def run(self, op: Op) -> None:
        """Run ``op`` in an I/O thread; return once it and its targets are durable.

        Up to ``lanes`` batches run at once: operations are independent (each caller awaits
        its own before issuing the next), so two fsync queues on the device overlap.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops.append((op, waiter))
        if len(self._lanes) < self._max_lanes:
            self._lanes.add(asyncio.create_task(self._drive()))
        await waiter

    async def _drive(self) -> None:
        """A lane: runs batches while there are operations queued. It leaves the set of
        lanes in the same step as it finds the queue empty, so an operation queued a moment
        later always starts a new lane (with a done-callback instead, one queued between the
        lane's last look and the callback would wait forever)."""
        try:
            while self._ops:
                ops, self._ops = self._ops, []
                errors = await asyncio.to_thread(self._execute, [op for op, _ in ops])
                self.batches += 1
                self.operations += len(ops)
                for (_, waiter), error in zip(ops, errors, strict=True):
                    if waiter.done():
                        continue
                    if error is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(error)
        finally:
            lane = asyncio.current_task()
            assert lane is not None
            self._lanes.discard(lane)

    @staticmethod
    def _execute(ops: list[Op]) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        targets: dict[Target, list[int]] = {}
        for index, op in enumerate(ops):
            try:
                for target in op():
                    targets.setdefault(target, []).append(index)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        for target, users in targets.items():
            try:
                if isinstance(target, Path):
                    fsync_dir(target)
                else:
                    target.sync()
            except OSError as exc:
                for index in users:
                    errors[index] = errors[index] or exc
        return errors

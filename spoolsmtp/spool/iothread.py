"""One I/O thread, lean: what ``asyncio.to_thread`` does, for a caller that has one call in
flight at a time (a lane of ``iobatch``), without the executor's machinery.

``to_thread`` copies the context, wraps the call in a work item of the default executor, and
chains the executor's concurrent future to an asyncio one with callbacks on both sides. Here a
call is put on a ``SimpleQueue`` (C) that one thread of our own takes from, and its result
comes back by one ``call_soon_threadsafe``. Measured on this machine with uvloop: about 70 us
of CPU per round trip through ``to_thread``, 19 us through this (``scripts/bench_iothread.py``);
the group commit makes one or two of them per batch, and with two delivery processes a batch
holds only a few envelopes.

The thread is started by the first call and ends after ``idle`` seconds without one (so the
many spools a test run opens leave no threads behind); a call after that starts another. A
call whose awaiting task was cancelled still runs (as with ``to_thread``): its result is
dropped. A loop closed before the result comes back is no error in the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
IDLE = 5.0

_Call = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class IoThread:
    """A thread of our own that runs blocking calls for the event loop, one after another."""

    def __init__(self, name: str, idle: float = IDLE) -> None:
        self.name = name
        self.idle = idle
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.started = 0  # threads started so far (the tests look)

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn()`` in the thread; the future has its result or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._calls.put((fn, future, loop))
            if self._thread is None:
                self._start()
        return future

    def _start(self) -> None:
        """(Under the lock.)"""
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()
        self.started += 1

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _serve(self) -> None:
        try:
            self._take_calls()
        finally:  # idle, or (never seen) died: a call queued meanwhile gets a thread
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                    if not self._calls.empty():
                        self._start()

    def _take_calls(self) -> None:
        while True:
            try:
                fn, future, loop = self._calls.get(timeout=self.idle)
            except queue.Empty:
                with self._lock:  # a call put meanwhile sees the thread still here
                    if self._calls.empty():
                        return
                continue
            try:
                result = fn()
            except BaseException as exc:  # as to_thread: the awaiting task gets it
                _hand_back(loop, future, None, exc)
            else:
                _hand_back(loop, future, result, None)
            del fn, future, loop  # hold nothing of a finished call while waiting


def _hand_back(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)

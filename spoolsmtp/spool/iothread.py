"""One I/O thread, lean: what ``asyncio.to_thread`` does, for a caller that has one call in
flight at a time (a lane of ``iobatch``), without the executor's machinery.

``to_thread`` copies the context, wraps the call in a work item of the default executor, and
chains the executor's concurrent future to an asyncio one with callbacks on both sides. Here a
call is put on a ``SimpleQueue`` (C) that one thread of our own takes from, and its result
comes back by one ``call_soon_threadsafe``. Measured on this machine with uvloop: about 70 us
of CPU per round trip through ``to_thread``, 32 us through this (``scripts/bench_iothread.py``);
the group commit makes one or two of them per batch, and with two delivery processes a batch
holds only a few envelopes.

The thread is started by the first call and ends after ``idle`` seconds without one (so the
many spools a test run opens leave no threads behind); a call after that starts another. A
thread that cannot be started (no more tasks allowed) fails that call alone, with nothing
queued, and the next call tries again. A call whose awaiting task was cancelled still runs (as
with ``to_thread``): its result is dropped. A loop closed before the result comes back is no
error in the thread. At exit the interpreter waits (up to ``EXIT_WAIT``) for a call still
running, as ``asyncio.run`` waits for its executor: a batch begun is finished, not cut off
between its journal commit and its renames (which a restart would redo, as after a crash).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
IDLE = 5.0
EXIT_WAIT = 30.0

_Call = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class IoThread:
    """A thread of our own that runs blocking calls for the event loop, one after another."""

    def __init__(self, name: str, idle: float = IDLE) -> None:
        self.name = name
        self.idle = idle
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending = 0  # calls queued or running
        self._quiet = threading.Condition(self._lock)
        self.started = 0  # threads started so far (the tests look)
        _ALL.add(self)

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn()`` in the thread; the future has its result or its exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._start()  # may raise: then nothing is queued and the next call retries
            self._pending += 1
            self._calls.put((fn, future, loop))
        return future

    def _start(self) -> None:
        """(Under the lock.) The thread is ours only once it has started."""
        thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        thread.start()
        self._thread = thread
        self.started += 1

    def wait_quiet(self, timeout: float) -> bool:
        """Wait until no call is queued or running; False if ``timeout`` passed first."""
        with self._quiet:
            return self._quiet.wait_for(lambda: self._pending == 0, timeout)

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
            finally:
                with self._quiet:
                    self._pending -= 1
                    self._quiet.notify_all()
            del fn, future, loop  # hold nothing of a finished call while waiting


_ALL: weakref.WeakSet[IoThread] = weakref.WeakSet()


@atexit.register
def _finish_calls() -> None:
    """At exit, a call still running (a batch) is finished before the interpreter goes."""
    for thread in list(_ALL):
        thread.wait_quiet(EXIT_WAIT)


def _hand_back(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None,
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle, future, result, error)


def done_soon(loop: asyncio.AbstractEventLoop, futures: list[asyncio.Future[None]]) -> None:
    """(From a thread.) Give each of ``futures`` its result (None) on ``loop``, in one hop."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_all_done, futures)


def _all_done(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        settle(future, None, None)


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Give ``future`` its result, or ``error``, unless it is done already (cancelled)."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)

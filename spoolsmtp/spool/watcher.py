"""Noticing files in ``incoming/``: inotify events at once, a rescan now and then, and the
settle rule for writers that cannot rename.

A file renamed into ``incoming/`` (from ``.NAME`` or ``NAME.tmp``, or from another folder of the
same file system) is whole, and taken at once. A file written in place is looked at when its
writer closes it (or at a rescan) and taken once its mtime is ``settle_seconds`` old: an
unchanged mtime means neither size nor content changed since. Files the rescan finds are all
treated so: it cannot tell how they got there.

On Linux the folder is watched through watchdog's inotify bindings (``inotify_c``), read on
the event loop's own thread (``LoopInotify``): inotify is asked for renames into the folder
and closes after writing only, and one read serves every event the kernel has queued. No
thread, no lock, no hand-over per event: watchdog's observer runs three threads (the reader,
the emitter that pairs the halves of each rename, the dispatcher), and in a burst of 10,000
files they took about a tenth of the CPU of the whole service, most of a supervisor's. When
the kernel's queue overflows (``IN_Q_OVERFLOW``: events were dropped) the folder is rescanned.
Elsewhere watchdog's own observer is used, with its creation and move events, and only a
rename inside the folder counts as whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from spoolsmtp.spool.folders import takeable
from spoolsmtp.spool.intake import refusal

log = logging.getLogger("spoolsmtp")

_INOTIFY = True
try:
    from watchdog.observers.inotify_c import InotifyConstants as _In
    from watchdog.observers.inotify_c import inotify_add_watch, inotify_init
except ImportError:  # not Linux (or a watchdog without them): its observer, in threads
    _INOTIFY = False

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ_SIZE = 64 * 1024
_READS_PER_TURN = 8  # then the loop runs its other callbacks before reading on


class LoopInotify:
    """One inotify instance watching one folder, read on the event loop: ``named(name,
    moved)`` for each file renamed into it (moved) or closed after writing (not moved),
    ``overflowed()`` when the kernel dropped events."""

    def __init__(
        self,
        folder: Path,
        loop: asyncio.AbstractEventLoop,
        named: Callable[[str, bool], None],
        overflowed: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._named = named
        self._overflowed = overflowed
        fd = inotify_init()
        if fd < 0:
            raise _errno_error("inotify_init", folder)
        try:
            os.set_inheritable(fd, False)  # a delivery process or a sendmail child: not theirs
            os.set_blocking(fd, False)
            mask = _In.IN_MOVED_TO | _In.IN_CLOSE_WRITE | _In.IN_ONLYDIR
            if inotify_add_watch(fd, os.fsencode(folder), mask) < 0:
                raise _errno_error("inotify_add_watch", folder)
            loop.add_reader(fd, self._readable)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: so is its reader
                self._loop.remove_reader(fd)
            os.close(fd)

    def _readable(self) -> None:
        for _ in range(_READS_PER_TURN):
            if self._fd is None:
                return
            try:
                data = os.read(self._fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            self._events(data)
            if len(data) < _READ_SIZE // 2:
                return  # the queue is drained, most likely: the next event wakes us again

    def _events(self, data: bytes) -> None:
        offset, end = 0, len(data)
        overflow = False
        while offset + _EVENT.size <= end:
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            offset = start + length
            if mask & _In.IN_Q_OVERFLOW:
                overflow = True
            elif length and not mask & _In.IN_ISDIR:
                name = data[start:offset].rstrip(b"\0")
                self._named(os.fsdecode(name), bool(mask & _In.IN_MOVED_TO))
        if overflow:
            self._overflowed()


def _errno_error(call: str, folder: Path) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}", str(folder))


class _Handler(FileSystemEventHandler):
    """watchdog's observer (not Linux): a rename inside the folder is whole; a creation is
    looked at under the settle rule."""

    def __init__(self, watcher: IncomingWatcher) -> None:
        self.watcher = watcher

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher.from_thread(os.fsdecode(event.src_path), moved=False)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher.from_thread(os.fsdecode(event.dest_path), moved=True)


class IncomingWatcher:
    """Feeds names of takeable files to ``found``, each once it is ready."""

    def __init__(
        self,
        folder: Path,
        settle: float,
        found: Callable[[str], None],
        clock: Callable[[], float] = time.time,
        known: Callable[[str], bool] = lambda name: False,
        refused: Callable[[str, str], None] = lambda name, why: None,
    ) -> None:
        self.folder = folder
        self.settle = settle
        self.found = found
        self.clock = clock
        self.known = known
        self.refused = refused
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inotify: LoopInotify | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._lock = threading.Lock()
        self._pending: list[tuple[str, bool]] = []
        self._scheduled = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if _INOTIFY:
            self._inotify = LoopInotify(self.folder, self._loop, self._named, self._overflowed)
            return
        observer = Observer()
        # only creations and moves: watchdog then asks for nothing else, so a writer's
        # writes and our reads cost no event
        observer.schedule(
            _Handler(self),
            str(self.folder),
            recursive=False,
            event_filter=[FileCreatedEvent, FileMovedEvent],
        )
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        observer = self._observer
        if observer is not None:
            observer.stop()
            observer.join(5)
            self._observer = None

    @property
    def may_miss(self) -> bool:
        """Whether events can be lost unsaid (watchdog's observer does not pass on an
        overflow of the kernel's queue): then the caller rescans after each burst."""
        return self._inotify is None

    def _named(self, name: str, moved: bool) -> None:
        if takeable(name):  # a writer's temp file costs nothing more
            self.look(name, moved)

    def _overflowed(self) -> None:
        log.debug("the kernel dropped events of %s (its queue overflowed): rescanning", self.folder)
        self.rescan()

    def from_thread(self, path: str, *, moved: bool) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        full = Path(path)
        if full.parent != self.folder or not takeable(full.name):
            return  # decided here, in watchdog's thread: a writer's temp file wakes nobody
        with self._lock:
            self._pending.append((full.name, moved))
            if self._scheduled:
                return  # the loop has yet to run the callback that will take this one too
            self._scheduled = True
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._take_pending)

    def _take_pending(self) -> None:
        """In the loop: every name watchdog reported since the last call (during a burst one
        wake-up of the loop serves dozens of files, not one each)."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for name, moved in pending:
            self.look(name, moved)

    def look(self, name: str, moved: bool = False) -> None:
        """Decide about one name: take it now, later (settle), or never (or it is ``known``:
        already on its way, so a rescan during a burst costs no stat per waiting file)."""
        if not takeable(name):
            why = refusal(name)
            if why is not None:
                self.refused(name, why)  # the caller logs it once, not at every rescan
            return
        if self.known(name):
            return
        if moved or self.settle <= 0:
            self.found(name)
            return
        try:
            info = os.lstat(self.folder / name)
        except FileNotFoundError:
            return
        age = self.clock() - info.st_mtime
        if age >= self.settle:
            self.found(name)
        elif self._loop is not None:
            self._loop.call_later(self.settle - age + 0.01, self.look, name, False)

    def rescan(self) -> int:
        """Look at every name in the folder (lost events, files present at start)."""
        count = 0
        with os.scandir(self.folder) as entries:
            for entry in entries:
                self.look(entry.name)
                count += 1
        return count

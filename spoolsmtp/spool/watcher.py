"""Noticing files in ``incoming/``: watchdog events at once, a rescan now and then, and the
settle rule for writers that cannot rename.

A file renamed into ``incoming/`` (from ``.NAME`` or ``NAME.tmp``, or from another folder of the
same file system) is whole, and taken at once. A file written in place is looked at when its
writer closes it (or at a rescan) and taken once its mtime is ``settle_seconds`` old: an
unchanged mtime means neither size nor content changed since. Files the rescan finds are all
treated so: it cannot tell how they got there.

On Linux, inotify is asked for renames into the folder and closes after writing only (see
``_NarrowEmitter``). Elsewhere, or with a watchdog whose layout this module does not know,
watchdog's own creation and move events are used, and only a rename inside the folder counts
as whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, EventEmitter

from spoolsmtp.spool.folders import takeable
from spoolsmtp.spool.intake import refusal

_NARROW: type[EventEmitter] | None = None
try:
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
    from watchdog.observers.inotify_c import InotifyConstants
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
except ImportError:  # not Linux, or another watchdog layout: its defaults apply
    pass
else:
    # watchdog holds every IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and the
    # queue waits behind it (watchdog issues 390, 649). With the narrow mask below there are
    # no IN_MOVED_FROM events at all; this is for the fallback.
    InotifyMoveEventGrouper.delay = 0.01

    class _NarrowEmitter(InotifyEmitter):
        """Asks inotify for IN_MOVED_TO and IN_CLOSE_WRITE only (and IN_DELETE_SELF, which
        watchdog needs). No IN_MOVED_FROM: the worker's own claims (renames out of incoming/)
        and the first half of a writer's rename cost no event, and watchdog's pairing of
        the halves of each rename (a linear search of its queue, behind every unpaired
        IN_MOVED_FROM held back for its delay) has nothing to do. No IN_CREATE: a file
        written in place is seen when its writer closes it. So a created event can only
        mean a file renamed into the folder, whole."""

        def get_event_mask_from_filter(self) -> Any:
            return (
                InotifyConstants.IN_MOVED_TO
                | InotifyConstants.IN_CLOSE_WRITE
                | InotifyConstants.IN_DELETE_SELF
            )

    _NARROW = _NarrowEmitter


def _observer() -> tuple[BaseObserver, bool]:
    """An observer, and whether it watches with the narrow mask (else watchdog's own)."""
    observer = Observer()
    emitter = _NARROW
    if (
        emitter is None
        or not isinstance(observer, InotifyObserver)
        or getattr(observer, "_emitter_class", None) is not InotifyEmitter
    ):
        return observer, False
    observer._emitter_class = emitter  # the class it builds its emitters from
    return observer, True


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: IncomingWatcher, narrow: bool) -> None:
        self.watcher = watcher
        self.narrow = narrow

    def on_created(self, event: FileSystemEvent) -> None:
        # narrow: only an IN_MOVED_TO without its other half becomes a created event
        if not event.is_directory:
            self.watcher.from_thread(os.fsdecode(event.src_path), moved=self.narrow)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher.from_thread(os.fsdecode(event.dest_path), moved=True)

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher.from_thread(os.fsdecode(event.src_path), moved=False)


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
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._lock = threading.Lock()
        self._pending: list[tuple[str, bool]] = []
        self._scheduled = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        observer, narrow = _observer()
        # only creations, moves and (narrow) closes after writing: watchdog then asks inotify
        # for nothing else, so a writer's writes and our reads cost no event at all
        events: list[type[FileSystemEvent]] = [FileCreatedEvent, FileMovedEvent]
        if narrow:
            events.append(FileClosedEvent)
        observer.schedule(
            _Handler(self, narrow), str(self.folder), recursive=False, event_filter=events
        )
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        observer = self._observer
        if observer is not None:
            observer.stop()
            observer.join(5)
            self._observer = None

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

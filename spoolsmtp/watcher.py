"""Noticing files in ``incoming/``: watchdog events at once, a rescan now and then, and the
settle rule for writers that cannot rename.

A file renamed into place inside ``incoming/`` (from ``.NAME`` or ``NAME.tmp``) is taken at
once. Any other file (created in place, or moved in from elsewhere) is taken once its mtime is
``settle_seconds`` old: an unchanged mtime means neither size nor content changed since.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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

from spoolsmtp.spool import takeable

try:
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
except ImportError:  # not Linux, or another watchdog layout: its defaults apply
    pass
else:
    # watchdog holds every IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and the
    # queue waits behind it (watchdog issues 390, 649): each claim out of incoming/ is such an
    # unpaired event. The kernel reports both halves of a rename in one read, so a short window
    # still pairs them; an unpaired move falls back to the settle rule, which is safe.
    InotifyMoveEventGrouper.delay = 0.01


class _Handler(FileSystemEventHandler):
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
    ) -> None:
        self.folder = folder
        self.settle = settle
        self.found = found
        self.clock = clock
        self.known = known
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._lock = threading.Lock()
        self._pending: list[tuple[str, bool]] = []
        self._scheduled = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        observer = Observer()
        # only creations and moves: watchdog then asks inotify for nothing else, so a writer's
        # open, writes and close (and our reads) cost no event at all
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
        if not takeable(name) or self.known(name):
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

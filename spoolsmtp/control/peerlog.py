"""Log lines that a control peer can cause, bounded per uid so no local user can fill the log.

Each uid gets ``burst`` lines per ``window``; further lines in that window are counted, and when
the window ends one line says how many were suppressed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0
    timer: asyncio.TimerHandle | None = None


class PeerLog:
    """``warning(uid, ...)`` as ``logging``'s, at most ``burst`` lines per uid per window."""

    def __init__(
        self,
        log: logging.Logger,
        burst: int = 5,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.burst = burst
        self.window = window
        self.clock = clock
        self._windows: dict[int, _Window] = {}

    def warning(self, uid: int, msg: str, *args: object) -> None:
        now = self.clock()
        win = self._windows.get(uid)
        if win is None or now - win.started >= self.window:
            if win is not None:
                self._report(uid)
            win = self._windows[uid] = _Window(now)
        if win.logged < self.burst:
            win.logged += 1
            self.log.warning(msg, *args)
            return
        win.suppressed += 1
        if win.timer is None:
            delay = max(0.0, win.started + self.window - now)
            win.timer = asyncio.get_running_loop().call_later(delay, self._report, uid)

    def _report(self, uid: int) -> None:
        win = self._windows.pop(uid, None)
        if win is None:
            return
        if win.timer is not None:
            win.timer.cancel()
        if win.suppressed:
            self.log.warning(
                "control: suppressed %d more line(s) caused by uid %d in the last %ds",
                win.suppressed,
                uid,
                int(self.window),
            )

    def close(self) -> None:
        for uid in list(self._windows):
            self._report(uid)

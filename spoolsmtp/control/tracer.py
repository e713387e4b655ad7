"""Run-time tracing (TRACE RESOLVER / SESSION / SPOOL): to the log, to a ring of recent lines,
and to operators following it. Emitting never blocks: a follower that cannot keep up loses
lines (and is told how many), the worker never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from enum import Enum

log = logging.getLogger("spoolsmtp")
FOLLOWER_QUEUE = 1000


class Kind(Enum):
    """What can be traced."""

    RESOLVER = "resolver"
    SESSION = "session"
    SPOOL = "spool"


class Tracer:
    """Which kinds are on, the ring of recent lines, and the followers."""

    def __init__(self, ring: int = 1000) -> None:
        self.enabled: set[Kind] = set()
        self.ring: deque[str] = deque(maxlen=ring)
        self._followers: set[asyncio.Queue[str]] = set()
        self.dropped = 0

    def on(self, kind: Kind) -> bool:
        return kind in self.enabled

    def emit(self, kind: Kind, text: str) -> None:
        if kind not in self.enabled:
            return
        line = f"{time.strftime('%H:%M:%S')} {kind.value}: {text}"
        log.info("trace %s", line)
        self.ring.append(line)
        for queue in self._followers:
            try:
                queue.put_nowait(line)
            except asyncio.QueueFull:
                self.dropped += 1

    def follow(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(FOLLOWER_QUEUE)
        self._followers.add(queue)
        return queue

    def unfollow(self, queue: asyncio.Queue[str]) -> None:
        self._followers.discard(queue)

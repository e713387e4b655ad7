"""At most so many deliveries at once to each destination (``delivery.max_per_destination``):
one semaphore per destination in use, dropped when nobody holds or waits for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class _Limit:
    semaphore: asyncio.Semaphore
    users: int = 0  # holders and waiters


class DestinationLimits:
    """At most ``limit`` deliveries at once to each destination. A destination's semaphore
    exists only while someone holds or waits for it: the table does not grow with every
    destination ever seen."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._limits: dict[str, _Limit] = {}

    def __len__(self) -> int:
        """The destinations in use now."""
        return len(self._limits)

    def hold(self, key: str) -> _Held:
        """``async with limits.hold(key):`` one of ``key``'s places, waited for if need be."""
        return _Held(self, key)

    def _join(self, key: str) -> _Limit:
        entry = self._limits.get(key)
        if entry is None:
            entry = self._limits[key] = _Limit(asyncio.Semaphore(self.limit))
        entry.users += 1
        return entry

    def _leave(self, key: str, entry: _Limit) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._limits[key]


class _Held:
    """One hold of a destination's place: a plain async context manager (no generator and
    wrapper per delivery, as ``contextlib.asynccontextmanager`` makes)."""

    def __init__(self, limits: DestinationLimits, key: str) -> None:
        self._limits = limits
        self._key = key
        self._entry: _Limit | None = None

    async def __aenter__(self) -> None:
        entry = self._limits._join(self._key)
        try:
            await entry.semaphore.acquire()
        except BaseException:
            self._limits._leave(self._key, entry)
            raise
        self._entry = entry

    async def __aexit__(self, *exc_info: object) -> None:
        entry = self._entry
        assert entry is not None
        entry.semaphore.release()
        self._limits._leave(self._key, entry)

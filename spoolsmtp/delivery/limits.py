"""At most so many deliveries at once to each destination (``delivery.max_per_destination``),
and as many again on deck, next in line: two semaphores per destination in use, dropped when
nobody holds or waits for them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class _Limit:
    semaphore: asyncio.Semaphore
    deck: asyncio.Semaphore  # twice the limit: the holders and the next in line
    users: int = 0  # holders and waiters, of either


class DestinationLimits:
    """At most ``limit`` deliveries at once to each destination, and at most ``limit`` more on
    deck (``deck``: held around ``hold``, so the next delivery of each connection is known
    while the one before it runs). A destination's semaphores exist only while someone holds
    or waits for one: the table does not grow with every destination ever seen."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._limits: dict[str, _Limit] = {}

    def __len__(self) -> int:
        """The destinations in use now."""
        return len(self._limits)

    def hold(self, key: str) -> _Held:
        """``async with limits.hold(key):`` one of ``key``'s places, waited for if need be."""
        return _Held(self, key, deck=False)

    def deck(self, key: str) -> _Held:
        """``async with limits.deck(key):`` one of ``key``'s places on deck (twice the limit,
        the holders' included): taken before ``hold``, so at most ``limit`` wait on deck."""
        return _Held(self, key, deck=True)

    def _join(self, key: str) -> _Limit:
        entry = self._limits.get(key)
        if entry is None:
            entry = self._limits[key] = _Limit(
                asyncio.Semaphore(self.limit), asyncio.Semaphore(2 * self.limit)
            )
        entry.users += 1
        return entry

    def _leave(self, key: str, entry: _Limit) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._limits[key]


class _Held:
    """One hold of a destination's place: a plain async context manager (no generator and
    wrapper per delivery, as ``contextlib.asynccontextmanager`` makes)."""

    def __init__(self, limits: DestinationLimits, key: str, *, deck: bool) -> None:
        self._limits = limits
        self._key = key
        self._deck = deck
        self._entry: _Limit | None = None

    async def __aenter__(self) -> None:
        entry = self._limits._join(self._key)
        try:
            await (entry.deck if self._deck else entry.semaphore).acquire()
        except BaseException:
            self._limits._leave(self._key, entry)
            raise
        self._entry = entry

    async def __aexit__(self, *exc_info: object) -> None:
        entry = self._entry
        assert entry is not None
        (entry.deck if self._deck else entry.semaphore).release()
        self._limits._leave(self._key, entry)

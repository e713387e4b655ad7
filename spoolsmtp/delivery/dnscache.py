"""The resolver's answers in memory: each kept until its deadline, at most ``size`` of them, and
one look-up under way per question.

``Answers`` is the one store ``MxResolver`` keeps for both kinds of look-up it makes: the hops
of a destination (its MX answer and the MX hosts' addresses, or a route's host) and the records
of one name and type (DANE's TLSA, MTA-STS's TXT). So ``dns.cache_size`` bounds them together,
as the README says ("the cache holds at most ``dns.cache_size`` look-ups"); when it is full the
expired answers go first, then the oldest.

``Inflight`` lets callers that ask the same question at once share one look-up: twenty
deliveries to a domain starting together, with nothing cached yet, send one TLSA query, not
twenty.

``negative_ttl`` says how long a negative answer (no such name, no such record) is kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

import dns.exception
import dns.message
import dns.rdatatype

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Answers(Generic[K, V]):
    """Values kept until their deadline (the caller's clock), at most ``size`` of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: dict[K, tuple[float, V]] = {}

    def get(self, key: K, now: float) -> V | None:
        """The value kept for ``key`` if its deadline is still ahead; an expired one is dropped."""
        hit = self._kept.get(key)
        if hit is None:
            return None
        if hit[0] > now:
            return hit[1]
        del self._kept[key]
        return None

    def put(self, key: K, value: V, until: float, now: float) -> None:
        """Keep ``value`` until ``until``; when full, drop the expired ones, then the oldest."""
        if self._kept.pop(key, None) is None and len(self._kept) >= self.size:
            for old in [k for k, (t, _) in self._kept.items() if t <= now]:
                del self._kept[old]
            while len(self._kept) >= self.size:
                del self._kept[next(iter(self._kept))]
        self._kept[key] = (until, value)

    def pop(self, key: K) -> V | None:
        """Forget ``key``; what was kept (expired or not), or None."""
        hit = self._kept.pop(key, None)
        return None if hit is None else hit[1]

    def questions(self) -> list[K]:
        return list(self._kept)


class Inflight(Generic[K, V]):
    """One look-up per question at a time: a caller asking what another caller is already
    asking waits for that answer instead of asking again. The look-up runs as its own task, so a
    caller that is cancelled (its delivery ended) does not cancel it for the others."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, look_up: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """The answer, and whether it came from a look-up another caller started."""
        running = self._running.get(key)
        # a look-up is shared only within its event loop (tests run one loop after another)
        if running is not None and running.get_loop() is asyncio.get_running_loop():
            return await asyncio.shield(running), True
        task = asyncio.ensure_future(look_up())
        self._running[key] = task

        def done(finished: asyncio.Future[V]) -> None:
            if self._running.get(key) is finished:
                del self._running[key]

        task.add_done_callback(done)
        return await asyncio.shield(task), False


def negative_ttl(responses: Iterable[dns.message.Message], default: float) -> float:
    """How long a negative answer is kept (RFC 2308 section 5): the negative TTL dnspython's
    ``resolve_chaining`` finds in the response's SOA (the smaller of the SOA record's TTL and its
    minimum field, and of any CNAME's TTL on the way), or ``default`` when the response has no
    SOA for the name (where dnspython would use its own 300 s); the least of several."""
    return min((_soa_ttl(r, default) for r in responses), default=default)


def _soa_ttl(response: dns.message.Message, default: float) -> float:
    if not isinstance(response, dns.message.QueryMessage):
        return default
    try:
        chain = response.resolve_chaining()
    except dns.exception.DNSException:
        return default
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and chain.canonical_name.is_subdomain(rrset.name):
            return float(chain.minimum_ttl)
    return default

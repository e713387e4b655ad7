"""Mail exchanger resolution with dnspython: MX order, implicit MX, null MX, caching, EXPIRE.

``MxResolver.hops`` turns a destination into an ordered list of (host, address, port) to try,
or a reply that says why there is none: NXDOMAIN and null MX are permanent (550 5.1.2,
556 5.1.10), SERVFAIL and timeouts temporary (451 4.4.3). MX records are ordered by
``Rdataset.processing_order()`` (preference, equal preferences shuffled). Answers are cached
for their TTL; ``expire`` forgets one domain.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from spoolsmtp.config import DnsConfig
from spoolsmtp.errors import ConfigError
from spoolsmtp.reply import Reply, make
from spoolsmtp.route import Destination
from spoolsmtp.tracer import always

NEGATIVE_TTL = 60.0
Trace = Callable[[str], None]


@dataclass(frozen=True)
class Hop:
    """One address to try: the MX (or route) host name, its address, and the port."""

    host: str
    address: str
    port: int = 25


@dataclass(frozen=True)
class Resolution:
    """The hops for a destination in the order to try them, or the reply that says why none."""

    hops: tuple[Hop, ...] = ()
    failure: Reply | None = None
    ttl: float = 0.0


class _Temporary(Exception):
    """A DNS failure worth one more try (timeout, SERVFAIL)."""


@dataclass
class DnsStats:
    lookups: int = 0
    cache_hits: int = 0
    queries: int = 0


@dataclass
class MxResolver:
    """Resolves destinations to hops; owns the cache. One instance per worker."""

    config: DnsConfig
    max_addresses: int = 5
    port: int = 25
    trace: Trace | None = None
    # asked before a line is built: a worker with tracing off formats nothing
    tracing: Callable[[], bool] = always
    clock: Callable[[], float] = time.monotonic
    stats: DnsStats = field(default_factory=DnsStats)
    _cache: dict[str, tuple[float, Resolution]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=not self.config.nameservers)
        except dns.resolver.NoResolverConfiguration as exc:
            raise ConfigError(
                "(system)", "dns.nameservers", "no system resolver configuration; set it"
            ) from exc
        if self.config.nameservers:
            self._resolver.nameservers = list(self.config.nameservers)
            self._resolver.port = self.config.port
        self._resolver.timeout = self.config.timeout
        self._resolver.lifetime = self.config.lifetime

    def expire(self, name: str) -> bool:
        """Forget the cached answer for a domain (the EXPIRE command); True if one was cached."""
        return self._cache.pop(name.lower().rstrip("."), None) is not None

    def cached(self) -> list[str]:
        return sorted(self._cache)

    async def hops(self, dest: Destination) -> Resolution:
        """The hops to try for a destination (cached for the answers' TTL)."""
        key = dest.domain if dest.domain is not None else dest.key
        self.stats.lookups += 1
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self.stats.cache_hits += 1
            if self._traced():
                self._trace(f"{key}: cached, {_describe(hit[1])}")
            return hit[1]
        if dest.route is not None:
            result = await self._route_hops(dest.route.host, dest.route.port)
        else:
            assert dest.domain is not None
            result = await self._mx_hops(dest.domain)
        self._trace(f"{key}: {_describe(result)}")
        if result.failure is None or result.failure.code >= 500:
            ttl = result.ttl if result.failure is None else NEGATIVE_TTL
            if ttl > 0:
                self._cache[key] = (now + ttl, result)
        return result

    async def _route_hops(self, host: str, port: int) -> Resolution:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return Resolution((Hop(host, host, port),), ttl=float("inf"))
        addresses, ttl, failure = await self._addresses(host)
        if not addresses:
            return Resolution(failure=failure or make(451, "4.4.4", f"no address for {host}"))
        hops = tuple(Hop(host, a, port) for a in addresses[: self.max_addresses])
        return Resolution(hops, ttl=ttl)

    async def _mx_hops(self, domain: str) -> Resolution:
        try:
            answer = await self._query(domain, "MX")
        except dns.resolver.NXDOMAIN:
            return Resolution(failure=make(550, "5.1.2", f"domain {domain} does not exist"))
        except dns.resolver.NoAnswer:
            addresses, ttl, failure = await self._addresses(domain)
            if not addresses:
                return Resolution(
                    failure=failure or make(550, "5.4.4", f"{domain} has no MX and no address")
                )
            hops = tuple(Hop(domain, a, self.port) for a in addresses[: self.max_addresses])
            return Resolution(hops, ttl=ttl)
        except _Temporary as exc:
            return Resolution(failure=make(451, "4.4.3", f"DNS lookup of MX {domain}: {exc}"))
        rrset = answer.rrset
        assert rrset is not None
        records = [typing.cast(MX, r) for r in rrset.processing_order()]
        if any(r.exchange == dns.name.root for r in records):
            return Resolution(
                failure=make(556, "5.1.10", f"{domain} accepts no mail (null MX)"),
                ttl=float(rrset.ttl),
            )
        ttl = float(rrset.ttl)
        hosts = [r.exchange.to_text(omit_final_dot=True) for r in records]
        looked_up = await asyncio.gather(*(self._addresses(h) for h in hosts))
        found: list[Hop] = []
        temporary: Reply | None = None
        for host, (addresses, host_ttl, failure) in zip(hosts, looked_up, strict=True):
            if failure is not None and failure.code < 500:
                temporary = failure
            if addresses:
                ttl = min(ttl, host_ttl)
            found.extend(Hop(host, a, self.port) for a in addresses)
        if not found:
            failure = temporary or make(550, "5.4.4", f"no MX host of {domain} has an address")
            return Resolution(failure=failure)
        return Resolution(tuple(found[: self.max_addresses]), ttl=ttl)

    async def _addresses(self, host: str) -> tuple[list[str], float, Reply | None]:
        """A then AAAA addresses of a host; a temporary failure only if neither answered."""
        found: list[str] = []
        ttl = float("inf")
        temporary: Reply | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(host, rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except _Temporary as exc:
                temporary = make(451, "4.4.3", f"DNS lookup of {rdtype} {host}: {exc}")
                continue
            rrset = answer.rrset
            assert rrset is not None
            ttl = min(ttl, float(rrset.ttl))
            found.extend(r.to_text() for r in rrset)
        if found:
            return found, ttl, None
        return [], 0.0, temporary

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(2),
            wait=wait_fixed(0.05),
            retry=retry_if_exception_type(_Temporary),
            reraise=True,
        ):
            with attempt:
                self.stats.queries += 1
                try:
                    answer = await self._resolver.resolve(
                        name, rdtype, search=False, raise_on_no_answer=True
                    )
                except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
                    self._trace(f"query {rdtype} {name}: temporary failure: {type(exc).__name__}")
                    raise _Temporary(type(exc).__name__) from exc
                except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
                    self._trace(f"query {rdtype} {name}: {type(exc).__name__}")
                    raise
                self._trace(f"query {rdtype} {name}: {answer.rrset}")
                return answer
        raise AssertionError("unreachable")

    def _traced(self) -> bool:
        return self.trace is not None and self.tracing()

    def _trace(self, text: str) -> None:
        if self.trace is not None and self.tracing():
            self.trace(f"resolver: {text}")


def _describe(result: Resolution) -> str:
    if result.failure is not None:
        return str(result.failure)
    return ", ".join(f"{h.host}[{h.address}]:{h.port}" for h in result.hops)

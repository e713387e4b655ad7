"""Mail exchanger resolution with dnspython: MX order, implicit MX, null MX, caching, EXPIRE.

``MxResolver.hops`` turns a destination into an ordered list of (host, address, port) to try,
or a reply that says why there is none: NXDOMAIN and null MX are permanent (550 5.1.2,
556 5.1.10), SERVFAIL and timeouts temporary (451 4.4.3). MX records are ordered by
``Rdataset.processing_order()`` (preference, equal preferences shuffled). Answers are cached
for their TTL; ``expire`` forgets one domain.

DNS answers are not trusted as given: only the ``dns.max_mx`` most preferred MX records are
used, a look-up sends at most ``dns.max_queries`` queries, TTLs are capped at ``dns.max_ttl``
and the cache holds at most ``dns.cache_size`` look-ups (expired ones dropped first). Addresses
found through DNS that point back at this host or at a link-local service (loopback unless
``dns.allow_loopback``, link-local, unspecified, multicast; private ones unless
``dns.allow_private``) are refused: an MX host with nothing else fails with 554 5.4.4, like
Postfix's "mail for X loops back to myself". Routes, the smarthost and address literals are the
operator's choice and are not filtered.

The host of a route or of the smarthost is looked up in DNS first, then, when DNS gives no
address (no such name, no A/AAAA, or no answer at all), through the system's resolver
(``getaddrinfo``: ``/etc/hosts`` and whatever nsswitch.conf names), as Postfix's
``smtp_host_lookup = dns, native``: so ``smarthost: localhost`` and names in the host table work.
MX hosts are looked up in DNS only, so the checks above keep their meaning. A host-table answer
has no TTL: it is cached for ``SYSTEM_TTL`` (capped by ``dns.max_ttl``).

``lookup`` (one name and type: DANE's TLSA records, MTA-STS's ``_mta-sts`` TXT) is cached in the
same store, so that DNS traffic follows the destinations, not the mail: an answer for its TTL
(the smallest along a CNAME chain, capped by ``dns.max_ttl``) with whether it was authenticated;
no such name or no such record (NXDOMAIN, NoAnswer) for the negative TTL of RFC 2308 (the SOA
the response carries: the smaller of its TTL and its minimum field, as dnspython's
``resolve_chaining`` computes it), or ``NEGATIVE_TTL`` when there is no SOA; a failure (SERVFAIL,
timeout) never. Look-ups of the same question at the same time share one (``dnscache.Inflight``).
``dns.cache_size`` bounds destinations and records together (``dnscache.Answers``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_fixed,
)

from spoolsmtp.delivery.dnscache import Answers, Inflight, negative_ttl
from spoolsmtp.delivery.route import Destination
from spoolsmtp.model.config import DnsConfig
from spoolsmtp.model.errors import ConfigError
from spoolsmtp.model.hop import Hop, always
from spoolsmtp.model.reply import Reply, make

NEGATIVE_TTL = 60.0
SYSTEM_TTL = 300.0
HOPS = "hops"  # the kind of a destination's cache entry; a record's is its type ("TLSA")
Trace = Callable[[str], None]


@dataclass(frozen=True)
class Resolution:
    """The hops for a destination in the order to try them, or the reply that says why none."""

    hops: tuple[Hop, ...] = ()
    failure: Reply | None = None
    ttl: float = 0.0
    # the MX (or implicit-MX address) answer was DNSSEC-authenticated (the resolver set AD)
    secure: bool = False


@dataclass(frozen=True)
class Lookup:
    """One look-up of any type, for DANE and MTA-STS: the records' texts (empty when the name
    or the type does not exist), whether the answer was authenticated (AD), and ``failure``
    when no answer came (timeout, SERVFAIL): then nothing is known."""

    records: tuple[str, ...] = ()
    secure: bool = False
    failure: str | None = None


class _Temporary(Exception):
    """A DNS failure worth one more try (timeout, SERVFAIL)."""


class _OverBudget(_Temporary):
    """The look-up has sent ``dns.max_queries`` queries: not worth another try."""


@dataclass
class _Budget:
    """Queries one look-up may still send."""

    left: int


@dataclass
class DnsStats:
    """Look-ups asked for (destinations and records alike), those answered without a query of
    their own (from the cache, or by the same look-up already under way), and queries sent."""

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
    # not init fields: a resolver made from another (dataclasses.replace, as RELOAD's
    # renewed_resolver does) starts with nothing cached and nothing under way
    _answers: Answers[tuple[str, str], Resolution | Lookup] = field(init=False, repr=False)
    _asking_hops: Inflight[str, Resolution] = field(init=False, repr=False)
    _asking: Inflight[tuple[str, str], Lookup] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._answers = Answers(self.config.cache_size)
        self._asking_hops = Inflight()
        self._asking = Inflight()
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
        # ask a validating resolver to say whether it authenticated the answer (RFC 6840 5.7)
        self._resolver.flags = dns.flags.RD | dns.flags.AD

    async def lookup(self, name: str, rdtype: str) -> Lookup:
        """Records of one name and type, cached (see the module's docstring), within the query
        budget of one look-up."""
        key = (name.lower().rstrip("."), rdtype.upper())
        self.stats.lookups += 1
        hit = self._answers.get(key, self.clock())
        if isinstance(hit, Lookup):
            self.stats.cache_hits += 1
            if self._traced():
                self._trace(f"{rdtype} {name}: cached, {_records(hit)}")
            return hit
        found, shared = await self._asking.run(key, lambda: self._lookup(key))
        if shared:
            self.stats.cache_hits += 1
        return found

    async def _lookup(self, key: tuple[str, str]) -> Lookup:
        """Ask, and keep the answer (not a failure) for its TTL or its negative TTL."""
        name, rdtype = key
        now = self.clock()
        try:
            answer = await self._query(name, rdtype, _Budget(self.config.max_queries))
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.kwargs.get("responses", {}).values())
            found = Lookup(secure=bool(responses) and all(map(_authenticated, responses)))
            ttl = negative_ttl(responses, NEGATIVE_TTL)
        except dns.resolver.NoAnswer as exc:
            response = exc.kwargs.get("response")
            found = Lookup(secure=_authenticated(response))
            ttl = negative_ttl([response] if response is not None else [], NEGATIVE_TTL)
        except _Temporary as exc:
            return Lookup(failure=str(exc))
        else:
            assert answer.rrset is not None
            records = tuple(r.to_text() for r in answer.rrset)
            found = Lookup(records, _authenticated(answer.response))
            ttl = float(answer.chaining_result.minimum_ttl)
        ttl = min(ttl, self.config.max_ttl)
        if ttl > 0:
            self._answers.put(key, found, now + ttl, now)
        return found

    async def addresses(self, host: str) -> list[str]:
        """The A and AAAA addresses of a host (for the MTA-STS policy host); [] if none."""
        found, _, _ = await self._addresses(host, _Budget(self.config.max_queries))
        return found

    def expire(self, dest: Destination) -> bool:
        """Forget what is cached for a destination (the EXPIRE command): its hops (a domain's
        MX answer, a route's or the smarthost's host), the TLSA records of the hosts those hops
        name (``_PORT._tcp.HOST``) and of any host at or under the domain (its MX answer may
        have gone before them), and the domain's ``_mta-sts`` TXT record. True if any was."""
        domain = None if dest.domain is None else dest.domain.lower().rstrip(".")
        entry = self._answers.pop((domain or dest.key, HOPS))
        names = set()
        if isinstance(entry, Resolution):
            names = {(f"_{h.port}._tcp.{h.host}".lower().rstrip("."), "TLSA") for h in entry.hops}
        if domain is not None:
            names.add((f"_mta-sts.{domain}", "TXT"))
            for name, kind in self._answers.questions():
                host = name.split(".", 2)[-1]
                if kind == "TLSA" and (host == domain or host.endswith("." + domain)):
                    names.add((name, kind))
        forgot = [self._answers.pop(key) is not None for key in names]
        return entry is not None or any(forgot)

    def cached(self) -> list[str]:
        """The destinations with a cached answer (not the records)."""
        return sorted(key for key, kind in self._answers.questions() if kind == HOPS)

    async def hops(self, dest: Destination) -> Resolution:
        """The hops to try for a destination (cached for the answers' TTL)."""
        key = dest.domain if dest.domain is not None else dest.key
        self.stats.lookups += 1
        hit = self._answers.get((key, HOPS), self.clock())
        if isinstance(hit, Resolution):
            self.stats.cache_hits += 1
            if self._traced():
                self._trace(f"{key}: cached, {_describe(hit)}")
            return hit
        result, shared = await self._asking_hops.run(key, lambda: self._resolve(dest, key))
        if shared:
            self.stats.cache_hits += 1
        return result

    async def _resolve(self, dest: Destination, key: str) -> Resolution:
        """Look a destination up, and keep the answer (not a temporary failure) for its TTL."""
        now = self.clock()
        budget = _Budget(self.config.max_queries)
        if dest.route is not None:
            port = dest.route.port if dest.route.port is not None else self.port
            result = await self._route_hops(dest.route.host, port, budget)
        else:
            assert dest.domain is not None
            result = await self._mx_hops(dest.domain, budget)
        self._trace(f"{key}: {_describe(result)}")
        if result.failure is None or result.failure.code >= 500:
            ttl = result.ttl if result.failure is None else NEGATIVE_TTL
            ttl = min(ttl, self.config.max_ttl)
            if ttl > 0:
                self._answers.put((key, HOPS), result, now + ttl, now)
        return result

    def _refused(self, address: str) -> str | None:
        """Why an address found through DNS is not used, or None if it may be."""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            return None if self.config.allow_loopback else "loopback (a loop back to this host)"
        if ip.is_link_local:
            return "link-local"
        if ip.is_unspecified:
            return "unspecified"
        if ip.is_multicast:
            return "multicast"
        if ip.is_private and not self.config.allow_private:
            return "private"
        return None

    def _usable(self, host: str, addresses: list[str], refused: list[str]) -> list[Hop]:
        """The hops for the addresses of a host found through DNS; refused ones noted."""
        hops: list[Hop] = []
        for address in addresses:
            why = self._refused(address)
            if why is None:
                hops.append(Hop(host, address, self.port))
            else:
                refused.append(f"{host}: {address} is {why}")
        return hops

    def _refusal(self, domain: str, refused: list[str]) -> Reply:
        shown = "; ".join(refused[:3]) + ("; ..." if len(refused) > 3 else "")
        return make(554, "5.4.4", f"{domain} has only refused addresses ({shown})")

    async def _route_hops(self, host: str, port: int, budget: _Budget) -> Resolution:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return Resolution((Hop(host, host, port),), ttl=float("inf"))
        addresses, ttl, failure = await self._addresses(host, budget)
        if not addresses:
            addresses = await self._system_addresses(host)
            ttl = SYSTEM_TTL
        if not addresses:
            return Resolution(failure=failure or make(451, "4.4.4", f"no address for {host}"))
        hops = tuple(Hop(host, a, port) for a in addresses[: self.max_addresses])
        return Resolution(hops, ttl=ttl)

    async def _mx_hops(self, domain: str, budget: _Budget) -> Resolution:
        try:
            answer = await self._query(domain, "MX", budget)
        except dns.resolver.NXDOMAIN:
            return Resolution(failure=make(550, "5.1.2", f"domain {domain} does not exist"))
        except dns.resolver.NoAnswer:
            addresses, ttl, failure = await self._addresses(domain, budget)
            if not addresses:
                return Resolution(
                    failure=failure or make(550, "5.4.4", f"{domain} has no MX and no address")
                )
            skipped: list[str] = []
            usable = self._usable(domain, addresses, skipped)
            if not usable:
                return Resolution(failure=self._refusal(domain, skipped))
            # DANE looks only behind a signed MX RRset: an implicit MX counts as not secure
            return Resolution(tuple(usable[: self.max_addresses]), ttl=ttl)
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
        hosts = [r.exchange.to_text(omit_final_dot=True) for r in records[: self.config.max_mx]]
        looked_up = await asyncio.gather(*(self._addresses(h, budget) for h in hosts))
        found: list[Hop] = []
        refused: list[str] = []
        temporary: Reply | None = None
        for host, (addresses, host_ttl, failure) in zip(hosts, looked_up, strict=True):
            if failure is not None and failure.code < 500:
                temporary = failure
            if addresses:
                ttl = min(ttl, host_ttl)
            found.extend(self._usable(host, addresses, refused))
        if not found:
            if temporary is None and refused:
                return Resolution(failure=self._refusal(domain, refused))
            failure = temporary or make(550, "5.4.4", f"no MX host of {domain} has an address")
            return Resolution(failure=failure)
        secure = _authenticated(answer.response)
        return Resolution(tuple(found[: self.max_addresses]), ttl=ttl, secure=secure)

    async def _addresses(self, host: str, budget: _Budget) -> tuple[list[str], float, Reply | None]:
        """A then AAAA addresses of a host; a temporary failure only if neither answered."""
        found: list[str] = []
        ttl = float("inf")
        temporary: Reply | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(host, rdtype, budget)
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

    async def _system_addresses(self, host: str) -> list[str]:
        """The addresses the system's resolver gives a route host (the host table first, as
        nsswitch.conf says), in its order; none when it knows none or takes longer than
        ``dns.lifetime``."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.lifetime):
                infos = await loop.getaddrinfo(
                    host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
        except (OSError, TimeoutError, UnicodeError) as exc:
            self._trace(f"system resolver {host}: {exc}")
            return []
        found: list[str] = []
        for family, _, _, _, sockaddr in infos:
            address = str(sockaddr[0])
            if family in (socket.AF_INET, socket.AF_INET6) and address not in found:
                found.append(address)
        self._trace(f"system resolver {host}: {', '.join(found) or 'nothing'}")
        return found

    async def _query(self, name: str, rdtype: str, budget: _Budget) -> dns.resolver.Answer:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(2),
            wait=wait_fixed(0.05),
            retry=retry_if_exception_type(_Temporary) & retry_if_not_exception_type(_OverBudget),
            reraise=True,
        ):
            with attempt:
                if budget.left <= 0:
                    raise _OverBudget(f"more than {self.config.max_queries} queries")
                budget.left -= 1
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


def _authenticated(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _records(found: Lookup) -> str:
    if not found.records:
        return "none" + (" (authenticated)" if found.secure else "")
    return ", ".join(found.records) + (" (authenticated)" if found.secure else "")


def _describe(result: Resolution) -> str:
    if result.failure is not None:
        return str(result.failure)
    return ", ".join(f"{h.host}[{h.address}]:{h.port}" for h in result.hops)

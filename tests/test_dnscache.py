"""The resolver's cache of record look-ups (DANE's TLSA, MTA-STS's TXT), against the real
loopback DNS server: an answer is asked once for its TTL, with its authentication; a negative
one for its SOA's negative TTL (or 60 s without one); a failure never; questions asked at once
share one query; EXPIRE and a renewed resolver forget them. What the server was asked is what
is counted, so a test fails when a query is sent that the cache should have spared."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.app.reconfig import renewed_resolver
from spoolsmtp.delivery.mx import NEGATIVE_TTL, Lookup, MxResolver
from spoolsmtp.delivery.route import Destination
from spoolsmtp.model.config import Route, TlsPolicy
from spoolsmtp.model.hop import Hop
from tests.dnsserver import SERVFAIL, SILENT, Zone, serve
from tests.helpers import draft, make_config
from tests.smtpservers import SmtpServer
from tests.workerproc import WorkerProcess, wait_for

DOMAIN = "example.test"
MX = "mx.example.test"
TLSA = f"_25._tcp.{MX}"
STS = f"_mta-sts.{DOMAIN}"
RECORD = "3 1 1 " + "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def zone() -> Iterator[tuple[Zone, int]]:
    z = Zone()
    z.add(DOMAIN, "MX", f"10 {MX}.")
    z.add(MX, "A", "127.0.0.2")
    z.add(TLSA, "TLSA", RECORD)
    z.add(STS, "TXT", '"v=STSv1; id=1;"')
    z.signed.add(DOMAIN)
    with serve(z) as port:
        yield z, port


def resolver(port: int, clock: Clock | None = None, **dns: Any) -> MxResolver:
    settings = {"nameservers": ["127.0.0.1"], "port": port, "allow_loopback": True}
    cfg = make_config(dns={**settings, "timeout": "0.3s", "lifetime": "0.6s", **dns})
    if clock is None:
        return MxResolver(cfg.dns)
    return MxResolver(cfg.dns, clock=clock)


def lookup(r: MxResolver, name: str, rdtype: str) -> Lookup:
    return asyncio.run(r.lookup(name, rdtype))


def asked(z: Zone, name: str, rdtype: str) -> int:
    """How many queries the server got for this name and type (UDP and TCP alike)."""
    return sum(1 for _, n, t in list(z.queries) if (n, t) == (name.lower(), rdtype))


def test_an_answer_is_asked_once_for_its_ttl_and_keeps_its_authentication(
    zone: tuple[Zone, int],
) -> None:
    z, port = zone
    z.ttl = 60
    clock = Clock()
    r = resolver(port, clock)
    first = lookup(r, TLSA, "TLSA")
    assert first.secure and first.records == (RECORD,)
    clock.now += 59
    assert lookup(r, TLSA.upper() + ".", "tlsa") == first
    assert asked(z, TLSA, "TLSA") == 1
    assert (r.stats.lookups, r.stats.cache_hits) == (2, 1)
    clock.now += 2
    assert lookup(r, TLSA, "TLSA") == first
    assert asked(z, TLSA, "TLSA") == 2


def test_a_one_second_ttl_runs_out_on_the_real_clock(zone: tuple[Zone, int]) -> None:
    """No fake clock: every look-up started within the second after the first was asked must
    be answered from the cache, and one after it must reach the server again."""
    z, port = zone
    z.ttl = 1
    r = resolver(port)
    started = time.monotonic()
    lookup(r, TLSA, "TLSA")
    assert asked(z, TLSA, "TLSA") == 1
    early: list[int] = []

    def asked_again() -> bool:
        lookup(r, TLSA, "TLSA")
        # a look-up over before the second is out looked at the cache before it, too (each
        # starts an event loop: on a busy machine one begun in time may look after it)
        if time.monotonic() < started + 1.0:
            early.append(asked(z, TLSA, "TLSA"))
        return asked(z, TLSA, "TLSA") == 2

    wait_for(asked_again, timeout=30, what="the TLSA record asked again after its TTL")
    assert early and set(early) == {1}, early


def test_max_ttl_caps_how_long_an_answer_is_kept(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.ttl = 86400
    clock = Clock()
    r = resolver(port, clock, max_ttl="10s")
    lookup(r, STS, "TXT")
    clock.now += 9
    lookup(r, STS, "TXT")
    assert asked(z, STS, "TXT") == 1
    clock.now += 2
    lookup(r, STS, "TXT")
    assert asked(z, STS, "TXT") == 2


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [(f"_25._tcp.nothing.{DOMAIN}", "TLSA"), (MX, "TLSA")],
    ids=["nxdomain", "no-such-record"],
)
def test_a_negative_answer_without_soa_is_kept_for_the_negative_ttl(
    zone: tuple[Zone, int], name: str, rdtype: str
) -> None:
    z, port = zone
    clock = Clock()
    r = resolver(port, clock)
    none = lookup(r, name, rdtype)
    assert none.records == () and none.failure is None and none.secure
    clock.now += NEGATIVE_TTL - 1
    assert lookup(r, name, rdtype) == none
    assert asked(z, name, rdtype) == 1
    clock.now += 2
    lookup(r, name, rdtype)
    assert asked(z, name, rdtype) == 2


def test_a_negative_answer_is_kept_for_its_soa_minimum(zone: tuple[Zone, int]) -> None:
    """RFC 2308: the smaller of the SOA's TTL (the zone's 300 s here) and its minimum field."""
    z, port = zone
    z.negative_ttl = 5
    clock = Clock()
    r = resolver(port, clock)
    name = f"_25._tcp.nothing.{DOMAIN}"
    lookup(r, name, "TLSA")
    clock.now += 4
    lookup(r, name, "TLSA")
    assert asked(z, name, "TLSA") == 1
    clock.now += 2
    lookup(r, name, "TLSA")
    assert asked(z, name, "TLSA") == 2


@pytest.mark.parametrize("how", [SERVFAIL, SILENT])
def test_a_failure_is_not_kept_and_the_next_answer_is(zone: tuple[Zone, int], how: str) -> None:
    z, port = zone
    z.behaviour[TLSA] = how
    r = resolver(port)
    assert lookup(r, TLSA, "TLSA").failure is not None
    once = asked(z, TLSA, "TLSA")
    assert lookup(r, TLSA, "TLSA").failure is not None
    assert asked(z, TLSA, "TLSA") > once
    del z.behaviour[TLSA]
    assert lookup(r, TLSA, "TLSA").records == (RECORD,)
    answered = asked(z, TLSA, "TLSA")
    assert lookup(r, TLSA, "TLSA").records == (RECORD,)
    assert asked(z, TLSA, "TLSA") == answered


def test_questions_asked_at_once_share_one_query(zone: tuple[Zone, int]) -> None:
    z, port = zone
    r = resolver(port)

    async def many() -> list[Lookup]:
        return await asyncio.gather(*(r.lookup(TLSA, "TLSA") for _ in range(20)))

    found = asyncio.run(many())
    assert {f.records for f in found} == {(RECORD,)}
    assert asked(z, TLSA, "TLSA") == 1
    assert (r.stats.lookups, r.stats.cache_hits) == (20, 19)


def test_records_share_the_bound_of_the_cache_with_destinations(zone: tuple[Zone, int]) -> None:
    z, port = zone
    r = resolver(port, cache_size=2)
    asyncio.run(r.hops(Destination(DOMAIN, DOMAIN, None, TlsPolicy.DANE)))
    assert r.cached() == [DOMAIN]
    lookup(r, TLSA, "TLSA")
    lookup(r, STS, "TXT")  # the third: the oldest, the destination, goes
    assert r.cached() == []
    lookup(r, TLSA, "TLSA")
    assert asked(z, TLSA, "TLSA") == 1


def test_expire_forgets_the_domains_mx_its_hosts_tlsa_and_its_sts_record(
    zone: tuple[Zone, int],
) -> None:
    z, port = zone
    other = "_25._tcp.mx.elsewhere.test"
    z.add(other, "TLSA", RECORD)
    r = resolver(port)
    dest = Destination(DOMAIN, DOMAIN, None, TlsPolicy.DANE)
    (hop,) = asyncio.run(r.hops(dest)).hops
    assert hop == Hop(MX, "127.0.0.2", 25)
    for name, rdtype in ((TLSA, "TLSA"), (STS, "TXT"), (other, "TLSA")):
        lookup(r, name, rdtype)
    assert r.expire(Destination(DOMAIN, DOMAIN.upper(), None, TlsPolicy.DANE))
    assert not r.expire(dest)
    asyncio.run(r.hops(dest))
    for name, rdtype in ((TLSA, "TLSA"), (STS, "TXT"), (other, "TLSA")):
        lookup(r, name, rdtype)
    assert asked(z, DOMAIN, "MX") == 2
    assert (asked(z, TLSA, "TLSA"), asked(z, STS, "TXT"), asked(z, other, "TLSA")) == (2, 2, 1)


def test_expire_forgets_the_tlsa_of_a_host_under_the_domain_after_its_mx_answer_went(
    zone: tuple[Zone, int],
) -> None:
    z, port = zone
    r = resolver(port)
    lookup(r, TLSA, "TLSA")
    assert r.expire(Destination(DOMAIN, DOMAIN, None, TlsPolicy.DANE))
    lookup(r, TLSA, "TLSA")
    assert asked(z, TLSA, "TLSA") == 2


def test_expire_of_a_routed_domain_forgets_the_routes_host_and_its_tlsa(
    zone: tuple[Zone, int],
) -> None:
    z, port = zone
    tlsa = f"_2525._tcp.{MX}"
    z.add(tlsa, "TLSA", RECORD)
    r = resolver(port)
    dest = Destination(f"[{MX}]:2525", None, Route(MX, 2525), TlsPolicy.DANE)
    asyncio.run(r.hops(dest))
    lookup(r, tlsa, "TLSA")
    assert r.expire(dest)
    asyncio.run(r.hops(dest))
    lookup(r, tlsa, "TLSA")
    assert (asked(z, MX, "A"), asked(z, tlsa, "TLSA")) == (2, 2)


def test_a_renewed_resolver_starts_without_the_records(zone: tuple[Zone, int]) -> None:
    """RELOAD of the DNS settings: answers found with the old ones are not kept."""
    z, port = zone
    r = resolver(port)
    lookup(r, TLSA, "TLSA")
    lookup(r, TLSA, "TLSA")
    assert asked(z, TLSA, "TLSA") == 1
    cfg = make_config(dns={"nameservers": ["127.0.0.1"], "port": port, "allow_loopback": True})
    fresh = renewed_resolver(r, cfg)
    lookup(fresh, TLSA, "TLSA")
    assert asked(z, TLSA, "TLSA") == 2
    assert fresh.stats is r.stats and r.stats.lookups == 3


def test_expire_of_a_routed_domain_through_the_control_channel(
    tmp_path: Path, zone: tuple[Zone, int]
) -> None:
    """EXPIRE names a domain; a routed domain's answer is kept under its route's host (found
    by review: EXPIRE said "nothing cached" and kept it)."""
    z, port = zone
    z.add("relay.test", "A", "127.0.0.1")
    srv = SmtpServer()
    dns = {"nameservers": ["127.0.0.1"], "port": port, "allow_loopback": True}
    routes = {DOMAIN: {"host": "relay.test", "port": srv.port}}
    w = WorkerProcess(tmp_path, {"routes": routes, "dns": dns}).start()
    try:
        w.drop_drafts("a.bsmtp", [draft("o@batch.test", [f"a@{DOMAIN}"])])
        assert wait_for(lambda: w.final("a.bsmtp"))["state"] == "done"
        assert w.ask(f"EXPIRE {DOMAIN}")["result"] == {"forgotten": True}
        w.drop_drafts("b.bsmtp", [draft("o@batch.test", [f"b@{DOMAIN}"])])
        assert wait_for(lambda: w.final("b.bsmtp"))["state"] == "done"
    finally:
        assert w.stop() == 0
        srv.stop()
    assert asked(z, "relay.test", "A") == 2

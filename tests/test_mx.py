"""MX resolution against a real DNS server on loopback (UDP and TCP), and delivery through it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.delivery import route
from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver, Resolution
from spoolsmtp.model.config import Config, DnsConfig, Route, TlsPolicy
from spoolsmtp.model.outcome import Status
from spoolsmtp.spool import envfile
from tests.dnsserver import NXDOMAIN, SERVFAIL, SILENT, TRUNCATE, Zone, serve
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import SmtpServer


@pytest.fixture
def zone() -> Iterator[tuple[Zone, int]]:
    z = Zone()
    with serve(z) as port:
        yield z, port


def resolver(port: int, dns: dict[str, Any] | None = None, **kw: object) -> MxResolver:
    """A resolver asking the test zone; loopback answers allowed (the zone's hosts are
    loopback addresses) unless ``dns`` says otherwise."""
    settings: dict[str, Any] = {
        "allow_loopback": True,
        "timeout": 0.3,
        "lifetime": 0.6,
        **(dns or {}),
    }
    cfg = DnsConfig(nameservers=("127.0.0.1",), port=port, **settings)
    return MxResolver(cfg, **kw)  # type: ignore[arg-type]


def hops(r: MxResolver, domain: str) -> Resolution:
    dest = route.Destination(domain, domain, None, TlsPolicy.OFF)
    return asyncio.run(r.hops(dest))


def test_mx_in_preference_order(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", "20 mx2.example.org.", "10 mx1.example.org.", "30 mx3.example.org.")
    for i in (1, 2, 3):
        z.add(f"mx{i}.example.org", "A", f"127.0.0.{i + 1}")
    res = hops(resolver(port), "example.org")
    assert res.failure is None
    assert [h.host for h in res.hops] == ["mx1.example.org", "mx2.example.org", "mx3.example.org"]
    assert [h.address for h in res.hops] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def test_equal_preferences_are_shuffled(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.ttl = 0
    z.add("example.org", "MX", "10 a.example.org.", "10 b.example.org.")
    z.add("a.example.org", "A", "127.0.0.2")
    z.add("b.example.org", "A", "127.0.0.3")
    r = resolver(port)
    firsts = {hops(r, "example.org").hops[0].host for _ in range(40)}
    assert firsts == {"a.example.org", "b.example.org"}


def test_no_mx_falls_back_to_the_domains_address(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "A", "127.0.0.5")
    res = hops(resolver(port), "example.org")
    assert [(h.host, h.address) for h in res.hops] == [("example.org", "127.0.0.5")]


def test_null_mx_is_permanent(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", "0 .")
    res = hops(resolver(port), "example.org")
    assert res.failure is not None
    assert (res.failure.code, res.failure.enhanced) == (556, "5.1.10")


def test_nxdomain_is_permanent(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.behaviour["nowhere.example"] = NXDOMAIN
    res = hops(resolver(port), "nowhere.example")
    assert res.failure is not None
    assert (res.failure.code, res.failure.enhanced) == (550, "5.1.2")


@pytest.mark.parametrize("how", [SERVFAIL, SILENT])
def test_servfail_and_silence_are_temporary(zone: tuple[Zone, int], how: str) -> None:
    z, port = zone
    z.behaviour["example.org"] = how
    r = resolver(port)
    res = hops(r, "example.org")
    assert res.failure is not None
    assert (res.failure.code, res.failure.enhanced) == (451, "4.4.3")
    assert r.cached() == []


def test_truncated_udp_answer_is_retried_over_tcp(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", "10 mx.example.org.")
    z.add("mx.example.org", "A", "127.0.0.2")
    z.behaviour["example.org"] = TRUNCATE
    res = hops(resolver(port), "example.org")
    assert [h.address for h in res.hops] == ["127.0.0.2"]
    assert ("tcp", "example.org", "MX") in z.queries


def test_mx_host_without_address_is_skipped(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", "10 noaddr.example.org.", "20 mx2.example.org.")
    z.add("noaddr.example.org", "TXT", '"no address here"')
    z.add("mx2.example.org", "A", "127.0.0.3")
    res = hops(resolver(port), "example.org")
    assert [h.host for h in res.hops] == ["mx2.example.org"]


def test_addresses_are_capped(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", *[f"{i} mx{i}.example.org." for i in range(1, 8)])
    for i in range(1, 8):
        z.add(f"mx{i}.example.org", "A", f"127.0.1.{i}")
    res = hops(resolver(port, max_addresses=5), "example.org")
    assert len(res.hops) == 5


def test_answers_are_cached_and_expire_forgets(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", "10 mx.example.org.")
    z.add("mx.example.org", "A", "127.0.0.2")
    r = resolver(port)
    hops(r, "example.org")
    sent = len(z.queries)
    hops(r, "example.org")
    assert len(z.queries) == sent
    assert r.stats.cache_hits == 1
    assert r.expire(route.Destination("example.org", "EXAMPLE.org", None, TlsPolicy.OFF))
    hops(r, "example.org")
    assert len(z.queries) > sent


def deliver_all(cfg: Config, path: Path) -> list[Status]:
    env = envfile.read(path, cfg.limits, cfg.helo_name)

    async def run() -> list[Status]:
        r = MxResolver(cfg.dns, cfg.delivery.max_addresses, cfg.delivery.port)
        d = Deliverer(cfg, r)
        try:
            results = await d.deliver(path, env.transactions[0], "E", datetime.now(UTC))
        finally:
            await d.close_all()
        return [x.status for x in results]

    return asyncio.run(run())


def test_each_mx_is_tried_before_the_attempt_fails(tmp_path: Path, zone: tuple[Zone, int]) -> None:
    z, port = zone
    srv = SmtpServer(host="127.0.0.3")
    try:
        z.add("example.org", "MX", "10 dead.example.org.", "20 live.example.org.")
        z.add("dead.example.org", "A", "127.0.0.2")
        z.add("live.example.org", "A", "127.0.0.3")
        cfg = make_config(
            dns={"nameservers": ["127.0.0.1"], "port": port, "allow_loopback": True},
            delivery={"port": srv.port},
        )
        path = tmp_path / "e.bsmtp"
        write_envelope(path, [draft("o@example.com", ["a@example.org"])])
        assert deliver_all(cfg, path) == [Status.DELIVERED]
        assert srv.messages[0].rcpt_tos == ["a@example.org"]
    finally:
        srv.stop()


def test_dns_failures_decide_the_recipients_fate(tmp_path: Path, zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.behaviour["gone.example"] = NXDOMAIN
    z.behaviour["broken.example"] = SERVFAIL
    z.add("nomail.example", "MX", "0 .")
    cfg = make_config(dns={"nameservers": ["127.0.0.1"], "port": port, "timeout": "300ms"})
    path = tmp_path / "e.bsmtp"
    write_envelope(
        path, [draft("o@example.com", ["a@gone.example", "b@broken.example", "c@nomail.example"])]
    )
    assert deliver_all(cfg, path) == [Status.FAILED, Status.DEFERRED, Status.FAILED]


def test_mx_pointing_at_loopback_is_refused_as_a_loop(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", "10 mx.example.org.")
    z.add("mx.example.org", "A", "127.0.0.1")
    z.add("self.example", "A", "127.0.0.1")
    z.add("self.example", "AAAA", "::1")
    for domain in ("example.org", "self.example"):
        res = hops(resolver(port, {"allow_loopback": False}), domain)
        assert res.hops == () and res.failure is not None, domain
        assert (res.failure.code, res.failure.enhanced) == (554, "5.4.4"), res.failure
        assert "127.0.0.1 is loopback" in str(res.failure)


def test_link_local_and_unspecified_addresses_are_always_refused(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", "10 meta.example.org.", "20 zero.example.org.", "30 ok.example.org.")
    z.add("meta.example.org", "A", "169.254.169.254")
    z.add("zero.example.org", "A", "0.0.0.0")
    z.add("zero.example.org", "AAAA", "fe80::1")
    z.add("ok.example.org", "A", "127.0.0.7")
    res = hops(resolver(port), "example.org")
    assert [(h.host, h.address) for h in res.hops] == [("ok.example.org", "127.0.0.7")]
    z.records.pop(("ok.example.org", "A"))
    res = hops(resolver(port), "example.org")
    assert res.failure is not None and res.failure.code == 554
    assert "169.254.169.254 is link-local" in str(res.failure)


def test_private_addresses_are_refused_when_the_setting_says_so(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", "10 mx.example.org.")
    z.add("mx.example.org", "A", "10.1.2.3", "192.168.4.5")
    assert sorted(h.address for h in hops(resolver(port), "example.org").hops) == [
        "10.1.2.3",
        "192.168.4.5",
    ]
    res = hops(resolver(port, {"allow_private": False}), "example.org")
    assert res.failure is not None and res.failure.code == 554
    assert "10.1.2.3 is private" in str(res.failure)
    assert "192.168.4.5 is private" in str(res.failure)


def test_a_route_to_loopback_given_by_the_operator_is_used(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("relay.test", "A", "127.0.0.1")
    r = resolver(port, {"allow_loopback": False})
    for host in ("relay.test", "127.0.0.1"):
        dest = route.Destination("k", None, Route(host, 2525), TlsPolicy.OFF)
        res = asyncio.run(r.hops(dest))
        assert [(h.address, h.port) for h in res.hops] == [("127.0.0.1", 2525)], host


def test_many_mx_records_cost_a_bounded_number_of_queries(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", *[f"{i} mx{i}.example.org." for i in range(1, 1501)])
    for i in range(1, 1501):
        z.add(f"mx{i}.example.org", "A", f"127.0.{i // 250}.{i % 250 + 1}")
    # a 1,500-record answer takes the test server a while to build on a busy machine
    r = resolver(port, {"timeout": 10.0, "lifetime": 20.0})
    res = hops(r, "example.org")
    assert [h.host for h in res.hops] == [f"mx{i}.example.org" for i in range(1, 6)], res
    # the resolver library may resend a slow UDP query: count the questions asked
    asked = {(name, rdtype) for _, name, rdtype in z.queries}
    assert len(asked) <= 1 + 2 * 10, len(asked)
    assert ("mx11.example.org", "A") not in asked


def test_the_query_budget_ends_a_look_up(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.add("example.org", "MX", *[f"{i} mx{i}.example.org." for i in range(1, 11)])
    for i in range(1, 11):
        z.behaviour[f"mx{i}.example.org"] = SERVFAIL
    res = hops(resolver(port, {"max_queries": 7}), "example.org")
    assert res.failure is not None and res.failure.code == 451
    assert len({(name, rdtype) for _, name, rdtype in z.queries}) <= 7


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_68_year_ttl_is_capped(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.ttl = 2**31 - 1
    z.add("example.org", "MX", "10 mx.example.org.")
    z.add("mx.example.org", "A", "127.0.0.2")
    clock = Clock()
    r = resolver(port, {"max_ttl": 3600.0}, clock=clock)
    hops(r, "example.org")
    sent = len(z.queries)
    clock.now += 3599
    hops(r, "example.org")
    assert len(z.queries) == sent
    clock.now += 2
    hops(r, "example.org")
    assert len(z.queries) > sent


def test_the_cache_is_bounded_and_forgets_expired_answers(zone: tuple[Zone, int]) -> None:
    z, port = zone
    z.ttl = 60
    for i in range(6):
        z.add(f"d{i}.example", "A", f"127.0.0.{i + 2}")
    clock = Clock()
    r = resolver(port, {"cache_size": 3}, clock=clock)
    for i in range(3):
        hops(r, f"d{i}.example")
    assert r.cached() == ["d0.example", "d1.example", "d2.example"]
    hops(r, "d3.example")
    assert len(r.cached()) == 3 and "d3.example" in r.cached()
    clock.now += 61
    hops(r, "d4.example")
    assert r.cached() == ["d4.example"]

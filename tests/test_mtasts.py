"""MTA-STS (RFC 8461), ``delivery.mta_sts``: the policy found through the ``_mta-sts`` TXT
record, fetched over HTTPS from ``mta-sts.DOMAIN`` (a real HTTPS server on its own loopback
address, port 443), enforced on the MX hosts and their certificates, cached for max_age."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mtasts import PolicyError, mx_matches, parse_policy, parse_txt
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.config import Config
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.spool import envfile
from tests import dnsserver
from tests.helpers import draft, make_config, write_envelope
from tests.hostile import needs_root
from tests.smtpservers import SmtpServer
from tests.tlspeers import PolicyServer, ca_file, https_policy_server, leaf_der

DOMAIN = "example.test"
MX = "mx.example.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"


def policy(mode: str, *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class Site:
    """A recipient domain with an MX host, an MTA-STS TXT record and policy server."""

    zone: dnsserver.Zone
    smtp: SmtpServer
    policy: PolicyServer
    cfg: Config


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def site(stack: ExitStack, tmp_path: Path, ca: trustme.CA, cert_name: str = MX) -> Site:
    ctx, _ = leaf_der(ca, cert_name)
    smtp = SmtpServer(tls_context=ctx)
    stack.callback(smtp.stop)
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    served = stack.enter_context(https_policy_server(ca, POLICY_HOST, address, PolicyServer()))
    zone = dnsserver.Zone()
    zone.add(DOMAIN, "MX", f"10 {MX}.")
    zone.add(MX, "A", "127.0.0.1")
    zone.add(POLICY_HOST, "A", address)
    zone.add(f"_mta-sts.{DOMAIN}", "TXT", '"v=STSv1; id=20261201;"')
    dns_port = stack.enter_context(dnsserver.serve(zone))
    cfg = make_config(
        delivery={
            "port": smtp.port,
            "tls_ca_file": str(ca_file(ca, tmp_path)),
            "mta_sts": {"enabled": True, "timeout": "5s"},
        },
        dns={"nameservers": ["127.0.0.1"], "port": dns_port, "allow_loopback": True},
    )
    return Site(zone, smtp, served, cfg)


def deliver(tmp_path: Path, cfg: Config, times: int = 1) -> list[RecipientResult]:
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@batch.test", [f"a@{DOMAIN}"])])
    env = envfile.read(path, cfg.limits, cfg.helo_name)

    async def run() -> list[RecipientResult]:
        deliverer = Deliverer(cfg, MxResolver(cfg.dns, port=cfg.delivery.port), warn=warned.append)
        out = []
        try:
            for _ in range(times):
                tx = env.transactions[0]
                out += await deliverer.deliver(path, tx, "E", datetime.now(UTC))
                await deliverer.close_all()
        finally:
            await deliverer.close_all()
        return out

    warned: list[str] = []
    results = asyncio.run(run())
    for line in warned:
        logging.getLogger("spoolsmtp").warning("%s", line)
    return results


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@needs_root
def test_enforce_delivers_over_verified_tls_and_fetches_once(
    tmp_path: Path, ca: trustme.CA, stack: ExitStack
) -> None:
    s = site(stack, tmp_path, ca)
    s.policy.body = policy("enforce", MX)
    results = deliver(tmp_path, s.cfg, times=2)
    assert [r.status for r in results] == [Status.DELIVERED, Status.DELIVERED]
    assert [m.tls for m in s.smtp.messages] == [True, True]
    assert s.policy.requests == ["/.well-known/mta-sts.txt"]


@needs_root
def test_enforce_refuses_a_certificate_for_another_name(
    tmp_path: Path, ca: trustme.CA, stack: ExitStack
) -> None:
    s = site(stack, tmp_path, ca, cert_name="not-the-mx.test")
    s.policy.body = policy("enforce", MX)
    (result,) = deliver(tmp_path, s.cfg)
    assert (result.status, result.reply.enhanced) == (Status.DEFERRED, "4.7.5")
    assert s.smtp.messages == []


@needs_root
def test_enforce_never_connects_to_an_mx_the_policy_does_not_list(
    tmp_path: Path, ca: trustme.CA, stack: ExitStack
) -> None:
    s = site(stack, tmp_path, ca)
    s.policy.body = policy("enforce", "*.elsewhere.test")
    (result,) = deliver(tmp_path, s.cfg)
    assert (result.status, result.reply.enhanced) == (Status.DEFERRED, "4.7.5")
    assert "not an MX host" in result.reply.text
    assert s.smtp.connections == 0


@needs_root
def test_testing_mode_delivers_and_says_so_once(
    tmp_path: Path, ca: trustme.CA, stack: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    s = site(stack, tmp_path, ca, cert_name="not-the-mx.test")
    s.policy.body = policy("testing", "*.elsewhere.test")
    results = deliver(tmp_path, s.cfg, times=2)
    assert [r.status for r in results] == [Status.DELIVERED, Status.DELIVERED]
    said = [r.getMessage() for r in caplog.records if "MTA-STS" in r.getMessage()]
    assert len(said) == 1 and MX in said[0] and "testing" in said[0]


@needs_root
def test_a_new_txt_id_fetches_the_policy_again(
    tmp_path: Path, ca: trustme.CA, stack: ExitStack
) -> None:
    s = site(stack, tmp_path, ca)
    s.policy.body = policy("enforce", MX)
    (first,) = deliver(tmp_path, s.cfg)
    assert first.status is Status.DELIVERED
    # a new Deliverer has an empty cache; within one, only a new id fetches again
    s.policy.requests.clear()
    s.zone.records[(f"_mta-sts.{DOMAIN}", "TXT")] = ['"v=STSv1; id=2;"']
    deliver(tmp_path, s.cfg, times=3)
    assert len(s.policy.requests) == 1


@needs_root
def test_no_txt_record_means_no_policy_and_no_fetch(
    tmp_path: Path, ca: trustme.CA, stack: ExitStack
) -> None:
    s = site(stack, tmp_path, ca)
    s.policy.body = policy("enforce", "*.elsewhere.test")
    del s.zone.records[(f"_mta-sts.{DOMAIN}", "TXT")]
    (result,) = deliver(tmp_path, s.cfg)
    assert result.status is Status.DELIVERED
    assert s.policy.requests == []


@needs_root
def test_a_policy_that_cannot_be_had_is_said_once_and_delivery_goes_on(
    tmp_path: Path, ca: trustme.CA, stack: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    s = site(stack, tmp_path, ca)
    s.policy.body = b"<html>not a policy</html>"
    s.policy.content_type = "text/html"
    results = deliver(tmp_path, s.cfg, times=2)
    assert [r.status for r in results] == [Status.DELIVERED, Status.DELIVERED]
    said = [r.getMessage() for r in caplog.records if "MTA-STS" in r.getMessage()]
    assert len(said) == 1 and "text/html" in said[0] and DOMAIN in said[0]


def test_policy_text_rules() -> None:
    p = parse_policy(policy("enforce", "mx1.example.test", "*.example.net", max_age=10**9).decode())
    assert (p.mode, p.patterns, p.max_age) == (
        "enforce",
        ("mx1.example.test", "*.example.net"),
        31_557_600,
    )
    assert p.allows("MX1.example.test.") and p.allows("a.example.net")
    assert not p.allows("a.b.example.net") and not p.allows("example.net")
    for bad in (
        b"version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
        b"version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmax_age: 1\n",
        b"version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n",
        b"version: STSv1\ngarbage\n",
    ):
        with pytest.raises(PolicyError):
            parse_policy(bad.decode())
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 5\n").mode == "none"


def test_txt_record_rules() -> None:
    assert parse_txt(('"v=STSv1; id=abc123;"',)) == "abc123"
    assert parse_txt(('"v=STSv1; " "id=x1"',)) == "x1"
    assert parse_txt(('"v=spf1 -all"',)) is None
    with pytest.raises(PolicyError):
        parse_txt(('"v=STSv1; id=1;"', '"v=STSv1; id=2;"'))
    with pytest.raises(PolicyError):
        parse_txt(('"v=STSv1;"',))
    assert mx_matches("mx.example.test", "*.example.test")
    assert not mx_matches("example.test", "*.example.test")


def sts_asked(zone: dnsserver.Zone) -> int:
    return sum(1 for _, n, t in list(zone.queries) if (n, t) == (f"_mta-sts.{DOMAIN}", "TXT"))


@needs_root
def test_the_txt_record_is_asked_once_for_its_ttl_not_per_message(
    tmp_path: Path, ca: trustme.CA, stack: ExitStack
) -> None:
    s = site(stack, tmp_path, ca)
    s.policy.body = policy("enforce", MX)
    results = deliver(tmp_path, s.cfg, times=3)
    assert [r.status for r in results] == [Status.DELIVERED] * 3
    assert sts_asked(s.zone) == 1
    assert len(s.policy.requests) == 1


def test_a_domain_without_the_txt_record_is_asked_once_not_per_message(tmp_path: Path) -> None:
    """The negative answer is kept too (no SOA here: for 60 s)."""
    srv = SmtpServer()
    zone = dnsserver.Zone()
    zone.add(DOMAIN, "MX", f"10 {MX}.")
    zone.add(MX, "A", "127.0.0.1")
    try:
        with dnsserver.serve(zone) as dns_port:
            cfg = make_config(
                delivery={"port": srv.port, "mta_sts": {"enabled": True}},
                dns={"nameservers": ["127.0.0.1"], "port": dns_port, "allow_loopback": True},
            )
            results = deliver(tmp_path, cfg, times=3)
    finally:
        srv.stop()
    assert [r.status for r in results] == [Status.DELIVERED] * 3
    assert sts_asked(zone) == 1

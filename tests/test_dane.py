"""DANE (RFC 7672), ``tls: dane``: TLSA records looked up only behind an authenticated MX
answer, usages 3 (DANE-EE) and 2 (DANE-TA), and the fallbacks the RFC gives. Against a real
STARTTLS server on loopback with certificates made for the test, and the loopback DNS server
standing in for a validating resolver (it sets AD for its signed names)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.delivery.tlsplan import parse_tlsa
from spoolsmtp.model import exitcodes
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.model.tlsdemand import Tlsa
from spoolsmtp.smtp import dane
from spoolsmtp.spool import envfile
from tests import dnsserver
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import SmtpServer
from tests.tlspeers import leaf_der, server_context, tlsa_2_0_1, tlsa_3_1_1
from tests.workerproc import WorkerProcess, wait_for

DOMAIN = "example.test"
MX = "mx.example.test"


def deliver(
    tmp_path: Path,
    zone: dnsserver.Zone,
    srv: SmtpServer,
    routes: dict[str, Any] | None = None,
    **delivery: Any,
) -> RecipientResult:
    with dnsserver.serve(zone) as dns_port:
        cfg = make_config(
            routes=routes or {},
            delivery={"tls": "dane", "port": srv.port, **delivery},
            dns={"nameservers": ["127.0.0.1"], "port": dns_port, "allow_loopback": True},
        )
        path = tmp_path / "e.bsmtp"
        write_envelope(path, [draft("o@batch.test", [f"a@{DOMAIN}"])])
        env = envfile.read(path, cfg.limits, cfg.helo_name)

        async def run() -> RecipientResult:
            deliverer = Deliverer(cfg, MxResolver(cfg.dns, port=srv.port))
            try:
                (result,) = await deliverer.deliver(
                    path, env.transactions[0], "E", datetime.now(UTC)
                )
            finally:
                await deliverer.close_all()
            return result

        return asyncio.run(run())


def zone_for(port: int, *tlsa: str, signed: bool = True) -> dnsserver.Zone:
    zone = dnsserver.Zone()
    zone.add(DOMAIN, "MX", f"10 {MX}.")
    zone.add(MX, "A", "127.0.0.1")
    if tlsa:
        zone.add(f"_{port}._tcp.{MX}", "TLSA", *tlsa)
    if signed:
        zone.signed.add(DOMAIN)
    return zone


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def test_dane_ee_match_delivers_over_tls(tmp_path: Path, ca: trustme.CA) -> None:
    ctx, der = leaf_der(ca, "anything-dane-ee-ignores-names.test")
    srv = SmtpServer(tls_context=ctx)
    try:
        result = deliver(tmp_path, zone_for(srv.port, tlsa_3_1_1(der)), srv)
    finally:
        srv.stop()
    assert result.status is Status.DELIVERED, result.reply
    assert [m.tls for m in srv.messages] == [True]


def test_dane_ee_mismatch_defers_and_sends_nothing(tmp_path: Path, ca: trustme.CA) -> None:
    ctx, _ = leaf_der(ca, MX)
    _, other = leaf_der(ca, MX)
    srv = SmtpServer(tls_context=ctx)
    try:
        result = deliver(tmp_path, zone_for(srv.port, tlsa_3_1_1(other)), srv)
    finally:
        srv.stop()
    assert (result.status, result.reply.enhanced) == (Status.DEFERRED, "4.7.5")
    assert "TLSA" in result.reply.text and "DANE" in result.reply.text
    assert b"MAIL FROM" not in srv.wire and srv.messages == []


def test_unsigned_zone_is_opportunistic_whatever_its_tlsa_says(
    tmp_path: Path, ca: trustme.CA
) -> None:
    ctx, _ = leaf_der(ca, MX)
    _, other = leaf_der(ca, MX)
    srv = SmtpServer(tls_context=ctx)
    try:
        result = deliver(tmp_path, zone_for(srv.port, tlsa_3_1_1(other), signed=False), srv)
    finally:
        srv.stop()
    assert result.status is Status.DELIVERED
    assert [m.tls for m in srv.messages] == [True]


def test_signed_zone_without_tlsa_delivers_in_plain_text_when_no_tls(tmp_path: Path) -> None:
    srv = SmtpServer()  # no STARTTLS at all
    try:
        result = deliver(tmp_path, zone_for(srv.port), srv)
    finally:
        srv.stop()
    assert result.status is Status.DELIVERED
    assert [m.tls for m in srv.messages] == [False]


def test_usable_tlsa_and_no_starttls_defers(tmp_path: Path, ca: trustme.CA) -> None:
    _, der = leaf_der(ca, MX)
    srv = SmtpServer()
    try:
        result = deliver(tmp_path, zone_for(srv.port, tlsa_3_1_1(der)), srv)
    finally:
        srv.stop()
    assert (result.status, result.reply.enhanced) == (Status.DEFERRED, "4.7.4")
    assert srv.messages == []


def test_failed_tlsa_lookup_defers_without_connecting(tmp_path: Path) -> None:
    srv = SmtpServer()
    zone = zone_for(srv.port)
    zone.add(f"_{srv.port}._tcp.{MX}", "TLSA", "3 1 1 " + "00" * 32)
    zone.behaviour[f"_{srv.port}._tcp.{MX}"] = dnsserver.SERVFAIL
    try:
        result = deliver(tmp_path, zone, srv)
    finally:
        srv.stop()
    assert (result.status, result.reply.enhanced) == (Status.DEFERRED, "4.7.5")
    assert "TLSA look-up" in result.reply.text
    assert srv.connections == 0


def test_only_unusable_tlsa_requires_tls_without_checking_it(
    tmp_path: Path, ca: trustme.CA
) -> None:
    ctx, _ = leaf_der(ca, MX)
    plain = SmtpServer()
    srv = SmtpServer(tls_context=ctx)
    try:
        refused = deliver(tmp_path, zone_for(plain.port, "1 1 1 " + "ab" * 32), plain)
        accepted = deliver(tmp_path, zone_for(srv.port, "1 1 1 " + "ab" * 32), srv)
    finally:
        plain.stop()
        srv.stop()
    assert (refused.status, refused.reply.enhanced) == (Status.DEFERRED, "4.7.4")
    assert accepted.status is Status.DELIVERED
    assert [m.tls for m in srv.messages] == [True]


def test_dane_ta_chain_to_the_named_anchor_delivers(tmp_path: Path, ca: trustme.CA) -> None:
    srv = SmtpServer(tls_context=server_context(ca, MX, with_anchor=True))
    try:
        result = deliver(tmp_path, zone_for(srv.port, tlsa_2_0_1(ca)), srv)
    finally:
        srv.stop()
    assert result.status is Status.DELIVERED, result.reply
    assert [m.tls for m in srv.messages] == [True]


def test_dane_ta_needs_the_mx_name_in_the_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    srv = SmtpServer(tls_context=server_context(ca, "elsewhere.test", with_anchor=True))
    try:
        result = deliver(tmp_path, zone_for(srv.port, tlsa_2_0_1(ca)), srv)
    finally:
        srv.stop()
    assert (result.status, result.reply.enhanced) == (Status.DEFERRED, "4.7.5")
    assert srv.messages == []


def test_tlsa_text_forms() -> None:
    assert parse_tlsa("3 1 1 ab CD") == Tlsa(3, 1, 1, bytes.fromhex("abcd"))
    assert parse_tlsa("3 1 1") is None
    assert parse_tlsa("3 x 1 ab") is None
    assert parse_tlsa("3 1 1 zz") is None
    assert Tlsa(3, 1, 1, b"").usable and not Tlsa(1, 1, 1, b"").usable
    assert not Tlsa(3, 2, 1, b"").usable and not Tlsa(3, 1, 3, b"").usable


def test_check_names_what_is_wrong(ca: trustme.CA) -> None:
    _, der = leaf_der(ca, MX)
    assert dane.check([], [Tlsa(3, 0, 0, der)], [MX]) == "the server sent no certificate"
    assert dane.check([der], [Tlsa(0, 0, 0, der)], [MX]) == "no usable TLSA record"
    assert dane.check([der], [Tlsa(3, 0, 0, der)], [MX]) is None
    assert dane.check([der], [Tlsa(3, 0, 0, der + b"x")], [MX]) is not None
    assert dane.available()


def test_a_route_with_tls_dane_checks_its_host_tlsa(tmp_path: Path, ca: trustme.CA) -> None:
    ctx, der = leaf_der(ca, MX)
    _, other = leaf_der(ca, MX)
    srv = SmtpServer(tls_context=ctx)
    try:
        for tlsa, status in ((tlsa_3_1_1(der), Status.DELIVERED), (tlsa_3_1_1(other), None)):
            zone = zone_for(srv.port, tlsa)
            zone.records.pop((DOMAIN, "MX"))
            route = {DOMAIN: {"host": MX, "port": srv.port, "tls": "dane"}}
            result = deliver(tmp_path, zone, srv, tls="opportunistic", routes=route)
            assert result.status is (status or Status.DEFERRED), result.reply
    finally:
        srv.stop()
    assert len(srv.messages) == 1


def test_tls_dane_without_cryptography_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(
        f"spool:\n  path: {tmp_path / 'spool'}\nroutes:\n  x.test: {{host: h, tls: dane}}\n"
    )
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from spoolsmtp.app.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(conf)!r}, '--check-config']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == exitcodes.CONFIG
    assert "routes.x.test.tls" in done.stderr and "spoolsmtp[dane]" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_reload_of_the_dns_settings_reaches_the_tlsa_lookups(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """RELOAD with other nameservers: the TLSA records come from the new ones too (found by
    review: the TLS planner kept the resolver it was built with)."""
    ctx, der = leaf_der(ca, MX)
    _, other = leaf_der(ca, MX)
    srv = SmtpServer(tls_context=ctx)
    matching = zone_for(srv.port, tlsa_3_1_1(der))
    mismatching = zone_for(srv.port, tlsa_3_1_1(other))
    with dnsserver.serve(matching) as first, dnsserver.serve(mismatching) as second:
        dns = {"nameservers": ["127.0.0.1"], "port": first, "allow_loopback": True}
        w = WorkerProcess(
            tmp_path, {"delivery": {"tls": "dane", "port": srv.port}, "dns": dns}
        ).start()
        try:
            w.drop_drafts("a.bsmtp", [draft("o@batch.test", [f"a@{DOMAIN}"])])
            assert wait_for(lambda: w.final("a.bsmtp"))["state"] == "done"
            data = yaml.safe_load(w.config.read_text())
            data["dns"]["port"] = second
            w.config.write_text(yaml.safe_dump(data))
            assert w.ask("RELOAD")["status"] == 200
            w.drop_drafts("b.bsmtp", [draft("o@batch.test", [f"b@{DOMAIN}"])])
            rec = wait_for(lambda: w.in_state("b.bsmtp", "deferred"), what="b deferred")
        finally:
            assert w.stop() == 0
            srv.stop()
    reply = rec["transactions"][0]["recipients"][0]["reply"]
    assert reply["enhanced"] == "4.7.5" and "DANE" in reply["text"]
    assert len(srv.messages) == 1


def test_a_queue_to_a_dane_domain_asks_for_the_tlsa_records_once_until_expire(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """Five envelopes to a DANE domain, taken together: one TLSA query for its MX host, not one
    per envelope (the answer is kept for its TTL, and deliveries starting together share the
    look-up); STATS counts them; EXPIRE of the domain forgets it, so the next envelope asks."""
    ctx, der = leaf_der(ca, MX)
    srv = SmtpServer(tls_context=ctx)
    zone = zone_for(srv.port, tlsa_3_1_1(der))
    tlsa = (f"_{srv.port}._tcp.{MX}", "TLSA")

    def asked() -> int:
        return sum(1 for _, name, rdtype in list(zone.queries) if (name, rdtype) == tlsa)

    with dnsserver.serve(zone) as dns_port:
        dns = {"nameservers": ["127.0.0.1"], "port": dns_port, "allow_loopback": True}
        w = WorkerProcess(
            tmp_path, {"delivery": {"tls": "dane", "port": srv.port}, "dns": dns}
        ).start()
        try:
            names = [f"e{i}.bsmtp" for i in range(5)]
            for i, name in enumerate(names):
                w.drop_drafts(name, [draft("o@batch.test", [f"r{i}@{DOMAIN}"])])
            for name in names:
                assert wait_for(partial(w.final, name), what=name)["state"] == "done"
            assert asked() == 1
            stats = w.ask("STATS")["result"]
            assert stats["dns_lookups"] == 10 and stats["dns_cache_hits"] == 8, stats
            assert w.ask(f"EXPIRE {DOMAIN}")["result"] == {"forgotten": True}
            w.drop_drafts("f.bsmtp", [draft("o@batch.test", [f"f@{DOMAIN}"])])
            assert wait_for(lambda: w.final("f.bsmtp"))["state"] == "done"
            assert asked() == 2
        finally:
            assert w.stop() == 0
            srv.stop()
    assert len(srv.messages) == 6 and all(m.tls for m in srv.messages)

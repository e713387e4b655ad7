"""Route and smarthost hosts named in the system's host table (/etc/hosts), and the port of a
route that names none: real deliveries to a loopback sink, with a loopback DNS server that
knows none of the names (so only the system resolver can find them)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.delivery import route
from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model import config
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.spool import envfile
from tests.dnsserver import Zone, serve
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import SmtpServer

NOW = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)


@pytest.fixture
def empty_dns() -> Iterator[tuple[Zone, int]]:
    zone = Zone()
    with serve(zone) as port:
        yield zone, port


@pytest.fixture
def sink() -> Iterator[SmtpServer]:
    srv = SmtpServer()
    yield srv
    srv.stop()


def _deliver(tmp_path: Path, dns_port: int, **sections: Any) -> RecipientResult:
    sections.setdefault("dns", {})
    sections["dns"].update({"nameservers": ["127.0.0.1"], "port": dns_port})
    cfg = make_config(**sections)
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"])])
    env = envfile.read(path, cfg.limits, cfg.helo_name)

    async def run() -> RecipientResult:
        resolver = MxResolver(cfg.dns, cfg.delivery.max_addresses, cfg.delivery.port)
        deliverer = Deliverer(cfg, resolver)
        try:
            (res,) = await deliverer.deliver(path, env.transactions[0], "E", NOW)
        finally:
            await deliverer.close_all()
        return res

    return asyncio.run(run())


def test_a_smarthost_named_localhost_is_found_in_the_host_table(
    tmp_path: Path, empty_dns: tuple[Zone, int], sink: SmtpServer
) -> None:
    zone, port = empty_dns
    res = _deliver(tmp_path, port, smarthost=f"localhost:{sink.port}")
    assert res.status is Status.DELIVERED, res.reply
    assert [m.rcpt_tos for m in sink.messages] == [["a@example.org"]]
    # DNS was asked first (it is the configured resolver) and knew nothing
    assert ("udp", "localhost", "A") in zone.queries


def test_a_route_without_a_port_uses_delivery_port(
    tmp_path: Path, empty_dns: tuple[Zone, int], sink: SmtpServer
) -> None:
    _, port = empty_dns
    res = _deliver(
        tmp_path,
        port,
        routes={"example.org": "localhost", "example.net": {"host": "127.0.0.1"}},
        delivery={"port": sink.port},
    )
    assert res.status is Status.DELIVERED, res.reply
    assert len(sink.messages) == 1


def test_route_ports_default_to_delivery_port_in_the_destination() -> None:
    cfg = config.parse(
        "delivery: {port: 587}\nroutes:\n  a.example: relay.example\n"
        "  b.example: {host: relay.example}\n  c.example: '[::1]'\n  d.example: relay:26\n"
    )
    assert cfg.routes["a.example"] == config.Route("relay.example", None)
    keys = [route.destination_for(d, cfg).key for d in ("a.example", "b.example", "c.example")]
    assert keys == ["[relay.example]:587", "[relay.example]:587", "[::1]:587"]
    assert route.destination_for("d.example", cfg).key == "[relay]:26"


def test_an_mx_host_is_never_looked_up_in_the_host_table(
    tmp_path: Path, empty_dns: tuple[Zone, int], sink: SmtpServer
) -> None:
    """Only routes and the smarthost (the operator's names) go to the system resolver: an MX
    record naming ``localhost`` still finds no address, so the loopback check keeps its
    meaning."""
    zone, port = empty_dns
    zone.add("example.org", "MX", "10 localhost.")
    res = _deliver(tmp_path, port, delivery={"port": sink.port})
    assert res.status is not Status.DELIVERED
    assert sink.messages == []


def test_the_host_table_answers_when_dns_does_not_answer_at_all(
    tmp_path: Path, empty_dns: tuple[Zone, int], sink: SmtpServer
) -> None:
    from tests.dnsserver import SILENT

    zone, port = empty_dns
    zone.behaviour["localhost"] = SILENT
    res = _deliver(
        tmp_path,
        port,
        smarthost=f"localhost:{sink.port}",
        dns={"timeout": "200ms", "lifetime": "500ms"},
    )
    assert res.status is Status.DELIVERED, res.reply
    assert len(sink.messages) == 1

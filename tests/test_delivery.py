"""Delivery against real SMTP servers on loopback (aiosmtpd, scripted per address)."""

from __future__ import annotations

import asyncio
import errno
import gc
import ssl
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import trustme

from spoolsmtp.delivery.deliverer import Deliverer, PartlyDelivered, date_text
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.config import Config
from spoolsmtp.model.envelope import MailParams, Recipient
from spoolsmtp.model.outcome import RecipientResult, Status
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import Script, SmtpServer

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.fixture
def server() -> Iterator[SmtpServer]:
    srv = SmtpServer()
    yield srv
    srv.stop()


def routed(srv: SmtpServer, **delivery: Any) -> Config:
    return make_config(
        routes={"example.org": f"{srv.host}:{srv.port}", "example.net": f"{srv.host}:{srv.port}"},
        delivery=delivery,
    )


def deliver(
    cfg: Config, path: Path, number: int = 1, *, repeat: int = 1
) -> tuple[list[RecipientResult], Deliverer, list[str]]:
    """Deliver transaction ``number`` of the envelope ``repeat`` times on one Deliverer."""
    from spoolsmtp.spool import envfile

    env = envfile.read(path, cfg.limits, cfg.helo_name)
    tx = env.transactions[number - 1]
    trace: list[str] = []

    async def run() -> tuple[list[RecipientResult], Deliverer]:
        resolver = MxResolver(cfg.dns, cfg.delivery.max_addresses, cfg.delivery.port)
        deliverer = Deliverer(cfg, resolver, trace=trace.append)
        results: list[RecipientResult] = []
        try:
            for _ in range(repeat):
                results = await deliverer.deliver(path, tx, "ENV1", NOW)
        finally:
            await deliverer.close_all()
        return results, deliverer

    results, deliverer = asyncio.run(run())
    return results, deliverer, trace


def by_address(results: list[RecipientResult]) -> dict[str, RecipientResult]:
    return {r.recipient.address: r for r in results}


def test_delivers_message_with_one_received_header(tmp_path: Path, server: SmtpServer) -> None:
    path = tmp_path / "e.bsmtp"
    message = b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"
    write_envelope(path, [draft("oper@example.com", ["alice@example.org"], message)])
    results, _, _ = deliver(routed(server), path)
    (res,) = results
    assert res.status is Status.DELIVERED
    assert (res.reply.code, res.reply.enhanced) == (250, "2.0.0")
    assert res.host == server.host
    (got,) = server.messages
    assert got.mail_from == "oper@example.com"
    assert got.rcpt_tos == ["alice@example.org"]
    assert got.content.startswith(b"Received: from batch.test by spoolsmtp.test (spoolsmtp)")
    assert got.content.endswith(message)
    assert got.content.count(b"Received:") == 1
    assert b"id ENV1.1" in got.content and b"for <alice@example.org>" in got.content


def test_the_received_date_is_format_datetimes_in_every_zone() -> None:
    """The date is formatted once per second and kept: equal instants in other zones, and a
    naive time, still read as ``format_datetime`` writes them, whatever was asked first."""
    later = NOW.replace(microsecond=999_999)
    east = NOW.astimezone(timezone(timedelta(hours=1)))
    naive = NOW.replace(tzinfo=None)
    for when in (NOW, later, east, naive, NOW + timedelta(seconds=1), east, NOW):
        assert date_text(when) == format_datetime(when)


def test_a_message_larger_than_one_write_arrives_whole(tmp_path: Path, server: SmtpServer) -> None:
    """The text goes out in writes of 64 KB and the last piece with the final dot: nothing
    lost or doubled at the seams, and leading dots (on either side of a seam) stuffed."""
    lines = [
        b".%06d dotted line near a seam or not" % i if i % 7 == 0 else b"x" * 70
        for i in range(6000)
    ]
    message = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    assert len(message) > 5 * 64 * 1024
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("oper@example.com", ["alice@example.org"], message)])
    results, _, _ = deliver(routed(server), path)
    assert [r.status for r in results] == [Status.DELIVERED]
    (got,) = server.messages
    assert got.content.endswith(message)
    assert got.content.count(b"Received:") == 1


def test_each_recipient_gets_its_own_reply(tmp_path: Path) -> None:
    srv = SmtpServer(
        Script(
            rcpt={
                "bad@example.org": "550 5.1.1 no such user",
                "busy@example.org": "450 4.2.1 try later",
            }
        )
    )
    try:
        path = tmp_path / "e.bsmtp"
        write_envelope(
            path,
            [draft("o@example.com", ["ok@example.org", "bad@example.org", "busy@example.org"])],
        )
        results, _, _ = deliver(routed(srv), path)
    finally:
        srv.stop()
    got = by_address(results)
    assert got["ok@example.org"].status is Status.DELIVERED
    assert got["bad@example.org"].status is Status.FAILED
    assert got["bad@example.org"].reply.enhanced == "5.1.1"
    assert got["bad@example.org"].reply.text == "no such user"
    assert got["busy@example.org"].status is Status.DEFERRED
    assert got["busy@example.org"].reply.code == 450
    assert [m.rcpt_tos for m in srv.messages] == [["ok@example.org"]]


@pytest.mark.parametrize("pipelining", [True, False])
def test_pipelined_replies_are_attributed_to_the_right_recipient(
    tmp_path: Path, pipelining: bool
) -> None:
    srv = SmtpServer(
        Script(rcpt={"r2@example.org": "550 5.1.1 unknown r2"}, ehlo_extra=["PIPELINING"])
    )
    try:
        path = tmp_path / "e.bsmtp"
        rcpts = [f"r{i}@example.org" for i in range(1, 5)]
        write_envelope(path, [draft("o@example.com", rcpts)])
        results, _, _ = deliver(routed(srv, pipelining=pipelining), path)
    finally:
        srv.stop()
    got = by_address(results)
    assert [got[r].status for r in rcpts] == [
        Status.DELIVERED,
        Status.FAILED,
        Status.DELIVERED,
        Status.DELIVERED,
    ]
    assert got["r2@example.org"].reply.text == "unknown r2"
    flights = [chunk for chunk in srv.raw if b"MAIL FROM" in chunk]
    assert len(flights) == 1
    together = b"RCPT TO:<r4@example.org>" in flights[0] and b"DATA" in flights[0]
    assert together is pipelining
    assert b"\r\n.\r\n" not in flights[0]


def test_452_sends_the_rest_in_a_new_transaction(tmp_path: Path) -> None:
    srv = SmtpServer(Script(max_rcpts=2))
    try:
        path = tmp_path / "e.bsmtp"
        rcpts = [f"r{i}@example.org" for i in range(1, 6)]
        write_envelope(path, [draft("o@example.com", rcpts)])
        results, _, _ = deliver(routed(srv), path)
    finally:
        srv.stop()
    assert all(r.status is Status.DELIVERED for r in results)
    assert [m.rcpt_tos for m in srv.messages] == [rcpts[0:2], rcpts[2:4], rcpts[4:5]]
    assert srv.connections == 1


def test_421_mid_session_defers_everyone_not_yet_final(tmp_path: Path) -> None:
    srv = SmtpServer(
        Script(rcpt={"bad@example.org": "550 5.1.1 no", "r3@example.org": "421 4.3.2 going down"})
    )
    try:
        path = tmp_path / "e.bsmtp"
        write_envelope(
            path,
            [
                draft(
                    "o@example.com",
                    ["r1@example.org", "bad@example.org", "r3@example.org", "r4@example.org"],
                )
            ],
        )
        results, _, _ = deliver(routed(srv), path)
    finally:
        srv.stop()
    got = by_address(results)
    assert got["bad@example.org"].status is Status.FAILED
    for r in ("r1@example.org", "r3@example.org", "r4@example.org"):
        assert got[r].status is Status.DEFERRED
        assert got[r].reply.code == 421
    assert srv.messages == []


@pytest.mark.parametrize(
    ("script", "status", "code"),
    [
        (Script(mail="553 5.7.1 sender refused"), Status.FAILED, 553),
        (Script(mail="451 4.3.0 sender check failed"), Status.DEFERRED, 451),
        (Script(data="554 5.7.1 message refused"), Status.FAILED, 554),
        (Script(data="452 4.3.1 disk full"), Status.DEFERRED, 452),
    ],
)
def test_mail_and_final_dot_replies_apply_to_all(
    tmp_path: Path, script: Script, status: Status, code: int
) -> None:
    srv = SmtpServer(script)
    try:
        path = tmp_path / "e.bsmtp"
        write_envelope(path, [draft("o@example.com", ["a@example.org", "b@example.net"])])
        results, _, _ = deliver(routed(srv), path)
    finally:
        srv.stop()
    assert [(r.status, r.reply.code) for r in results] == [(status, code)] * 2


def test_size_over_the_servers_limit_fails_without_sending(tmp_path: Path) -> None:
    srv = SmtpServer(size_limit=500)
    try:
        path = tmp_path / "e.bsmtp"
        write_envelope(
            path,
            [draft("o@example.com", ["a@example.org"], b"x" * 70 + b"\r\n" * 1 + b"y\r\n" * 200)],
        )
        results, _, _ = deliver(routed(srv), path)
    finally:
        srv.stop()
    (res,) = results
    assert (res.status, res.reply.code, res.reply.enhanced) == (Status.FAILED, 552, "5.3.4")
    # decided here, not said by the server: no host, and the text names whose limit it was
    assert res.local and res.host is None and f"127.0.0.1]:{srv.port}" in res.reply.text
    assert b"MAIL FROM" not in srv.wire


def test_size_is_declared_when_offered(tmp_path: Path, server: SmtpServer) -> None:
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"])])
    deliver(routed(server), path)
    (got,) = server.messages
    assert any(o.startswith("SIZE=") and int(o[5:]) == len(got.content) for o in got.mail_options)


def test_eight_bit_needs_8bitmime(tmp_path: Path) -> None:
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"], "caf\u00e9\r\n".encode())])
    plain = SmtpServer(decode_data=True)
    eight = SmtpServer()
    try:
        results, _, _ = deliver(routed(plain), path)
        assert (results[0].status, results[0].reply.enhanced) == (Status.FAILED, "5.6.3")
        assert results[0].local and results[0].host is None
        assert b"MAIL FROM" not in plain.wire
        results, _, _ = deliver(routed(eight), path)
        assert results[0].status is Status.DELIVERED
        assert "BODY=8BITMIME" in eight.messages[0].mail_options
    finally:
        plain.stop()
        eight.stop()


def test_utf8_addresses_need_smtputf8(tmp_path: Path) -> None:
    path = tmp_path / "e.bsmtp"
    write_envelope(
        path,
        [draft("o@example.com", ["j\u00f6rg@example.org"], params=MailParams(smtputf8=True))],
    )
    without = SmtpServer(smtputf8=False)
    with_it = SmtpServer()
    try:
        results, _, _ = deliver(routed(without), path)
        assert (results[0].status, results[0].reply.enhanced) == (Status.FAILED, "5.6.7")
        assert results[0].local and results[0].host is None
        results, _, _ = deliver(routed(with_it), path)
        assert results[0].status is Status.DELIVERED
        assert with_it.messages[0].rcpt_tos == ["j\u00f6rg@example.org"]
        assert "SMTPUTF8" in with_it.messages[0].mail_options
    finally:
        without.stop()
        with_it.stop()


def test_connection_is_reused_for_the_next_envelope(tmp_path: Path, server: SmtpServer) -> None:
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"])])
    results, deliverer, _ = deliver(routed(server), path, repeat=3)
    assert results[0].status is Status.DELIVERED
    assert len(server.messages) == 3
    assert server.connections == 1
    assert deliverer.stats.reused == 2


def test_no_reuse_when_switched_off(tmp_path: Path, server: SmtpServer) -> None:
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"])])
    deliver(routed(server, reuse_connections=False), path, repeat=3)
    assert len(server.messages) == 3
    assert server.connections == 3


def test_max_hops_is_a_loop(tmp_path: Path, server: SmtpServer) -> None:
    path = tmp_path / "e.bsmtp"
    message = b"".join(b"Received: from h%d by h\r\n" % i for i in range(100)) + b"\r\nbody\r\n"
    write_envelope(path, [draft("o@example.com", ["a@example.org"], message)])
    results, _, _ = deliver(routed(server), path)
    assert (results[0].status, results[0].reply.code, results[0].reply.enhanced) == (
        Status.FAILED,
        554,
        "5.4.6",
    )
    assert server.connections == 0


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(ca: trustme.CA, name: str = "mx.test", **kw: Any) -> SmtpServer:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return SmtpServer(tls_context=ctx, **kw)


def test_starttls_opportunistic(tmp_path: Path, ca: trustme.CA) -> None:
    srv = tls_server(ca)
    try:
        path = tmp_path / "e.bsmtp"
        write_envelope(path, [draft("o@example.com", ["a@example.org"])])
        results, deliverer, _ = deliver(routed(srv), path)
    finally:
        srv.stop()
    assert results[0].status is Status.DELIVERED
    assert srv.messages[0].tls
    assert deliverer.stats.tls == 1


def test_tls_required_never_sends_in_plain_text(tmp_path: Path, server: SmtpServer) -> None:
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"])])
    results, _, _ = deliver(routed(server, tls="required"), path)
    assert (results[0].status, results[0].reply.enhanced) == (Status.DEFERRED, "4.7.4")
    assert b"MAIL FROM" not in server.wire


def test_tls_off_does_not_start_tls(tmp_path: Path, ca: trustme.CA) -> None:
    srv = tls_server(ca)
    try:
        path = tmp_path / "e.bsmtp"
        write_envelope(path, [draft("o@example.com", ["a@example.org"])])
        results, _, _ = deliver(routed(srv, tls="off"), path)
    finally:
        srv.stop()
    assert results[0].status is Status.DELIVERED
    assert not srv.messages[0].tls


@pytest.mark.parametrize(("cert_name", "ok"), [("mx.test", True), ("other.test", False)])
def test_tls_verify_checks_chain_and_host_name(
    tmp_path: Path, ca: trustme.CA, cert_name: str, ok: bool
) -> None:
    srv = tls_server(ca, cert_name)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    try:
        path = tmp_path / "e.bsmtp"
        write_envelope(path, [draft("o@example.com", ["a@example.org"])])
        cfg = make_config(
            routes={"example.org": {"host": "mx.test", "port": srv.port, "tls": "verify"}},
            delivery={"tls_ca_file": str(cafile)},
            dns={"nameservers": ["127.0.0.1"], "port": DNS_PORT_FOR_TLS[0]},
        )
        results, _, _ = deliver(cfg, path)
    finally:
        srv.stop()
    assert (results[0].status is Status.DELIVERED) is ok, results[0].reply
    if not ok:
        assert results[0].reply.enhanced == "4.7.5"
        assert srv.messages == []


DNS_PORT_FOR_TLS = [0]


@pytest.fixture(autouse=True, scope="module")
def _mx_test_name() -> Iterator[None]:
    """A DNS server that knows mx.test, for the verify tests (routes name hosts, not IPs)."""
    from tests.dnsserver import Zone, serve

    zone = Zone()
    zone.add("mx.test", "A", "127.0.0.1")
    with serve(zone) as port:
        DNS_PORT_FOR_TLS[0] = port
        yield


def test_tls_sessions_are_closed_completely(tmp_path: Path, ca: trustme.CA) -> None:
    """Closing a TLS connection waits for its shutdown, so no socket outlives the delivery
    (a short-lived loop, as in `spoolsmtp deliver`, must not leak the underlying socket)."""
    srv = tls_server(ca)
    try:
        path = tmp_path / "e.bsmtp"
        write_envelope(path, [draft("o@example.com", ["a@example.org"])])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                results, _, _ = deliver(routed(srv), path)
                assert results[0].status is Status.DELIVERED
            gc.collect()
    finally:
        srv.stop()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


class _FailingMark:
    """A dot mark that cannot be made durable (the journal's disk full) when ``fails``."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails

    async def ready(self, accepted: list[Recipient]) -> None:
        if self.fails:
            raise OSError(errno.ENOSPC, "No space left on device", "journal/00000001.log")

    def withdraw(self) -> None:
        pass


def _journal_full_for_example_org(recipients: list[Recipient]) -> _FailingMark:
    return _FailingMark(any(r.domain == "example.org" for r in recipients))


def test_one_destination_failing_leaves_no_other_delivery_running(tmp_path: Path) -> None:
    """A transaction for two destinations: one delivery fails at its dot (the journal full),
    the other's server is slow to take the message. ``deliver`` raises only once the other
    has ended (the caller then puts the envelope back with what the journal knows, and a
    delivery still running could send its dot after that, to be sent again unflagged), and
    its error carries what the other did, for the caller to journal first."""
    failing = SmtpServer()
    slow = SmtpServer(Script(data_delay=0.5))
    try:
        cfg = make_config(
            routes={
                "example.org": f"{failing.host}:{failing.port}",
                "example.net": f"{slow.host}:{slow.port}",
            }
        )
        path = tmp_path / "e.bsmtp"
        env = write_envelope(path, [draft("o@example.com", ["a@example.org", "b@example.net"])])

        async def run() -> tuple[list[list[str]], list[asyncio.Task[Any]], PartlyDelivered]:
            d = Deliverer(cfg, MxResolver(cfg.dns, cfg.delivery.max_addresses, cfg.delivery.port))
            try:
                with pytest.raises(PartlyDelivered) as raised:
                    await d.deliver(
                        path,
                        env.transactions[0],
                        "ENV1",
                        NOW,
                        before_dot=_journal_full_for_example_org,
                    )
                # as deliver() raised: what the slow server had, and what still runs
                running = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                return [m.rcpt_tos for m in slow.messages], running, raised.value
            finally:
                await d.close_all()

        delivered, running, partly = asyncio.run(run())
    finally:
        failing.stop()
        slow.stop()
    assert running == []
    assert delivered == [["b@example.net"]]
    assert isinstance(partly.error, OSError) and partly.error.errno == errno.ENOSPC
    assert [(r.recipient.address, r.status) for r in partly.results] == [
        ("b@example.net", Status.DELIVERED)
    ]


def test_what_a_failed_destination_had_finished_comes_out_with_its_error(tmp_path: Path) -> None:
    """The server takes one recipient per transaction (452 for the next): the first goes out,
    the second transaction fails at its dot. The error carries the first one's delivery, for
    the caller to journal before it puts the envelope back (else it is sent again)."""
    srv = SmtpServer(Script(max_rcpts=1))
    try:
        cfg = routed(srv)
        path = tmp_path / "e.bsmtp"
        env = write_envelope(path, [draft("o@example.com", ["a1@example.org", "a2@example.org"])])

        async def run() -> PartlyDelivered:
            d = Deliverer(cfg, MxResolver(cfg.dns, cfg.delivery.max_addresses, cfg.delivery.port))
            try:
                made: list[list[Recipient]] = []

                def second_fails(recipients: list[Recipient]) -> _FailingMark:
                    made.append(recipients)
                    return _FailingMark(len(made) == 2)

                with pytest.raises(PartlyDelivered) as raised:
                    await d.deliver(path, env.transactions[0], "ENV1", NOW, before_dot=second_fails)
                return raised.value
            finally:
                await d.close_all()

        partly = asyncio.run(run())
    finally:
        srv.stop()
    assert [m.rcpt_tos for m in srv.messages] == [["a1@example.org"]]
    assert isinstance(partly.error, OSError) and partly.error.errno == errno.ENOSPC
    assert [(r.recipient.address, r.status) for r in partly.results] == [
        ("a1@example.org", Status.DELIVERED)
    ]

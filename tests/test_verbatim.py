"""A message whose lines need no dot-stuffing goes out as the spool file holds it (sendfile(2)
from the file, or one write from the bytes already read) and arrives byte for byte; one that
needs stuffing still gets it; TLS still carries the message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme
import uvloop

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.config import Config
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.spool import envfile
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import SmtpServer
from tests.test_delivery import tls_server

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def text(lines: int, first: bytes = b"Subject: big\r\n\r\n") -> bytes:
    """Lines of every printable byte, none beginning with a dot."""
    row = bytes(range(33, 127)) * 2
    return first + b"".join(
        b"%06d " % i + row[i % 94 : i % 94 + 70] + b"\r\n" for i in range(lines)
    )


def send(
    cfg: Config, path: Path, loop: str, *, in_memory: bool = False
) -> tuple[RecipientResult, Deliverer]:
    env = envfile.read(path, cfg.limits, cfg.helo_name)
    (tx,) = env.transactions
    data = path.read_bytes() if in_memory else None

    async def run() -> tuple[RecipientResult, Deliverer]:
        deliverer = Deliverer(cfg, MxResolver(cfg.dns, cfg.delivery.max_addresses))
        try:
            (res,) = await deliverer.deliver(path, tx, "ENV1", NOW, data=data)
        finally:
            await deliverer.close_all()
        return res, deliverer

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(run())


def routed(srv: SmtpServer, **delivery: object) -> Config:
    return make_config(routes={"example.org": f"{srv.host}:{srv.port}"}, delivery=delivery)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(("lines", "in_memory"), [(20, True), (3000, True), (60_000, False)])
def test_a_body_needing_no_stuffing_goes_out_as_the_file_holds_it_byte_exact(
    tmp_path: Path, loop: str, lines: int, in_memory: bool
) -> None:
    """Small (one write with the dot), mid-size from memory, and 5 MB by sendfile from the
    file (more than a socket buffer takes at once, so the wait for room is exercised)."""
    message = text(lines)
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"], message)])
    srv = SmtpServer()
    try:
        res, deliverer = send(routed(srv), path, loop, in_memory=in_memory)
    finally:
        srv.stop()
    assert res.status is Status.DELIVERED, res.reply
    (got,) = srv.messages
    assert got.content.startswith(b"Received: ")
    assert got.content.endswith(message)
    header = got.content[: -len(message)]
    assert header.count(b"\r\n") == header.count(b"\r\n\t") + 1  # our one (folded) header
    assert deliverer.stats.verbatim == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_a_body_with_lines_beginning_with_a_dot_is_still_stuffed(tmp_path: Path, loop: str) -> None:
    message = text(200) + b".leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n"
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"], message)])
    srv = SmtpServer()
    try:
        res, deliverer = send(routed(srv), path, loop)
    finally:
        srv.stop()
    assert res.status is Status.DELIVERED, res.reply
    assert srv.messages[0].content.endswith(message)
    assert b"\r\n..leading dot\r\n...two dots\r\n..\r\nafter" in srv.wire
    assert deliverer.stats.verbatim == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_a_body_needing_no_stuffing_still_goes_through_tls(tmp_path: Path, loop: str) -> None:
    message = text(3000)
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("o@example.com", ["a@example.org"], message)])
    srv = tls_server(trustme.CA())
    try:
        res, deliverer = send(routed(srv), path, loop)
    finally:
        srv.stop()
    assert res.status is Status.DELIVERED, res.reply
    (got,) = srv.messages
    assert got.tls and got.content.endswith(message)
    assert deliverer.stats.verbatim == 0

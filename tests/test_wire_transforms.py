"""What goes on the wire when it is not the stored text: 8-bit messages converted to 7 bit for
a server without 8BITMIME, and DKIM signatures, against real servers on loopback."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from spoolsmtp.delivery.deliverer import Deliverer
from spoolsmtp.delivery.mx import MxResolver
from spoolsmtp.model.outcome import RecipientResult, Status
from spoolsmtp.smtp.sevenbit import eight_bit
from spoolsmtp.spool import envfile
from tests.helpers import draft, make_config, write_envelope
from tests.smtpservers import Script, SmtpServer
from tests.test_delivery import NOW, deliver

TEXT = "Grüße aus Zürich\r\n.a line with a dot\r\n".encode()
HTML = "<p>Ça va très bien</p>\r\n".encode()
MIME_8BIT = (
    b"From: Batch <batch@example.com>\r\nTo: a@example.org\r\nSubject: Monatsbericht\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + TEXT
    + b"\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
    b"\r\n\r\n" + HTML + b"\r\n--b1--\r\n"
)


@pytest.fixture
def seven_bit_server() -> Iterator[SmtpServer]:
    srv = SmtpServer(Script(drop_extensions=["8BITMIME"]))
    yield srv
    srv.stop()


def send(tmp_path: Path, srv: SmtpServer, message: bytes, **delivery: Any) -> RecipientResult:
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("batch@example.com", ["a@example.org"], message)])
    cfg = make_config(routes={"example.org": f"127.0.0.1:{srv.port}"}, delivery=delivery)
    (res,), _, _ = deliver(cfg, path)
    return res


def parsed(content: bytes) -> EmailMessage:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_an_8bit_mime_message_is_converted_for_a_7bit_server(
    tmp_path: Path, seven_bit_server: SmtpServer
) -> None:
    res = send(tmp_path, seven_bit_server, MIME_8BIT)
    assert res.status is Status.DELIVERED, res.reply
    (got,) = seven_bit_server.messages
    assert not eight_bit(got.content)
    assert not any(o.startswith("BODY=") for o in got.mail_options)
    size = next(int(o[5:]) for o in got.mail_options if o.startswith("SIZE="))
    assert size == len(got.content)
    msg = parsed(got.content)
    assert msg["Subject"] == "Monatsbericht"
    assert got.content.startswith(b"Received: ")
    parts = list(msg.iter_parts())
    assert [p.get_payload(decode=True) for p in parts] == [TEXT, HTML]
    assert [p["Content-Transfer-Encoding"] for p in parts] == ["quoted-printable"] * 2
    assert parts[0].get_content() == TEXT.decode()


def test_what_cannot_be_converted_still_fails_clearly(
    tmp_path: Path, seven_bit_server: SmtpServer
) -> None:
    res = send(tmp_path, seven_bit_server, b"Subject: no MIME\r\n\r\ncaf\xc3\xa9\r\n")
    assert (res.status, res.reply.code, res.reply.enhanced) == (Status.FAILED, 554, "5.6.3")
    assert "cannot be converted to 7 bit: not MIME" in res.reply.text
    assert b"MAIL FROM" not in seven_bit_server.wire


def test_conversion_can_be_turned_off(tmp_path: Path, seven_bit_server: SmtpServer) -> None:
    res = send(tmp_path, seven_bit_server, MIME_8BIT, mime_conversion=False)
    assert (res.status, res.reply.enhanced) == (Status.FAILED, "5.6.3")
    assert seven_bit_server.messages == []


def test_a_server_with_8bitmime_gets_the_stored_text_unchanged(tmp_path: Path) -> None:
    srv = SmtpServer()
    try:
        res = send(tmp_path, srv, MIME_8BIT)
    finally:
        srv.stop()
    assert res.status is Status.DELIVERED
    (got,) = srv.messages
    assert got.content.endswith(MIME_8BIT)
    assert "BODY=8BITMIME" in got.mail_options


def test_a_reload_turning_conversion_off_applies_to_a_reused_connection(
    tmp_path: Path, seven_bit_server: SmtpServer
) -> None:
    """What goes out is decided with the configuration of now, not the one a pooled
    connection was opened with (found by review: the session kept its own copy)."""
    path = tmp_path / "e.bsmtp"
    write_envelope(path, [draft("batch@example.com", ["a@example.org"], MIME_8BIT)])
    route = {"example.org": f"127.0.0.1:{seven_bit_server.port}"}
    on = make_config(routes=route)
    off = make_config(routes=route, delivery={"mime_conversion": False})
    env = envfile.read(path, on.limits, on.helo_name)

    async def run() -> tuple[RecipientResult, RecipientResult, int]:
        deliverer = Deliverer(on, MxResolver(on.dns))
        try:
            (first,) = await deliverer.deliver(path, env.transactions[0], "E", NOW)
            deliverer.reconfigure(off)
            (second,) = await deliverer.deliver(path, env.transactions[0], "E", NOW)
        finally:
            await deliverer.close_all()
        return first, second, deliverer.stats.reused

    first, second, reused = asyncio.run(run())
    assert first.status is Status.DELIVERED
    assert reused == 1  # the same connection
    assert (second.status, second.reply.enhanced) == (Status.FAILED, "5.6.3")
    assert len(seven_bit_server.messages) == 1
